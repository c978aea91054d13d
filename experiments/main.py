"""Trains a policy with GRPO / Dr.GRPO / RLOO / EDGE-GRPO / EGPO on a verifiable task.

    python -m experiments.main                                  # the embedded default
    python -m experiments.main --config=experiments/configs/default.py \
        --config.algo.advantage=grpo --workdir=/tmp/grpo_run

Run it again with the same --workdir to resume from the last checkpoint. docs/CONFIG.md
lists every field and its domain.

Exit codes: 0 done; 2 a bad flag or config value, before anything is written (one line
naming the field, the value and the fix; --verbosity=1 adds the traceback); 75
(EX_TEMPFAIL) preempted: SIGTERM arrived, the current iteration was checkpointed, and the
same command resumes from it (see docs/FAULTS.md); 130 stopped by Ctrl-C: the same, after
SIGINT (a second Ctrl-C aborts at once, also 130); anything else is an error.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

USAGE_ERROR = 2


def _verbose(argv) -> bool:
  """--verbosity >= 1 (absl's flag): show tracebacks of start-up errors."""
  for arg in argv:
    if arg.startswith("--verbosity="):
      try:
        return int(arg.partition("=")[2]) >= 1
      except ValueError:
        return False
  return False


def _usage_error(message: str, verbose: bool) -> int:
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr, flush=True)
  return USAGE_ERROR


def _unknown_override(argv) -> str | None:
  """The message for the first --config.<field> that names no field, if any."""
  from egpo_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      name = arg[len("--config."):].partition("=")[0]
      if name not in config_lib.domains.BY_NAME:
        return str(config_lib.unknown_field_error(name))
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or override reported in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except Exception as err:  # pylint: disable=broad-except
    # flags.Error, or what ml_collections raises for an override of no field.
    sys.exit(_usage_error(_unknown_override(argv) or _one_line(err), _verbose(argv)))


def _one_line(err: BaseException) -> str:
  """The error, and its innermost cause (e.g. what a config file's get_config raised)."""
  inner = err
  while inner.__cause__ or inner.__context__:
    inner = inner.__cause__ or inner.__context__
  outer = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else ""
  cause = f"{type(inner).__name__}: " + (str(inner).strip().splitlines() or [""])[-1].strip()
  if inner is err:
    return outer if isinstance(err, flags.Error) else f"--config: {cause}"
  return outer if cause.partition(": ")[2] in outer else f"{outer}: {cause}"


_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
try:
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT,
                                            "Training config (a Python file).")
except Exception as _err:  # pylint: disable=broad-except
  # ml_collections reads sys.argv's --config.<field> overrides here already.
  sys.exit(_usage_error(_unknown_override(sys.argv) or _one_line(_err), _verbose(sys.argv)))
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default",
                               "Checkpoints, metrics.jsonl, TensorBoard logs and plots.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile one iteration's phases from abstract "
                             "shapes and print per-device memory and collectives; train nothing.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: this many fake "
                                        "CPU devices stand in for the target (0 = the real ones).")
_DRY_RUN_TOPOLOGY = flags.DEFINE_string(
    "dry_run_topology", "", "With --dry_run: compile for this TPU slice (e.g. v5e:4x4, "
    "v5p:2x2x2) with libtpu, without a TPU (pip install -e \".[tpu-aot]\"); instead of "
    "--dry_run_devices.")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", "", "With --dry_run: also write the report "
                                    "as JSON here.")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", 0.0, "With --dry_run: exit 1 when a "
                                       "phase needs more than this per device (0 = no check; with "
                                       "--dry_run_topology, the chip's HBM).")


def run(config, workdir: str, *, verbose: bool = False) -> int:
  """Trains (or resumes) `config` in `workdir`; returns the exit code (module docstring)."""
  from egpo_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from egpo_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import preemption, train  # pylint: disable=g-import-not-at-top
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return _usage_error(f"--workdir={workdir}: this is a file; give a folder (new or a run's "
                        "own, to resume)", verbose)
  try:
    summary = train.train(config, workdir)
  except config_lib.ConfigError as err:   # raised before anything is written
    return _usage_error(str(err), verbose)
  except preemption.Preempted as err:
    print(err, file=sys.stderr, flush=True)
    return err.exit_code
  print(report.before_after_table(summary))
  print(f"workdir: {os.path.abspath(workdir)} (metrics.jsonl, curves.png, "
        "checkpoints/, tensorboard/, summary.json)")
  return 0


def main(argv):
  del argv
  verbose = _verbose(sys.argv)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    config.to_dict()   # a config file that failed to load raises on first use
  except Exception as err:  # pylint: disable=broad-except
    return _usage_error(_unknown_override(sys.argv) or _one_line(err), verbose)
  if _DRY_RUN.value:   # before anything starts JAX: --dry_run_devices must come first
    from egpo_jax.training import dry_run  # pylint: disable=g-import-not-at-top
    return dry_run.main(config, devices=_DRY_RUN_DEVICES.value,
                        topology=_DRY_RUN_TOPOLOGY.value, json_path=_DRY_RUN_JSON.value,
                        device_memory_gb=_DEVICE_MEMORY_GB.value)
  try:
    return run(config, _WORKDIR.value, verbose=verbose)
  except KeyboardInterrupt:   # Ctrl-C before the trainer took over SIGINT
    from egpo_jax.training import preemption  # pylint: disable=g-import-not-at-top
    print("interrupted before training started; nothing was saved", file=sys.stderr)
    return preemption.INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=parse_flags))
