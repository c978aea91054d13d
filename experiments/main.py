"""Trains a policy with GRPO / Dr.GRPO / RLOO / EDGE-GRPO / EGPO on a verifiable task.

    python -m experiments.main                                  # the embedded default
    python -m experiments.main --config=experiments/configs/default.py \
        --config.algo.advantage=grpo --workdir=/tmp/grpo_run

Run it again with the same --workdir to resume from the last checkpoint.

Exit codes: 0 done; 75 (EX_TEMPFAIL) preempted: SIGTERM arrived, the current iteration
was checkpointed, and the same command resumes from it (see docs/FAULTS.md); anything
else is an error.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Training config (a Python file).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default",
                               "Checkpoints, metrics.jsonl, TensorBoard logs and plots.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile one iteration's phases from abstract "
                             "shapes and print per-device memory and collectives; train nothing.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: this many fake "
                                        "CPU devices stand in for the target (0 = the real ones).")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", "", "With --dry_run: also write the report "
                                    "as JSON here.")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", 0.0, "With --dry_run: exit 1 when a "
                                       "phase needs more than this per device (0 = no check).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _DRY_RUN.value:   # before anything starts JAX: --dry_run_devices must come first
    from egpo_jax.training import dry_run
    return dry_run.main(_CONFIG.value, devices=_DRY_RUN_DEVICES.value,
                        json_path=_DRY_RUN_JSON.value, device_memory_gb=_DEVICE_MEMORY_GB.value)
  from egpo_jax.training import preemption, train
  try:
    summary = train.train(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as err:
    print(err, file=sys.stderr, flush=True)
    return preemption.EXIT_CODE
  print(train.format_summary(summary))
  print(f"workdir: {os.path.abspath(_WORKDIR.value)} (metrics.jsonl, curves.png, "
        "checkpoints/, tensorboard/, summary.json)")


if __name__ == "__main__":
  sys.exit(app.run(main))
