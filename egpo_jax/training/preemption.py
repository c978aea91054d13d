"""Preemption and Ctrl-C: a signal -> a checkpoint at the next boundary -> an exit code
-> resume.

A job wrapped in `honours_sigterm` (the trainer is) turns SIGTERM and SIGINT into a flag
for its duration and restores the previous handlers afterwards. The training loop asks
`stop_requested(iteration)` at every chunk boundary; when it says yes, the loop calls
`checkpoint_and_raise`, which saves that iteration synchronously and raises `Preempted`.
`experiments/main.py` turns `Preempted` into its `exit_code`: 75 (EX_TEMPFAIL, "try
again", what a requeue wrapper acts on) after SIGTERM, 130 (128 + SIGINT, the shell's
code for Ctrl-C) after SIGINT only; running the same command again resumes from that
checkpoint. A second Ctrl-C aborts at once (exit 130, one line): a checkpoint being
written is then left as a temporary folder, which the next start deletes, and the run
resumes from the newest complete checkpoint.

The supervised warm-up asks `stop_requested(step, warmup=True)` between its jitted
chunks; it saves nothing (`raise_in_warmup`): the warm-up is deterministic and the next
run restarts it from step 0, so the resumed run is still exact.

Latency: a signal is honoured at the next chunk boundary, so the time from the signal to
the exit is at most one chunk (<= train.iterations_per_call iterations, and never past the
next multiple of train.checkpoint_every), plus a validation due at that boundary, plus one
synchronous save. Keep iterations_per_call x seconds per iteration well under the
scheduler's grace period (Kubernetes: 30 s by default). A signal that arrives after the
last boundary is ignored: the run is finishing anyway and exits 0.

Multi-process jobs (jax.distributed initialised): JAX's preemption notifier owns SIGTERM,
so no Python handler is installed (SIGINT keeps its default too); `stop_requested` asks
orbax's `reached_preemption` (the JAX preemption sync point), which answers True on every
process at the same boundary, so all processes save the same iteration together. If the
handler here got SIGTERM instead (JAX's preemption service disabled), the flags of all
processes are all-gathered at each boundary, with the same effect.
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
INTERRUPTED_EXIT_CODE = 130   # 128 + SIGINT: stopped by the user (Ctrl-C)

F = TypeVar("F", bound=Callable[..., Any])


class Preempted(Exception):
  """The job stopped on a signal after checkpointing `iteration` (`checkpoint_path`), or
  during the warm-up with nothing saved (`checkpoint_path` None). `exit_code` is 130 when
  only SIGINT arrived (the user stopped it), else 75 (preempted: run again)."""

  def __init__(self, iteration: int, checkpoint_path: str | None, *,
               interrupted: bool = False, warmup_steps: int | None = None):
    what = "interrupted (Ctrl-C)" if interrupted else "preempted"
    if checkpoint_path is None:
      msg = (f"{what}: stopped during the supervised warm-up after step {iteration} of "
             f"{warmup_steps}; nothing was saved, and running the same command again "
             "restarts the warm-up from step 0 (it is deterministic)")
    else:
      msg = (f"{what}: stopped after iteration {iteration} and saved {checkpoint_path}; "
             "run the same command again to resume")
    super().__init__(msg)
    self.iteration = iteration
    self.checkpoint_path = checkpoint_path
    self.exit_code = INTERRUPTED_EXIT_CODE if interrupted else EXIT_CODE


@dataclasses.dataclass
class _State:
  signalled: bool = False    # SIGTERM or SIGINT arrived
  terminated: bool = False   # SIGTERM arrived (the exit code is then 75)
  interrupts: int = 0        # SIGINTs so far (the second one aborts)
  boundaries: int = 0        # the step id of JAX's preemption sync point

  @property
  def interrupted(self) -> bool:
    """Only the user stopped the job (exit 130); a preemption notice wins (75)."""
    return self.interrupts > 0 and not self.terminated


_STATE = _State()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _STATE.signalled = True
  _STATE.terminated = True


def _on_sigint(signum, frame) -> None:
  del signum, frame
  _STATE.interrupts += 1
  if _STATE.interrupts > 1:
    # os._exit: no KeyboardInterrupt unwinding through orbax's threads (pages of errors);
    # an unfinished save stays a temporary folder that the next start deletes.
    os.write(2, b"second Ctrl-C: aborted; the next run resumes from the newest complete "
                b"checkpoint\n")
    os._exit(INTERRUPTED_EXIT_CODE)
  _STATE.signalled = True
  # os.write: a handler may run in the middle of a print to sys.stderr.
  os.write(2, b"Ctrl-C: saving a checkpoint at the next boundary, then stopping "
              b"(Ctrl-C again aborts)\n")


@contextlib.contextmanager
def sigterm_guard() -> Iterator[None]:
  """Within the block, SIGTERM and SIGINT set a flag instead of ending the process.

  The handlers are installed only on the main thread (Python's rule) and only in a
  single-process job; the previous handlers and flag come back on exit. (A job that calls
  jax.distributed.initialize inside the block hands SIGTERM to JAX's notifier there.)
  """
  global _STATE
  saved = _STATE
  _STATE = _State()
  install = (threading.current_thread() is threading.main_thread()
             and not jax.distributed.is_initialized())
  handlers = {signal.SIGTERM: _on_sigterm, signal.SIGINT: _on_sigint}
  previous = {s: signal.signal(s, h) for s, h in handlers.items()} if install else {}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _STATE = saved


def honours_sigterm(fn: F) -> F:
  """Decorator: runs `fn` inside `sigterm_guard`."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with sigterm_guard():
      return fn(*args, **kwargs)
  return wrapper  # type: ignore[return-value]


def signalled() -> bool:
  """Whether this process received SIGTERM or SIGINT inside the current guard."""
  return _STATE.signalled


def stop_requested(iteration: int, *, warmup: bool = False) -> bool:
  """Asked at every chunk boundary (by every process, at the same boundaries); `warmup`:
  a boundary of the supervised warm-up, `iteration` its step."""
  fault_injection.at_boundary(iteration, signalled, warmup=warmup)
  _STATE.boundaries += 1
  if jax.distributed.is_initialized():
    # JAX's notifier normally owns SIGTERM (the sync point); a flag set by this module's
    # handler (preemption service off) is shared, so that every process stops together.
    flags = multihost_utils.process_allgather(np.asarray(_STATE.signalled, np.int32))
    reached = bool(ocp.multihost.reached_preemption(_STATE.boundaries))
    return reached or bool(np.any(flags))
  if _STATE.signalled and not warmup:
    log.warning("%s received: checkpointing iteration %d and stopping",
                "SIGINT" if _STATE.interrupted else "SIGTERM", iteration)
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
  raise Preempted(iteration, os.path.join(checkpointer.directory, str(iteration)),
                  interrupted=_STATE.interrupted)


def raise_in_warmup(step: int, total_steps: int) -> NoReturn:
  """Stops the job during the supervised warm-up, after `step` of `total_steps` steps
  (nothing is saved: the next run restarts the deterministic warm-up)."""
  raise Preempted(step, None, interrupted=_STATE.interrupted, warmup_steps=total_steps)
