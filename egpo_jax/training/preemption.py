"""Preemption: SIGTERM -> a checkpoint of the current iteration -> exit code 75 -> resume.

A job wrapped in `honours_sigterm` (the trainer is) turns SIGTERM into a flag for its
duration and restores the previous handler afterwards. The training loop asks
`stop_requested(iteration)` at every chunk boundary; when it says yes, the loop calls
`checkpoint_and_raise`, which saves that iteration synchronously and raises `Preempted`.
`experiments/main.py` turns `Preempted` into exit code `EXIT_CODE` (75, EX_TEMPFAIL:
"try again"), and running the same command again resumes from that checkpoint.

Latency: SIGTERM is honoured at the next chunk boundary, so the time from the signal to
the exit is at most one chunk (<= train.iterations_per_call iterations, and never past the
next multiple of train.checkpoint_every), plus a validation due at that boundary, plus one
synchronous save. Keep iterations_per_call x seconds per iteration well under the
scheduler's grace period (Kubernetes: 30 s by default). A SIGTERM that arrives after the
last boundary is ignored: the run is finishing anyway and exits 0.

Multi-process jobs (jax.distributed initialised): JAX's preemption notifier owns SIGTERM,
so no Python handler is installed; `stop_requested` asks orbax's `reached_preemption`
(the JAX preemption sync point), which answers True on every process at the same
boundary, so all processes save the same iteration together. If the handler here got
SIGTERM instead (JAX's preemption service disabled), the flags of all processes are
all-gathered at each boundary, with the same effect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from egpo_jax.training import fault_injection

log = logging.getLogger(__name__)

EXIT_CODE = 75   # os.EX_TEMPFAIL (sysexits.h): a temporary failure, run again

F = TypeVar("F", bound=Callable[..., Any])


class Preempted(Exception):
  """The job stopped on a preemption notice after checkpointing `iteration`."""

  def __init__(self, iteration: int, checkpoint_path: str):
    super().__init__(f"preempted: stopped after iteration {iteration} and saved "
                     f"{checkpoint_path}; run the same command again to resume")
    self.iteration = iteration
    self.checkpoint_path = checkpoint_path


@dataclasses.dataclass
class _State:
  signalled: bool = False
  boundaries: int = 0        # the step id of JAX's preemption sync point


_STATE = _State()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _STATE.signalled = True


@contextlib.contextmanager
def sigterm_guard() -> Iterator[None]:
  """Within the block, SIGTERM sets a flag instead of ending the process.

  The handler is installed only on the main thread (Python's rule) and only in a
  single-process job; the previous handler and flag come back on exit. (A job that calls
  jax.distributed.initialize inside the block hands SIGTERM to JAX's notifier there.)
  """
  global _STATE
  saved = _STATE
  _STATE = _State()
  install = (threading.current_thread() is threading.main_thread()
             and not jax.distributed.is_initialized())
  previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
  try:
    yield
  finally:
    if install:
      signal.signal(signal.SIGTERM, previous)
    _STATE = saved


def honours_sigterm(fn: F) -> F:
  """Decorator: runs `fn` inside `sigterm_guard`."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with sigterm_guard():
      return fn(*args, **kwargs)
  return wrapper  # type: ignore[return-value]


def signalled() -> bool:
  """Whether this process received SIGTERM inside the current guard."""
  return _STATE.signalled


def stop_requested(iteration: int) -> bool:
  """Asked at every chunk boundary (by every process, at the same boundaries)."""
  fault_injection.at_boundary(iteration, signalled)
  _STATE.boundaries += 1
  if jax.distributed.is_initialized():
    # JAX's notifier normally owns SIGTERM (the sync point); a flag set by this module's
    # handler (preemption service off) is shared, so that every process stops together.
    flags = multihost_utils.process_allgather(np.asarray(_STATE.signalled, np.int32))
    reached = bool(ocp.multihost.reached_preemption(_STATE.boundaries))
    return reached or bool(np.any(flags))
  if _STATE.signalled:
    log.warning("SIGTERM received: checkpointing iteration %d and stopping", iteration)
  return _STATE.signalled


def checkpoint_and_raise(iteration: int, checkpointer, tree: Any,
                         extra: dict[str, Any]) -> NoReturn:
  """Saves `iteration` synchronously (unless already saved), closes, raises `Preempted`.

  Args:
    iteration: the iteration the state belongs to (the checkpoint's step).
    checkpointer: a `checkpointing.Checkpointer`; it is closed here.
    tree: the state pytree the job saves at every checkpoint.
    extra: the job's JSON metadata for that checkpoint.
  """
  checkpointer.wait()
  if iteration not in checkpointer.all_steps():
    checkpointer.save(iteration, tree, extra, force=True)
  checkpointer.close()
  raise Preempted(iteration, os.path.join(checkpointer.directory, str(iteration)))
