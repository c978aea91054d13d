"""A pool of verification worker processes with hard per-item timeouts.

math-verify's timeouts are SIGALRM-based (main thread only) and sympy can hang in code
that no signal interrupts, so each check runs in a worker process: the worker's own alarm
handles the usual case, and a worker that misses its deadline by `grace` seconds, or dies,
is killed and replaced and its item is scored wrong. Workers are fresh interpreters that
run `verifiers.py` by path (`python -I`), exec'd straight after fork, with the semantics
of the "spawn" start method: nothing of the parent (jax threads, locks) is inherited,
the parent's `__main__` is not re-imported, and no egpo_jax or jax module is loaded.
Requests and replies are JSON lines, so nothing a model wrote is ever unpickled.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np

from egpo_jax.rewards import verifiers

_WORKER_FILE = os.path.abspath(verifiers.__file__)


class PoolError(RuntimeError):
  """The pool cannot run checks (workers fail to start, or it was closed)."""


@dataclasses.dataclass
class Verdicts:
  """Per-response results: `correct` (bool [N]) and a short `reasons` string each."""
  correct: np.ndarray
  reasons: list[str]


class _Worker:
  """One worker process, its reply buffer and the items sent to it, oldest first.

  The worker runs items in order, so the oldest is the one in progress; its deadline runs
  from when the previous reply arrived (or from sending, if the worker was idle).
  """

  def __init__(self, python: str):
    self.log = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(
        [python, "-I", _WORKER_FILE, "--worker"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self.log, close_fds=True, bufsize=0)
    self.fd = self.proc.stdout.fileno()
    self.buffer = b""
    self.ready = False
    self.started = time.monotonic()
    self.queue: collections.deque[int] = collections.deque()
    self.deadline = 0.0

  @property
  def item(self) -> int | None:
    """The item in progress, if any."""
    return self.queue[0] if self.queue else None

  def send(self, message: dict) -> bool:
    try:
      self.proc.stdin.write((json.dumps(message) + "\n").encode())
      return True
    except (BrokenPipeError, OSError):
      return False

  def read_lines(self) -> list[dict] | None:
    """Replies available now; None at end of file (the worker died)."""
    chunk = os.read(self.fd, 1 << 16)
    if not chunk:
      return None
    self.buffer += chunk
    *lines, self.buffer = self.buffer.split(b"\n")
    out = []
    for line in lines:
      try:
        out.append(json.loads(line))
      except ValueError:  # not a reply (the worker writes nothing else to this pipe)
        pass
    return out

  def stderr_tail(self, limit: int = 2000) -> str:
    self.log.seek(0)
    return self.log.read().decode("utf-8", "replace")[-limit:]

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    for f in (self.proc.stdin, self.proc.stdout, self.log):
      try:
        f.close()
      except OSError:
        pass


class VerifierPool:
  """Checks (response, reference) pairs in `num_workers` worker processes.

  Args:
    num_workers: worker processes (each imports sympy: ~150 MB, ~1-2 s to start).
    grace: seconds past an item's timeout after which its worker is killed.
    pipeline: items queued per worker, so that it never waits for the parent between
      items (a round trip per item is slow on a busy machine); unstarted items of a worker
      that is killed or dies are sent again.
    start_timeout: seconds a new worker may take to import math-verify.
    python: interpreter for the workers (the current one by default).

  Use as a context manager or call `close()`; `verify_batch` uses the shared `default_pool()`.
  Not thread-safe: one `check` at a time.
  """

  def __init__(self, num_workers: int = 2, *, grace: float = 2.0, start_timeout: float = 120.0,
               pipeline: int = 4, python: str = sys.executable):
    if not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    if not isinstance(pipeline, int) or pipeline < 1:
      raise ValueError(f"pipeline must be a positive int, got {pipeline!r}")
    self.pipeline = pipeline
    self.num_workers = num_workers
    self.grace = float(grace)
    self.start_timeout = float(start_timeout)
    self._python = python
    self._lock = threading.Lock()
    self._closed = False
    self.replaced = 0  # workers killed or found dead and restarted, for monitoring
    self._workers = [_Worker(python) for _ in range(num_workers)]
    self._wait_ready()

  # -- lifecycle --------------------------------------------------------------------------
  def _wait_ready(self) -> None:
    pending = list(self._workers)
    while pending:
      now = time.monotonic()
      for w in pending:
        if now - w.started > self.start_timeout:
          self._fail_start(w, f"did not start within start_timeout={self.start_timeout}s")
      readable, _, _ = select.select([w.fd for w in pending], [], [], 0.5)
      for w in [w for w in pending if w.fd in readable]:
        lines = w.read_lines()
        if lines is None:
          self._fail_start(w, f"exited with code {w.proc.wait()}")
        w.ready = w.ready or any(m.get("ready") for m in lines)
      pending = [w for w in pending if not w.ready]

  def _fail_start(self, worker: _Worker, why: str) -> None:
    tail = worker.stderr_tail()
    self.close()
    raise PoolError(f"verification worker {why}; is math-verify installed for {self._python}? "
                    f"worker stderr:\n{tail}")

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    for w in self._workers:
      try:
        w.proc.stdin.close()
      except OSError:
        pass
    deadline = time.monotonic() + 2.0
    for w in self._workers:
      try:
        w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
      w.kill()

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  def _replace(self, index: int) -> None:
    self._workers[index].kill()
    self._workers[index] = _Worker(self._python)
    self.replaced += 1

  # -- checks -----------------------------------------------------------------------------
  def loaded_modules(self) -> list[list[str]]:
    """`sorted(sys.modules)` of every worker (to check that none imported jax)."""
    with self._lock:
      out = []
      for w in self._workers:
        self._await_ready(w)
        if not w.send({"op": "modules"}):
          raise PoolError("a worker died; call check() to replace it")
        while True:
          select.select([w.fd], [], [], 10.0)
          lines = w.read_lines()
          if lines is None:
            raise PoolError("a worker died while listing its modules")
          found = [m["modules"] for m in lines if "modules" in m]
          if found:
            out.append(found[0])
            break
      return out

  def _await_ready(self, w: _Worker) -> None:
    while not w.ready:
      readable, _, _ = select.select([w.fd], [], [], 0.5)
      if readable:
        lines = w.read_lines()
        if lines is None:
          raise PoolError(f"a verification worker exited at start:\n{w.stderr_tail()}")
        w.ready = any(m.get("ready") for m in lines)
      elif time.monotonic() - w.started > self.start_timeout:
        raise PoolError(f"a verification worker did not start:\n{w.stderr_tail()}")

  def check(self, kinds: str | Sequence[str], responses: Sequence[str],
            references: Sequence[str], *, timeout: float = 5.0) -> Verdicts:
    """Verdicts for each (response, reference); every item ends within timeout + grace.

    Args:
      kinds: one of `verifiers.KINDS` for all items, or one per item.
      responses: model outputs (decoded text).
      references: reference answers, as the datasets store them.
      timeout: seconds per item; a timed-out, crashed or killed item is wrong.
    """
    responses, references, kinds = _validate(kinds, responses, references, timeout)
    with self._lock:
      if self._closed:
        raise PoolError("check() on a closed VerifierPool; make a new one")
      return self._run(kinds, responses, references, float(timeout))

  def _run(self, kinds, responses, references, timeout) -> Verdicts:
    n = len(responses)
    correct = np.zeros(n, bool)
    reasons = [""] * n
    pending = collections.deque(range(n))
    remaining = n
    start_failures = 0

    def finish(i: int, ok: bool, reason: str) -> None:
      nonlocal remaining
      correct[i], reasons[i] = ok, reason
      remaining -= 1

    def retire(k: int, reason: str) -> None:
      """Scores worker k's item in progress wrong, resends its others, replaces it."""
      w = self._workers[k]
      if w.queue:
        finish(w.queue.popleft(), False, reason)
        pending.extendleft(reversed(w.queue))
      self._replace(k)

    while remaining:
      for k, w in enumerate(self._workers):
        while w.ready and len(w.queue) < self.pipeline and pending:
          i = pending.popleft()
          if not w.send({"i": i, "kind": kinds[i], "response": responses[i],
                         "reference": references[i], "timeout": timeout}):
            pending.appendleft(i)  # it died; this item never reached it
            retire(k, f"worker died (exit code {w.proc.wait()})")
            break
          if not w.queue:
            w.deadline = time.monotonic() + timeout + self.grace
          w.queue.append(i)
      watched = [w for w in self._workers if not w.ready or w.item is not None]
      wake = [w.deadline for w in watched if w.item is not None]
      wake += [w.started + self.start_timeout for w in watched if not w.ready]
      wait = max(0.0, min(wake) - time.monotonic()) if wake else 0.5
      readable, _, _ = select.select([w.fd for w in watched], [], [], min(wait, 0.5))
      for k, w in enumerate(list(self._workers)):
        if w.fd in readable:
          lines = w.read_lines()
          if lines is None:
            if not w.ready:
              start_failures += 1
              if start_failures > 3 * self.num_workers:
                self._fail_start(w, "keeps exiting at start")
            retire(k, f"worker died (exit code {w.proc.wait()})")
            continue
          for msg in lines:
            if msg.get("ready"):
              w.ready = True
            elif "i" in msg and msg["i"] == w.item:
              finish(w.queue.popleft(), bool(msg["ok"]), str(msg["reason"]))
              w.deadline = time.monotonic() + timeout + self.grace
      now = time.monotonic()
      for k, w in enumerate(self._workers):
        if w.item is not None and now > w.deadline:
          retire(k, "timeout (worker killed)")
        elif not w.ready and now - w.started > self.start_timeout:
          self._fail_start(w, f"did not start within start_timeout={self.start_timeout}s")
    return Verdicts(correct=correct, reasons=reasons)


