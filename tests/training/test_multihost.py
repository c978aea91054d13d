"""Two processes on one machine (2 x 4 fake CPU devices, jax.distributed on 127.0.0.1)
train the host-verified task exactly as one process with 8 devices does, each process
reading and verifying only its own half of every batch, metrics written once, and an
orbax checkpoint written by both.

The three workers (`multihost_worker.py`) run at once; each has a timeout, so a process
that never reaches the coordinator fails the test instead of hanging CI.
"""

import json
import os
import socket
import subprocess
import sys

import chex
import pytest

from egpo_jax.training import experiment
from egpo_jax.training import train as train_lib
from egpo_jax.training.metrics import read_jsonl

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 420
B, G, ITERATIONS = 4, 4, 2   # as in multihost_worker.py


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp, name, **spec):
  spec = {**spec, "workdir": str(tmp / f"work_{spec['workdir']}"),
          "out": str(tmp / f"{name}.json")}
  path = tmp / f"{name}_spec.json"
  path.write_text(json.dumps(spec))
  log = open(tmp / f"{name}.log", "w")
  env = dict(os.environ)   # the suite's XLA flags; the worker sets its own device count
  proc = subprocess.Popen([sys.executable, WORKER, str(path)], stdout=log,
                          stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(WORKER))
  return name, proc, spec


def _wait(tmp, launched):
  """Waits for every worker; on a timeout or failure kills the rest and fails with logs."""
  failed = []
  for name, proc, _ in launched:
    try:
      if proc.wait(timeout=TIMEOUT_S) != 0:
        failed.append(name)
    except subprocess.TimeoutExpired:
      failed.append(f"{name} (timed out after {TIMEOUT_S} s)")
  if failed:
    for _, proc, _ in launched:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    logs = "\n".join(f"--- {n}\n" + (tmp / f"{n}.log").read_text()[-3000:]
                     for n, _, _ in launched)
    pytest.fail(f"workers failed: {failed}\n{logs}")
  return {name: json.loads(open(spec["out"]).read()) for name, _, spec in launched}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_user_files):
  tmp = tmp_path_factory.mktemp("multihost")
  model_dir, train_file = write_user_files(tmp, 16)
  common = {"model_dir": model_dir, "train_file": train_file}
  port = _free_port()
  launched = [
      _launch(tmp, "single", devices=8, num_processes=1, process_id=0, port=0,
              workdir="single", **common),
      *(_launch(tmp, f"proc{i}", devices=4, num_processes=2, process_id=i, port=port,
                workdir="multi", **common) for i in range(2))]
  return tmp, _wait(tmp, launched)


def test_each_process_handles_its_own_share(runs):
  _, out = runs
  assert out["single"]["process_count"] == 1 and out["single"]["device_count"] == 8
  assert out["single"]["share"] == {"process_index": 0, "process_prompts": ITERATIONS * B,
                                    "process_rollouts": ITERATIONS * B * G,
                                    "process_verified": ITERATIONS * B * G}
  for i in range(2):
    o = out[f"proc{i}"]
    assert (o["process_index"], o["process_count"]) == (i, 2)
    assert (o["device_count"], o["local_device_count"]) == (8, 4)
    # Half of every batch: B/2 prompts read, their B/2 x G responses decoded and verified.
    assert o["share"] == {"process_index": i, "process_prompts": ITERATIONS * B // 2,
                          "process_rollouts": ITERATIONS * B * G // 2,
                          "process_verified": ITERATIONS * B * G // 2}


def test_two_processes_train_like_one(runs):
  tmp, _ = runs
  single, multi = str(tmp / "work_single"), str(tmp / "work_multi")
  step_s, state_s, extra_s = experiment.read_train_state(single)
  step_m, state_m, extra_m = experiment.read_train_state(multi)
  assert step_s == step_m == ITERATIONS
  # Same global batches and per-response keys, so the same responses; the update differs
  # only in the order of its float32 reductions over the mesh.
  chex.assert_trees_all_close(state_m.params, state_s.params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(state_m.opt_state, state_s.opt_state, atol=1e-6, rtol=1e-5)
  # Each of the 2 processes read half as many records as the single one.
  assert 2 * extra_m["data"]["grain"]["next_index"] == extra_s["data"]["grain"]["next_index"]
  rows_s = read_jsonl(os.path.join(single, "metrics.jsonl"))
  rows_m = read_jsonl(os.path.join(multi, "metrics.jsonl"))
  # Written once (by process 0): one row per iteration, not one per process.
  assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == [1, 2]
  for rs, rm in zip(rows_s, rows_m):
    for key in ("accuracy", "reward", "response_length", "rollout_tokens"):
      assert rm[key] == rs[key], key
    assert rm["loss"] == pytest.approx(rs["loss"], abs=1e-6)
    # The metrics row is process 0's: its half of the verification.
    assert rm["process_verified"] * 2 == rs["process_verified"] == B * G
  assert os.path.exists(os.path.join(multi, "summary.json"))
