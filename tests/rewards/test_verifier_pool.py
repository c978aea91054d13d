"""The worker pool: results, hard timeouts, dead and hung workers, and jax-free workers."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from egpo_jax import rewards
from egpo_jax.rewards import pool as pool_lib

HANG = "\\boxed{10^{10^{10}}}"  # sympy evaluates this integer for a long time


@pytest.fixture(scope="module")
def pool():
  with rewards.VerifierPool(2, grace=1.0) as p:
    yield p


def test_pool_matches_in_process(pool):
  responses = ["\\boxed{\\frac12}", "\\boxed{0.52}", "\\boxed{3} \\boxed{x=2}", "\\boxed{B}",
               "\\boxed{1,200}", "no box", "\\boxed{14}"]
  references = ["0.5", "1/2", "2", "B", "1200", "1", "14"]
  kinds = ["math", "math", "math", "multiple_choice", "gsm8k", "math", "synthetic"]
  got = pool.check(kinds, responses, references, timeout=5.0)
  want = rewards.check_in_process(kinds, responses, references, timeout=5.0)
  np.testing.assert_array_equal(got.correct, [True, False, True, True, True, False, True])
  np.testing.assert_array_equal(got.correct, want.correct)
  assert got.reasons == want.reasons


def test_math_rewards_values(pool):
  r = rewards.verify_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"], pool=pool).rewards
  np.testing.assert_array_equal(r, np.array([1.0, -1.0], np.float32))
  r = rewards.verify_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"], pool=pool,
                           correct_reward=1.0, wrong_reward=0.0).rewards
  np.testing.assert_array_equal(r, [1.0, 0.0])
  assert rewards.verify_batch([], [], pool=pool).rewards.shape == (0,)


def test_hanging_answer_is_wrong_within_the_timeout_and_the_batch_finishes(pool):
  responses = ["\\boxed{2}", HANG, "\\boxed{\\frac{4}{2}}", "\\boxed{3}"]
  start = time.monotonic()
  out = pool.check("math", responses, ["2"] * 4, timeout=1.0)
  elapsed = time.monotonic() - start
  np.testing.assert_array_equal(out.correct, [True, False, True, False])
  assert out.reasons[1].startswith("timeout")
  assert elapsed < 1.0 + pool.grace + 1.5, elapsed


def test_a_killed_worker_is_replaced_and_its_item_scored_wrong(pool):
  replaced = pool.replaced
  pids = set(pool.worker_pids())
  victim = []

  def kill_the_busy_worker():
    time.sleep(0.5)  # the hanging item is in flight by now
    for w in pool._workers:  # pylint: disable=protected-access
      if w.item is not None and w.item == 0:
        victim.append(w.proc.pid)
        os.kill(w.proc.pid, signal.SIGKILL)

  killer = threading.Thread(target=kill_the_busy_worker)
  killer.start()
  out = pool.check("math", [HANG, "\\boxed{2}"], ["2", "2"], timeout=30.0)
  killer.join()
  assert victim, "the hanging item was not in flight"
  assert out.reasons[0].startswith("worker died")
  np.testing.assert_array_equal(out.correct, [False, True])
  assert pool.replaced == replaced + 1
  assert victim[0] not in pool.worker_pids() and len(set(pool.worker_pids()) - pids) == 1
  again = pool.check("math", ["\\boxed{2}"] * 3, ["2"] * 3)
  assert again.correct.all()


def test_a_hung_worker_that_ignores_its_alarm_is_killed(pool):
  """SIGSTOP freezes the worker, so only the pool's own deadline can end the item."""
  stopped = []

  def freeze_the_busy_worker():
    time.sleep(0.3)
    for w in pool._workers:  # pylint: disable=protected-access
      if w.item == 0:
        stopped.append(w.proc.pid)
        os.kill(w.proc.pid, signal.SIGSTOP)

  t = threading.Thread(target=freeze_the_busy_worker)
  t.start()
  start = time.monotonic()
  out = pool.check("math", [HANG, "\\boxed{2}"], ["2", "2"], timeout=1.0)
  t.join()
  assert stopped
  assert out.reasons[0] == "timeout (worker killed)"
  assert out.correct.tolist() == [False, True]
  assert time.monotonic() - start < 1.0 + pool.grace + 2.0
  assert stopped[0] not in pool.worker_pids()


def test_a_worker_dead_between_batches_is_replaced_without_losing_items(pool):
  os.kill(pool.worker_pids()[0], signal.SIGKILL)
  time.sleep(0.2)
  out = pool.check("math", ["\\boxed{2}"] * 4, ["2"] * 4)
  assert out.correct.all(), out.reasons


def test_workers_never_import_jax(pool):
  import jax  # noqa: F401  (the parent has jax; the workers must not)
  for modules in pool.loaded_modules():
    heavy = [m for m in modules if m.split(".")[0] in ("jax", "jaxlib", "egpo_jax",
                                                       "tensorflow", "torch")]
    assert not heavy, heavy
    assert "math_verify" in modules


def test_pool_arguments_are_validated(pool):
  with pytest.raises(ValueError, match="num_workers"):
    rewards.VerifierPool(0)
  with pytest.raises(ValueError, match="timeout"):
    pool.check("math", ["x"], ["1"], timeout=0)


def test_a_closed_pool_refuses_work():
  p = rewards.VerifierPool(1)
  p.close()
  with pytest.raises(pool_lib.PoolError, match="closed"):
    p.check("math", ["\\boxed{1}"], ["1"])


def test_workers_that_cannot_start_raise_a_clear_error(tmp_path):
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\necho 'no math here' >&2\nexit 3\n")
  fake.chmod(0o755)
  with pytest.raises(pool_lib.PoolError, match="no math here"):
    rewards.VerifierPool(1, python=str(fake))
