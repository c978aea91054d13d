"""egpo on deepseek-r1-distill-qwen-1.5b with the paper's setup (see experiments/configs/paper.py).

    python -m experiments.main --config=experiments/configs/egpo_r1_distill_1p5b.py \
        --config.model.path=/ckpt/deepseek-r1-distill-qwen-1.5b --config.task.train_file=/data/train.jsonl
"""

from experiments.configs import paper


def get_config():
  return paper.paper_config("egpo", "deepseek-r1-distill-qwen-1.5b")
