"""A seconds-scale variant of the default: the easiest synthetic level, 4 prompts x 4
responses, a short warm-up and 2 RL iterations. Tests and smoke runs start from it.

    python -m experiments.main --config=experiments/configs/tiny.py --workdir=/tmp/tiny
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.task.difficulty = 1
  c.task.max_prompt_len = 8
  c.rollout.prompts_per_batch = 4
  c.rollout.group_size = 4
  c.rollout.max_new_tokens = 12
  c.warmup.steps = 20
  c.warmup.batch_size = 16
  c.train.iterations = 2
  c.train.iterations_per_call = 2
  c.train.checkpoint_every = 2
  c.train.eval_prompts = 8
  c.train.eval_every = 2
  c.train.tensorboard = False
  return c
