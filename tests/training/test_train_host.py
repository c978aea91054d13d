"""The host-verified path end to end: a Hugging Face checkpoint folder and a training
JSONL (the way a user brings a real model and OpenR1-style data), rewards from the
math-verify worker pool, and an exact resume of the data iterator."""

import json
import os

import chex
import pytest

from egpo_jax.training import config as config_lib
from egpo_jax.training import train as train_lib
from egpo_jax.training.metrics import read_jsonl
from experiments.configs import default

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, write_user_files):
  root = tmp_path_factory.mktemp("user")
  model_dir, train_file = write_user_files(root, 24)
  with open(train_file, "a") as f:
    f.write("{not json\n")                        # a bad record: skipped and counted
    f.write(json.dumps({"problem": "1+1="}) + "\n")  # no answer: skipped and counted
  return model_dir, train_file


def host_config(model_dir, train_file, **overrides):
  return config_lib.with_overrides(default.get_config(), {
      "model.preset": "hf", "model.path": model_dir, "task.name": "jsonl",
      "task.train_file": train_file, "task.reward": "math", "task.template": "plain",
      "task.max_prompt_len": 32, "rollout.prompts_per_batch": 4, "rollout.group_size": 4,
      "rollout.max_new_tokens": 8, "warmup.steps": 0, "train.iterations": 4,
      "train.iterations_per_call": 1, "train.checkpoint_every": 2,
      "train.tensorboard": False, "dynamic_sampling.max_tries": 2, **overrides})


def test_host_mode_trains_and_resumes_exactly(tmp_path, user_files):
  c = host_config(*user_files)
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  with pytest.warns(UserWarning, match="2 of 26 records are bad"):
    train_lib.train(c, straight, progress=False)
  rows = read_jsonl(os.path.join(straight, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("time_rollout", "time_verify", "time_update", "rollout_tokens_per_s"):
    assert all(r[key] > 0 for r in rows), key
  with open(os.path.join(straight, "data_report.json")) as f:
    report = json.load(f)
  with open(os.path.join(straight, "summary.json")) as f:
    assert json.load(f)["data"] == report   # the read report is saved and counted
  assert (report["total"], report["num_bad"], report["kept"]) == (26, 2, 24)

  with pytest.warns(UserWarning):
    assert train_lib.train(c, resumed, progress=False, stop_at_iteration=2) is None
    train_lib.train(c, resumed, progress=False)
  _, state_a, extra_a = train_lib.load_checkpoint(straight)
  _, state_b, extra_b = train_lib.load_checkpoint(resumed)
  chex.assert_trees_all_equal(state_a.params, state_b.params)
  assert extra_a["data"] == extra_b["data"]   # the data iterator resumed where it stopped


def test_host_mode_dynamic_sampling_and_kl(tmp_path, user_files):
  c = host_config(*user_files, **{
      "train.iterations": 1, "dynamic_sampling.enabled": True,
      "dynamic_sampling.oversample": 2, "loss.kl_coef": 0.1, "algo.advantage": "grpo"})
  with pytest.warns(UserWarning):
    train_lib.train(c, str(tmp_path), progress=False)
  (row,) = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert 1 <= row["dynamic_sampling_tries"] <= 2
  assert 0.0 <= row["dynamic_sampling_fill_rate"] <= 1.0
  assert row["kl_ref"] is not None


def test_missing_train_file_is_named(tmp_path, user_files):
  with pytest.raises(ValueError, match="task.train_file"):
    train_lib.train(host_config(user_files[0], ""), str(tmp_path), progress=False)
