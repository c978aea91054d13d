"""dapo on qwen2.5-math-1.5b with the paper's setup (see experiments/configs/paper.py).

    python -m experiments.main --config=experiments/configs/dapo_qwen25_math_1p5b.py \
        --config.model.path=/ckpt/qwen2.5-math-1.5b --config.task.train_file=/data/train.jsonl
"""

from experiments.configs import paper


def get_config():
  return paper.paper_config("dapo", "qwen2.5-math-1.5b")
