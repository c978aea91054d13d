"""Kill, preemption, Ctrl-C and corruption tests of the training job, run as subprocesses.

`python -m experiments.main` on the tiny config (6 iterations, a chunk per iteration, a
checkpoint every 2), with seeded kill points from EGPO_FAULT_INJECT
(egpo_jax.training.fault_injection) and a real SIGTERM sent by the test. Every
interrupted chain must end with exactly the params, optimizer state and metrics of one
uninterrupted run (bitwise on CPU: chunk boundaries depend only on the iteration).
The last test sends SIGTERM to one process of a two-process JAX job
(preemption_worker.py) and checks that both stop at the same boundary.

Cost: one JAX start per subprocess; subprocesses share compiled code through the
persistent compilation cache (EGPO_JAX_COMPILATION_CACHE, else a temporary folder), so
only the reference run compiles.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys

import chex
import pytest

from egpo_jax.training import preemption
from egpo_jax.training import experiment
from egpo_jax.training import train as train_lib
from egpo_jax.training.metrics import read_jsonl

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 600
FLAGS = ("--config=experiments/configs/tiny.py", "--config.train.iterations=6",
         "--config.train.iterations_per_call=1", "--config.train.checkpoint_every=2",
         "--config.train.keep_checkpoints=10", "--config.warmup.steps=2",
         "--config.train.eval_every=0", "--config.train.eval_prompts=4")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = (os.environ.get("EGPO_JAX_COMPILATION_CACHE")
           or str(tmp_path_factory.mktemp("jax_cache")))
  out = {k: v for k, v in os.environ.items() if k != "EGPO_FAULT_INJECT"}
  # One CPU device (the test process has 8 fake ones): less to compile.
  out["XLA_FLAGS"] = " ".join(f for f in out.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  out.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, PYTHONUNBUFFERED="1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return out


def _command(workdir):
  return [sys.executable, "-m", "experiments.main", *FLAGS, f"--workdir={workdir}"]


def _run(env, workdir, fault=None):
  env = {**env, **({"EGPO_FAULT_INJECT": fault} if fault else {})}
  return subprocess.run(_command(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)


def _finalized_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def _assert_same_run(workdir, reference):
  step, state, _ = experiment.read_train_state(str(workdir))
  ref_step, ref_state, _ = experiment.read_train_state(str(reference))
  assert step == ref_step == 6
  chex.assert_trees_all_equal(state.params, ref_state.params)
  chex.assert_trees_all_equal(state.opt_state, ref_state.opt_state)
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ref_rows = read_jsonl(os.path.join(reference, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """One uninterrupted run, shared by every test here."""
  workdir = tmp_path_factory.mktemp("faults") / "reference"
  done = _run(env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert _finalized_steps(workdir) == [0, 2, 4, 6]
  return workdir


def test_sigkill_sigkill_mid_save_and_sigterm_then_resume_match_one_run(env, reference,
                                                                        tmp_path):
  workdir = tmp_path / "run"
  # 1. SIGKILL after iteration 3. Checkpoint 2 may still have been in flight (saves are
  #    asynchronous): then it is lost and the run resumes from 0. Either way the end
  #    result must be the same.
  killed = _run(env, workdir, "sigkill_after_iteration=3")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _finalized_steps(workdir) in ([0], [0, 2])
  assert read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] == 3

  # 2. Resume; SIGKILL while checkpoint 4 is being written: only a temporary folder is
  #    left, never a step that looks complete. (A save waits for the previous one, so
  #    checkpoint 2 is committed by then.)
  killed = _run(env, workdir, "sigkill_during_save=4")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _finalized_steps(workdir) == [0, 2]
  assert glob.glob(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp*"))

  # 3. Resume from 2 (the temporary folder is cleaned up); a real SIGTERM at iteration 5
  #    checkpoints iteration 5 and exits with the preemption code.
  proc = subprocess.Popen(
      _command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**env, "EGPO_FAULT_INJECT": "wait_for_signal_after_iteration=5"})
  try:
    for line in proc.stdout:
      if "waiting at iteration 5" in line:
        proc.send_signal(signal.SIGTERM)
        break
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
  finally:
    proc.kill()
  assert proc.returncode == preemption.EXIT_CODE == 75, stderr[-3000:]
  assert "preempted: stopped after iteration 5" in stderr
  assert _finalized_steps(workdir) == [0, 2, 4, 5]   # 4 saved again on the way
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))

  # 4. A clean resume from 5 finishes the run.
  done = _run(env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert _finalized_steps(workdir) == [0, 2, 4, 5, 6]
  _assert_same_run(workdir, reference)


def _signal_at(env, workdir, fault, marker, sig, *extra_flags):
  """Runs the job with `fault`, sends `sig` when stdout shows `marker`; (code, stderr)."""
  proc = subprocess.Popen([*_command(workdir), *extra_flags], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**env, "EGPO_FAULT_INJECT": fault})
  try:
    for line in proc.stdout:
      if marker in line:
        proc.send_signal(sig)
        break
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
  finally:
    proc.kill()
  return proc.returncode, stderr


def _assert_no_traceback(stderr):
  for word in ("Traceback", "KeyboardInterrupt", "Exception"):
    assert word not in stderr, stderr[-3000:]


def test_sigint_mid_save_and_at_a_boundary_exit_130_and_resume_matches_one_run(env, reference,
                                                                               tmp_path):
  workdir = tmp_path / "run"
  ckpts = os.path.join(workdir, "checkpoints")
  # 1. Ctrl-C while checkpoint 2 is being written: the save completes, the job stops
  #    there with 130 and one line naming the checkpoint (no orbax shutdown errors).
  code, stderr = _signal_at(env, workdir, "wait_for_signal_during_save=2",
                            "waiting at the save of 2", signal.SIGINT)
  assert code == preemption.INTERRUPTED_EXIT_CODE == 130, stderr[-3000:]
  assert stderr.rstrip().splitlines()[-1] == (
      f"interrupted (Ctrl-C): stopped after iteration 2 and saved {ckpts}/2; run the same "
      "command again to resume")
  _assert_no_traceback(stderr)
  assert _finalized_steps(workdir) == [0, 2]
  # 2. Resume (one line says from where); Ctrl-C at the boundary after iteration 3.
  code, stderr = _signal_at(env, workdir, "wait_for_signal_after_iteration=3",
                            "waiting at iteration 3", signal.SIGINT)
  assert code == 130, stderr[-3000:]
  assert f"resumed at iteration 2 of 6 from {ckpts}/2\n" in stderr
  assert f"stopped after iteration 3 and saved {ckpts}/3;" in stderr
  _assert_no_traceback(stderr)
  assert _finalized_steps(workdir) == [0, 2, 3]
  # 3. The same command finishes the run: exactly the uninterrupted one.
  done = _run(env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resumed at iteration 3 of 6 from {ckpts}/3\n" in done.stderr
  _assert_same_run(workdir, reference)


def test_sigterm_during_the_warmup_is_honoured_at_its_next_chunk(env, tmp_path):
  workdir = tmp_path / "run"
  code, stderr = _signal_at(env, workdir, "wait_for_signal_in_warmup=50",
                            "waiting at warm-up step 50", signal.SIGTERM,
                            "--config.warmup.steps=100")
  assert code == preemption.EXIT_CODE == 75, stderr[-3000:]
  assert stderr.rstrip().splitlines()[-1].startswith(
      "preempted: stopped during the supervised warm-up after step 50 of 100; nothing was "
      "saved")
  _assert_no_traceback(stderr)
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not _finalized_steps(
      workdir)


WAIT_FOR_TWO_SIGINTS = """
import time
from egpo_jax.training import preemption
with preemption.sigterm_guard():
  print("ready", flush=True)
  while not preemption.signalled():
    time.sleep(0.01)
  print("flagged", flush=True)
  time.sleep(120)   # e.g. a long save: the second Ctrl-C must not wait for it
