"""The EGPO vs GRPO study (notebooks/study.ipynb, notebooks/PREREGISTRATION.md).

    python -m experiments.study --regime=default                 # the confirmatory run
    python -m experiments.study --regime=shortcut \
        --config=experiments/configs/study.py:pilot              # the pilot's seeds
    python -m experiments.study --regime=default --config=experiments/configs/study.py:tiny
    python -m experiments.study --regime=default \
        --config=experiments/configs/study.py:secondary          # all arms (amendment 1)
    python -m experiments.study --regime=overconfident \
        --config.control_warmup_steps=0       # the primary comparison alone, no control

Settings (the part after ':'): "full" (confirmatory: seeds 0.., n from the pilot),
"pilot" (seeds 1000.., kept out of the confirmatory sample), "secondary" (the secondary
arms of amendment 1: NSR on/off, C1-C6, DAPO and EDGE-GRPO, one program) and "tiny" (CI,
seconds).
A regime is a set of overrides of the trainer config (`REGIMES`).
"""

import ml_collections

from experiments.configs import default

# Regime -> overrides of the trainer config; why each (notebooks/PREREGISTRATION.md):
#   default    today's embedded default (level 2, ~12% all-wrong groups at 8 responses)
#   all_wrong  level 3 (2-3 operands up to 29): the same warm-up leaves far more
#              all-wrong groups, the groups only EGPO's NSR (Eq. 10) learns from
#   shortcut   level 8: level 2 whose warm-up demonstrations drop the units carry of the
#              last addition (meant for confident failures; the pilot showed it is not)
#   overconfident  level 9 (amendment 1): level 2 whose 3-term demonstrations box the
#              last written running total, one step early; the warm start answers those
#              wrong with high confidence exp(-H~) (20% of responses at >= 0.9)
REGIMES = {
    "default": {},
    "all_wrong": {"task.difficulty": 3},
    "shortcut": {"task.difficulty": 8},
    "overconfident": {"task.difficulty": 9},
}
SETTINGS = ("full", "pilot", "secondary", "tiny")
# The confirmatory n per arm, from the pilot (PREREGISTRATION.md, "Sample size"; the
# overconfident regime's from its pilot, amendment 1).
SEEDS_PER_ARM = {"default": 35, "all_wrong": 16, "shortcut": 16, "overconfident": 18}
# Amendment 1's secondary arms (ablation.algorithm names), EGPO first: NSR on/off, the
# Table 2 variants C1-C6 and DAPO (without dynamic sampling: one prompt batch for all
# runs) and EDGE-GRPO as references.
SECONDARY_ARMS = ("egpo", "grpo", "egpo_no_nsr", "c1", "c2", "c3", "c4", "c5", "c6", "dapo",
                  "edge_grpo")
SECONDARY_SEEDS = 8


def get_config(setting: str = "full") -> ml_collections.ConfigDict:
  if setting not in SETTINGS:
    raise ValueError(f"study setting {setting!r}: use one of {SETTINGS}, e.g. "
                     "--config=experiments/configs/study.py:pilot")
  c = ml_collections.ConfigDict()
  c.setting = setting
  # The trainer config every regime starts from (--config.trainer.optim.lr=... works):
  # the embedded default with 16 prompts x 8 responses per iteration, as in the ablation.
  c.trainer = default.get_config()
  c.trainer.rollout.prompts_per_batch = 16
  c.arms = ("egpo", "grpo", "egpo_no_nsr")   # ablation.algorithm names; egpo first
  c.reference = "egpo"                       # the primary tests compare the others to it
  c.first_seed = 0
  c.num_seeds = 0                  # 0: the regime's pre-registered n (SEEDS_PER_ARM)
  c.iterations = 60
  c.eval_every = 15                # validation curve: 0, 15, 30, 45, 60
  c.eval_prompts = 1024            # held out, the same prompts and keys for every arm
  c.eval_samples = 2               # samples per prompt at the rollout temperature (1.0)
  c.eval_batch = 12                # runs validated at once (memory, not results); 0 = all
  c.overconfident_at = 0.9         # a wrong answer with exp(-H~) >= this is overconfident
  c.mde = 0.02                     # minimum effect of interest: 2 accuracy points
  c.power = 0.8
  c.alpha = 0.05                   # family-wise, Holm over the 2 primary tests
  # Positive control (amendment 1): GRPO from a warm start with fewer supervised steps,
  # the same seeds, validation prompts and keys; its deficit is known to be real. 0: off
  # (the primary comparison alone; the control is about a fifth of a regime's time).
  c.control_warmup_steps = 475
  if setting == "pilot":
    c.first_seed = 1000            # never in the confirmatory sample (seeds 0..999)
    c.num_seeds = 4                # otherwise the confirmatory design
  elif setting == "secondary":
    c.arms = SECONDARY_ARMS
    c.num_seeds = SECONDARY_SEEDS  # seeds 0..7: as many as the CPU budget allowed
  elif setting == "tiny":
    # Level 1 and a large learning rate, so that 200 warm-up steps land above 0 accuracy
    # and 4 iterations move the curves (at level 2 the tiny warm-up leaves ~2%).
    c.trainer.task.difficulty = 1
    c.trainer.rollout.prompts_per_batch = 8
    c.trainer.rollout.group_size = 4
    c.trainer.warmup.steps = 200
    c.control_warmup_steps = 100
    c.trainer.warmup.batch_size = 32
    c.trainer.optim.lr = 2e-3
    c.num_seeds = 2
    c.iterations = 4
    c.eval_every = 2
    c.eval_prompts = 64
  return c
