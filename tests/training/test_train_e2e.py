"""End to end through the host loop on a tiny config: every algorithm, exact resume,
and the stop on repeated non-finite updates."""

import os

import chex
import numpy as np
import pytest

from egpo_jax.training import config as config_lib
from egpo_jax.training import experiment
from egpo_jax.training import train as train_lib
from egpo_jax.training.metrics import read_jsonl
from experiments.configs import tiny

pytestmark = pytest.mark.slow


def tiny_config(**overrides):
  return config_lib.with_overrides(tiny.get_config(), overrides)


ALGORITHMS = {
    "grpo": {"algo.advantage": "grpo"},
    "dr_grpo": {"algo.advantage": "dr_grpo", "loss.aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"algo.advantage": "grpo", "loss.eps_high": 0.28,
             "dynamic_sampling.enabled": True, "dynamic_sampling.oversample": 2,
             "loss.overlong_buffer": 4},
    "edge_grpo": {"algo.advantage": "edge_grpo"},
    "egpo": {"algo.advantage": "egpo", "ppo.micro_batches": 2},
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_runs_end_to_end(tmp_path, name):
  summary = train_lib.train(tiny_config(**ALGORITHMS[name]), str(tmp_path), progress=False)
  rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("accuracy", "reward", "loss", "grad_norm", "frac_all_wrong", "entropy_gap",
              "mean_weight_wrong", "clipfrac_high", "response_length", "logp_mismatch",
              "dynamic_sampling_fill_rate", "seconds_per_iteration"):
    assert all(r.get(key) is not None and np.isfinite(r[key]) for r in rows), key
  assert 0.0 <= summary["eval_after_rl"]["accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "curves.png")
  assert os.path.exists(tmp_path / "summary.json")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0", "2"]
  if name == "grpo":
    assert all(r["frac_nsr_only_adv"] == 0.0 for r in rows)
  if name == "egpo":
    # NSR gives every response of an all-wrong group a non-zero advantage.
    assert all(r["frac_nsr_only_adv"] == pytest.approx(r["frac_all_wrong"]) for r in rows)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  c = tiny_config(**{"train.iterations": 4, "train.iterations_per_call": 2})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_lib.train(c, straight, progress=False)
  assert train_lib.train(c, resumed, progress=False, stop_at_iteration=2) is None
  assert read_jsonl(os.path.join(resumed, "metrics.jsonl"))[-1]["step"] == 2
  train_lib.train(c, resumed, progress=False)

  step_a, state_a, _ = experiment.read_train_state(straight)
  step_b, state_b, _ = experiment.read_train_state(resumed)
  assert step_a == step_b == 4
  chex.assert_trees_all_equal(state_a.params, state_b.params)   # bitwise on CPU
  chex.assert_trees_all_equal(state_a.opt_state, state_b.opt_state)
  rows_a = read_jsonl(os.path.join(straight, "metrics.jsonl"))
  rows_b = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
  for ra, rb in zip(rows_a, rows_b):
    assert ra["loss"] == rb["loss"] and ra["accuracy"] == rb["accuracy"]


def test_repeated_nonfinite_updates_stop_the_run(tmp_path):
  # A huge learning rate blows the parameters up after one step; every later loss is
  # non-finite, those updates are skipped, and the run stops with a clear message.
  c = tiny_config(**{"optim.lr": 1e38, "train.iterations": 6, "train.iterations_per_call": 1,
                     "train.max_consecutive_nonfinite": 2, "warmup.steps": 0})
  with pytest.raises(train_lib.NonFiniteError, match="consecutive updates"):
    train_lib.train(c, str(tmp_path), progress=False)
  rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows[-1]["skipped_nonfinite"] == 1.0


def test_bad_config_names_the_field(tmp_path):
  with pytest.raises(ValueError, match="rollout.group_size"):
    train_lib.train(tiny_config(**{"rollout.group_size": 1}), str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="algo.advantage"):
    train_lib.train(tiny_config(**{"algo.advantage": "ppo"}), str(tmp_path), progress=False)
