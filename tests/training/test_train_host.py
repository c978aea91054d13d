"""The host-verified path end to end: a Hugging Face checkpoint folder and a training
JSONL (the way a user brings a real model and OpenR1-style data), rewards from the
math-verify worker pool, and an exact resume of the data iterator."""

import json
import os

import chex
import pytest

from egpo_jax.evaluation import report
from egpo_jax.training import config as config_lib
from egpo_jax.training import experiment
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
  _, state_a, extra_a = experiment.read_train_state(straight)
  _, state_b, extra_b = experiment.read_train_state(resumed)
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


def _numbers(table: str, row: str) -> list[float]:
  """The before and after cells of one row of the printed table, as floats."""
  (line,) = [l for l in table.splitlines() if l.startswith(row)]
  return [float(x) for x in line[len(row):].split()]


def test_host_mode_evaluates_a_held_out_jsonl_before_during_and_after(tmp_path, user_files):
  # A held-out JSONL of 6 problems, evaluated in batches of prompts_per_batch=4 (the last
  # batch padded), 4 samples each: before RL, at every iteration and after.
  held_out = tmp_path / "held_out.jsonl"
  with open(user_files[1]) as src, open(held_out, "w") as dst:
    dst.writelines(src.readlines()[:6])
  c = host_config(*user_files, **{"train.iterations": 2, "train.eval_every": 1,
                                  "train.eval_set": str(held_out), "train.eval_prompts": 6})
  workdir = str(tmp_path / "run")
  with pytest.warns(UserWarning):
    summary = train_lib.train(c, workdir, progress=False)
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:   # the jitted mode's validation metrics, and the evaluation's time
    assert r["val_num_responses"] == 24 and 0.0 <= r["val_accuracy"] <= 1.0, r
    assert r["val_pass@4"] >= r["val_pass@1"] and r["val_response_length"] > 0
    assert r["val_seconds"] > 0
  before, after = summary["eval_before_rl"], summary["eval_after_rl"]
  assert before["num_responses"] == after["num_responses"] == 24
  assert after["accuracy"] == rows[-1]["val_accuracy"]   # the last validation is "after"
  table = report.before_after_table(summary)
  for row in ("accuracy (sampled, pass@1)", "ECE (equal-mass bins)", "mean response length"):
    assert len(_numbers(table, row)) == 2, table
  assert "not run" not in table

  # Without a held-out set there is nothing to evaluate, and the table says so.
  c = host_config(*user_files, **{"train.iterations": 1})
  with pytest.warns(UserWarning):
    summary = train_lib.train(c, str(tmp_path / "none"), progress=False)
  assert summary["eval_before_rl"] == summary["eval_after_rl"] == {}
  assert "not run" in report.before_after_table(summary)
  assert "train.eval_set" in report.before_after_table(summary)


def test_a_bad_held_out_set_is_named_before_anything_is_written(tmp_path, user_files):
  c = host_config(*user_files, **{"train.eval_set": str(tmp_path / "missing.jsonl")})
  with pytest.raises(config_lib.ConfigError, match="config.train.eval_set="):
    train_lib.train(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
