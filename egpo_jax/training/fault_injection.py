"""Seeded kill points for the fault-tolerance tests (a testing hook, off by default).

The environment variable `EGPO_FAULT_INJECT` names where a run should fail, as
comma-separated `point=value` pairs:

    sigkill_after_iteration=3      SIGKILL at the chunk boundary after iteration 3
    sigkill_during_save=4          SIGKILL while the checkpoint of iteration 4 is being
                                   written (after orbax's save call returns, before the
                                   asynchronous write is committed)
    wait_for_signal_after_iteration=3
                                   at the boundary after iteration 3, print
                                   "EGPO_FAULT_INJECT waiting at iteration 3" to stdout
                                   and wait (up to 120 s) for a signal, so a test can send
                                   a real SIGTERM at a known point
    wait_for_signal_in_warmup=50   the same at the supervised warm-up's boundary after
                                   step 50 ("... waiting at warm-up step 50")
    wait_for_signal_during_save=4  the same while the checkpoint of iteration 4 is being
                                   written ("... waiting at the save of 4")

Unset (the normal case), every hook is one dict lookup on an empty dict.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV_VAR = "EGPO_FAULT_INJECT"
POINTS = ("sigkill_after_iteration", "sigkill_during_save", "wait_for_signal_after_iteration",
          "wait_for_signal_in_warmup", "wait_for_signal_during_save")
_WAIT_LIMIT_S = 120.0


def parse(spec: str) -> dict[str, int]:
  """'point=value,...' -> {point: value}; unknown points and bad values raise."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in POINTS:
      raise ValueError(f"{ENV_VAR}={spec!r}: {item!r} is not 'point=iteration' with a point "
                       f"in {POINTS}")
    try:
      out[name] = int(value)
    except ValueError:
      raise ValueError(f"{ENV_VAR}={spec!r}: {name} needs an integer iteration, got "
                       f"{value!r}") from None
  return out


_ACTIVE: dict[str, int] = parse(os.environ.get(ENV_VAR, ""))


def _kill_now() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def at_boundary(iteration: int, signalled=lambda: False, *, warmup: bool = False) -> None:
  """Called by the training loop once the chunk ending at `iteration` is done (`warmup`:
  a chunk of the supervised warm-up, `iteration` its step)."""
  if not _ACTIVE:
    return
  if warmup:
    if _ACTIVE.get("wait_for_signal_in_warmup") == iteration:
      _wait_for_signal(f"warm-up step {iteration}", signalled)
    return
  if _ACTIVE.get("sigkill_after_iteration") == iteration:
    _kill_now()
  if _ACTIVE.get("wait_for_signal_after_iteration") == iteration:
    _wait_for_signal(f"iteration {iteration}", signalled)


def _wait_for_signal(where: str, signalled) -> None:
  print(f"{ENV_VAR} waiting at {where}", flush=True)
  deadline = time.monotonic() + _WAIT_LIMIT_S
  while not signalled() and time.monotonic() < deadline:
    time.sleep(0.02)


def during_save(step: int) -> None:
  """Called by the checkpointer right after an asynchronous save of `step` started."""
  if not _ACTIVE:
    return
  if _ACTIVE.get("sigkill_during_save") == step:
    _kill_now()
  if _ACTIVE.get("wait_for_signal_during_save") == step:
    from egpo_jax.training import preemption  # pylint: disable=g-import-not-at-top
    _wait_for_signal(f"the save of {step}", preemption.signalled)