print("not aborted", flush=True)
"""


def test_a_second_ctrl_c_aborts_at_once_with_one_line(env):
  proc = subprocess.Popen([sys.executable, "-c", WAIT_FOR_TWO_SIGINTS], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)[1]
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "flagged"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 130 and "not aborted" not in out
  assert err.strip().splitlines() == [
      "Ctrl-C: saving a checkpoint at the next boundary, then stopping (Ctrl-C again aborts)",
      "second Ctrl-C: aborted; the next run resumes from the newest complete checkpoint"]


def _garble_largest_state_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  with open(path, "wb") as f:
    f.write(data)


def test_corrupt_checkpoints_fall_back_with_a_warning_and_lose_nothing(env, reference,
                                                                      tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  _garble_largest_state_file(os.path.join(ckpts, "6"))           # bytes that still decode
  os.remove(os.path.join(ckpts, "4", "commit_success.txt"))       # a save that never committed
  done = _run(env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  for step, why in ((6, "save-time fingerprint"), (4, "commit_success.txt is missing")):
    assert f"checkpoint {os.path.join(ckpts, str(step))} is incomplete or corrupt" in done.stderr
    assert why in done.stderr
    assert len(glob.glob(os.path.join(ckpts + ".quarantine", f"{step}-*"))) == 1
  # Resumed from 2, redid 3..6 and saved 4 and 6 again.
  assert _finalized_steps(workdir) == [0, 2, 4, 6]
  _assert_same_run(workdir, reference)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_boundary(env):
  """Multi-process: JAX's preemption notifier takes the SIGTERM and orbax's
  `reached_preemption` makes both processes stop at the same chunk boundary."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  worker = os.path.join(ROOT, "tests", "training", "preemption_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)[1][-3000:]
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  lines = [out.strip().splitlines()[-1] for out, _ in outs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  assert lines[0].startswith("stopped at ") and lines[0] == lines[1], lines