def _validate(kinds, responses, references, timeout):
  if isinstance(responses, str) or isinstance(references, str):
    raise TypeError("responses and references must be sequences of strings, not one string")
  responses, references = list(responses), list(references)
  if len(responses) != len(references):
    raise ValueError(f"got {len(responses)} responses but {len(references)} references; "
                     "pass one reference per response (repeat each prompt's G times)")
  for name, values in (("responses", responses), ("references", references)):
    bad = next((j for j, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
      raise TypeError(f"{name}[{bad}] is {type(values[bad]).__name__}, expected str")
  kinds = [kinds] * len(responses) if isinstance(kinds, str) else list(kinds)
  if len(kinds) != len(responses):
    raise ValueError(f"got {len(kinds)} kinds for {len(responses)} responses")
  unknown = sorted(set(kinds) - set(verifiers.KINDS))
  if unknown:
    raise ValueError(f"unknown verifier kind(s) {unknown}; use one of {list(verifiers.KINDS)}")
  if not timeout or timeout <= 0:
    raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
  return responses, references, kinds


_DEFAULT: VerifierPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
  """A process-wide pool (min(4, CPUs) workers, or $EGPO_VERIFY_WORKERS), closed at exit."""
  global _DEFAULT
  with _DEFAULT_LOCK:
    if _DEFAULT is None or _DEFAULT._closed:  # pylint: disable=protected-access
      n = int(os.environ.get("EGPO_VERIFY_WORKERS", min(4, os.cpu_count() or 1)))
      _DEFAULT = VerifierPool(n)
      atexit.register(_DEFAULT.close)
    return _DEFAULT


def check_in_process(kinds, responses, references, *, timeout: float = 5.0) -> Verdicts:
  """The same checks in this process (alarm-based timeouts, main thread only): a baseline."""
  responses, references, kinds = _validate(kinds, responses, references, timeout)
  results = [verifiers.check(k, r, g, timeout) for k, r, g in zip(kinds, responses, references)]
  return Verdicts(correct=np.array([ok for ok, _ in results], bool),
                  reasons=[reason for _, reason in results])
