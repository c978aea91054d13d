"""egpo on qwen2.5-math-7b with the paper's setup (see experiments/configs/paper.py).

    python -m experiments.main --config=experiments/configs/egpo_qwen25_math_7b.py \
        --config.model.path=/ckpt/qwen2.5-math-7b --config.task.train_file=/data/train.jsonl
"""

from experiments.configs import paper


def get_config():
  return paper.paper_config("egpo", "qwen2.5-math-7b")
