"""Continuous batching (rollout.slots > 0) across two processes (2 x 4 fake CPU devices,
jax.distributed on 127.0.0.1) trains exactly as one process with the same 8 devices: the
same responses, rewards and params. Two layouts: on its own rollout mesh (rollout.tensor
= 2, the training mesh's tensor = 1) with a prompt table of fewer entries than prompts,
and on the training mesh with prompts cut to their bucket; and the static sampler on the
rollout's own mesh (`distributed.RolloutOnMesh` moves the replicated key there). They cover what crosses
processes: the prompt bucket of the longest prompt of all processes (padded up in one,
cut down in the other), per-record caps (task.max_new_tokens_field) gathered into the
global queue, and the chunked loop (rollout.chunk_steps) streaming each process's own
finished rows to its verifier.

The harness (workers, timeouts, logs on failure) is `test_multihost.py`'s.
"""

import json
import os

import chex
import numpy as np
import pytest
from test_multihost import _free_port, _launch, _wait

from egpo_jax.training import config as config_lib
from egpo_jax.training import experiment
from egpo_jax.training import host_loop
from egpo_jax.training.metrics import read_jsonl

B, G, ITERATIONS, T = 4, 4, 2, 6   # as in multihost_worker.py
LAYOUTS = {
    # Prompts of 17-24 tokens padded up to their bucket of 32 (max_prompt_len 24).
    "rollout_mesh": {"rollout.slots": 8, "rollout.tensor": 2, "rollout.chunk_steps": 2,
                     "rollout.table_entries": 2, "task.max_new_tokens_field": "budget"},
    # Cut down from max_prompt_len 40 to the bucket of 32.
    "train_mesh": {"rollout.slots": 4, "rollout.chunk_steps": 3,
                   "rollout.decode_attention": "full", "task.max_prompt_len": 40,
                   "task.max_new_tokens_field": "budget"},
    # The static sampler on the rollout's own mesh (no caps: they need slots).
    "static_rollout_mesh": {"rollout.tensor": 2},
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def runs(request, tmp_path_factory, write_user_files):
  tmp = tmp_path_factory.mktemp(f"multihost_continuous_{request.param}")
  model_dir, train_file = write_user_files(tmp, 16)
  # Per-record caps 2..T: rows of one batch stop at different steps on every process.
  lines = open(train_file).read().splitlines()
  with open(train_file, "w") as f:
    for i, line in enumerate(lines):
      f.write(json.dumps({**json.loads(line), "budget": 2 + i % (T - 1)}) + "\n")
  common = {"model_dir": model_dir, "train_file": train_file,
            "overrides": LAYOUTS[request.param]}
  port = _free_port()
  launched = [
      _launch(tmp, "single", devices=8, num_processes=1, process_id=0, port=0,
              workdir="single", **common),
      *(_launch(tmp, f"proc{i}", devices=4, num_processes=2, process_id=i, port=port,
                workdir="multi", **common) for i in range(2))]
  return request.param, tmp, _wait(tmp, launched)


def test_config_accepts_continuous_batching_across_processes():
  from experiments.configs import default  # pylint: disable=import-outside-toplevel
  c = config_lib.with_overrides(default.get_config(), {
      "rollout.slots": 8, "rollout.tensor": 2, "task.name": "jsonl",
      "task.train_file": "x.jsonl", "warmup.steps": 0, "distributed.num_processes": 2})
  config_lib.validate(c, inputs_exist=False)


def test_streaming_verifier_takes_its_own_block():
  """Rows outside the process's block [4, 8) go to other processes; a row of the block
  never reported fails the result instead of counting as wrong."""
  score = lambda ids, mask, answers: np.asarray([row[0] == a for row, a in zip(ids, answers)])
  task = host_loop.HostTask(sample_prompts=None, score=score)
  resp_R = np.asarray([2, 4, 5, 6, 7, 9])          # global rows
  ids_RxT = np.repeat(np.arange(6, dtype=np.int32)[:, None], 3, axis=1)   # row r: token r
  lengths_R = np.asarray([3, 1, 2, 3, 1, 2], np.int32)
  stream = host_loop.StreamingVerifier(task, [1, 0, 3, 9], pad_id=0)
  host_loop._submit_own(stream, 4, resp_R, ids_RxT, lengths_R)
  correct, lengths = stream.result()
  # Local rows 0..3 are reported rows 1..4: first tokens 1, 2, 3, 4.
  np.testing.assert_array_equal(correct, [True, False, True, False])
  np.testing.assert_array_equal(lengths, [1, 2, 3, 1])
  partial = host_loop.StreamingVerifier(task, [0, 1, 2, 3], pad_id=0)
  host_loop._submit_own(partial, 4, np.asarray([4, 6]), ids_RxT[:2], lengths_R[:2])
  with pytest.raises(RuntimeError, match=r"never reported .* \[1, 3\]"):
    partial.result()


@pytest.mark.slow
def test_two_processes_roll_out_continuously_like_one(runs):
  layout, tmp, out = runs
  for i in range(2):
    # Each process verified only its own half of every batch (streamed to its verifier).
    assert out[f"proc{i}"]["share"]["process_verified"] == ITERATIONS * B * G // 2
  single, multi = str(tmp / "work_single"), str(tmp / "work_multi")
  step_s, state_s, _ = experiment.read_train_state(single)
  step_m, state_m, _ = experiment.read_train_state(multi)
  assert step_s == step_m == ITERATIONS
  chex.assert_trees_all_close(state_m.params, state_s.params, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(state_m.opt_state, state_s.opt_state, atol=1e-6, rtol=1e-5)
  rows_s = read_jsonl(os.path.join(single, "metrics.jsonl"))
  rows_m = read_jsonl(os.path.join(multi, "metrics.jsonl"))
  assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == [1, 2]
  for rs, rm in zip(rows_s, rows_m):
    # The same responses (lengths, tokens, rewards) from the same global queue.
    continuous = "rollout.slots" in LAYOUTS[layout]
    for key in ("accuracy", "reward", "response_length", "rollout_tokens") + (
        ("rollout_steps", "prompt_bucket", "slot_utilisation") if continuous else ()):
      assert rm[key] == rs[key], key
    assert rm["loss"] == pytest.approx(rs["loss"], abs=1e-6)
    # Per-record caps (2..T) cut responses short, so the caps reached the queue.
    assert rs["response_length"] < T or not continuous
  if continuous:
    # Prompts of 17-24 tokens, bucket 32: HostRollout keeps all 24 columns (generate pads
    # them), or cuts 40 down to 32.
    assert rows_m[0]["prompt_bucket"] == {"rollout_mesh": 24, "train_mesh": 32}[layout]
