"""The held-out set of host mode's evaluation (`validation.held_out_set`): which problems
are kept, how they are padded, and bad sets named by their field; per-record caps
(task.max_new_tokens_field) read as in training and honoured by the evaluation
(`validation.evaluate_held_out`) on continuous batching, refused by the static sampler."""

import json
import types

import jax
import numpy as np
import pytest

from egpo_jax.models import transformer
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import config as config_lib
from egpo_jax.training import validation
from experiments.configs import default


def _config(eval_set, **overrides):
  return config_lib.with_overrides(default.get_config(), {
      "task.template": "plain", "task.max_prompt_len": 12, "task.reward": "math",
      "train.eval_set": eval_set, **overrides})


def _write(path, problems):
  with open(path, "w") as f:
    for i, p in enumerate(problems):
      f.write(json.dumps({"problem": p, "answer": str(i)}) + "\n")
  return str(path)


def test_the_first_problems_that_fit_are_kept_left_padded(tmp_path):
  tok = ByteTokenizer()
  path = _write(tmp_path / "held.jsonl", ["1+1=", "x" * 40, "22+3=", "4=", "5+5="])
  held = validation.held_out_set(_config(path, **{"train.eval_prompts": 3}), tok)
  # "x" * 40 is over task.max_prompt_len=12 tokens: skipped; the first 3 that fit kept.
  assert held.answers_B == ("0", "2", "3") and held.skipped == 1
  assert held.verifiers_B == ("math",) * 3
  lengths = held.mask_BxP.sum(1)
  assert held.ids_BxP.shape == (3, lengths.max())
  width = held.ids_BxP.shape[1]
  for row, text in enumerate(["1+1=", "22+3=", "4="]):
    pad = width - lengths[row]
    assert tok.decode(held.ids_BxP[row, pad:].tolist()) == text
    assert (held.ids_BxP[row, :pad] == tok.pad_id).all()
    assert held.mask_BxP[row, pad:].all() and not held.mask_BxP[row, :pad].any()


def test_a_benchmark_name_reads_the_benchmark_with_its_own_verifier():
  c = _config("synthetic", **{"train.eval_prompts": 5, "task.max_prompt_len": 64})
  held = validation.held_out_set(c, ByteTokenizer())
  assert len(held.answers_B) == 5 and set(held.verifiers_B) == {"synthetic"}
  assert np.all(held.mask_BxP.sum(1) > 0)


def test_a_set_where_nothing_fits_is_named(tmp_path):
  path = _write(tmp_path / "long.jsonl", ["y" * 50])
  with pytest.raises(ValueError, match="train.eval_set=.*task.max_prompt_len"):
    validation.held_out_set(_config(path), ByteTokenizer())


def test_the_field_accepts_a_benchmark_or_an_existing_jsonl_only(tmp_path):
  config_lib.validate(_config("math500"))
  config_lib.validate(_config(_write(tmp_path / "ok.jsonl", ["1="])))
  for bad in ("math5000", str(tmp_path / "absent.jsonl"), str(tmp_path)):
    with pytest.raises(config_lib.ConfigError, match="config.train.eval_set="):
      config_lib.validate(_config(bad))
  # A finished run's config.json is read without its inputs.
  config_lib.validate(_config(str(tmp_path / "gone.jsonl")), inputs_exist=False)


# ------------------------------------------------------------------ per-record caps

T = 6


def _write_capped(path, caps):
  with open(path, "w") as f:
    for i, cap in enumerate(caps):
      f.write(json.dumps({"problem": f"{i}+{i}=", "answer": str(2 * i),
                          **({} if cap is None else {"budget": cap})}) + "\n")
  return str(path)


def _capped_config(path, field="budget"):
  return _config(path, **{"train.eval_prompts": 3, "rollout.max_new_tokens": T,
                          "task.max_new_tokens_field": field})


def test_held_out_caps_are_read_as_in_training(tmp_path):
  path = _write_capped(tmp_path / "held.jsonl", [2, None, T + 3, 4, 5])
  held = validation.held_out_set(_capped_config(path), ByteTokenizer())
  # The cap over rollout.max_new_tokens is skipped; a record without one gets T.
  assert held.answers_B == ("0", "2", "6") and held.skipped == 1
  np.testing.assert_array_equal(held.caps_B, [2, T, 4])
  assert held.caps_B.dtype == np.int32
  uncapped = validation.held_out_set(_capped_config(path, field=""), ByteTokenizer())
  assert uncapped.caps_B is None and uncapped.answers_B == ("0", "2", "4")


CFG = get_config("tiny")


def _evaluate(held, spec):
  """(metrics, ids_NxT, lengths_N) of an evaluation in batches of 2 (3 problems: the
  second batch is padded with a repeat), as its scorer saw them."""
  seen = []

  def score(ids, mask, answers):
    seen.append((np.asarray(ids), np.asarray(mask).sum(1)))
    return np.asarray([i % 2 == 0 for i in range(len(answers))])

  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  out = validation.evaluate_held_out(params, jax.random.PRNGKey(4), held, model_config=CFG,
                                     spec=spec, tokenizer=ByteTokenizer(), batch_size=2,
                                     score=score)
  return out, seen[0][0], seen[0][1]


def test_evaluation_stops_each_response_at_its_problems_cap(tmp_path):
  g = validation.EVAL_SAMPLES
  held = validation.held_out_set(
      _capped_config(_write_capped(tmp_path / "held.jsonl", [2, None, 4])), ByteTokenizer())
  # No stop token: every response runs to its cap (T without one).
  sampling = engine.SamplingSpec(group_size=g, max_new_tokens=T, eos_ids=())
  slots = continuous.ContinuousSpec(sampling, slots=3)
  out, ids, lengths = _evaluate(held, slots)
  np.testing.assert_array_equal(lengths, np.repeat([2, T, 4], g))   # the scorer's rows
  # The same random streams as the uncapped evaluation, stopped at the caps.
  held_t = validation.held_out_set(
      _capped_config(_write_capped(tmp_path / "t.jsonl", [2, None, 4]), field=""),
      ByteTokenizer())
  _, ids_t, lengths_t = _evaluate(held_t, slots)
  assert (lengths_t == T).all()
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(ids[row, :n], ids_t[row, :n])
  # The static sampler draws the same streams, and cannot cap: refused, naming the field.
  _, ids_static, _ = _evaluate(held_t, sampling)
  np.testing.assert_array_equal(ids_static, ids_t)
  with pytest.raises(ValueError, match=r"^per-record response caps \(config\.task\."
                                       r"max_new_tokens_field\) need continuous batching: "
                                       r"set rollout\.slots > 0"):
    _evaluate(held, sampling)
  # The metrics see the capped lengths; a response at its own cap is truncated, as in
  # training (loss.mask_truncated).
  assert out["response_length"] == (2 + T + 4) / 3 and out["truncation_rate"] == 1.0


def test_the_validator_samples_held_out_problems_as_training_does(tmp_path):
  """`validator` with rollout.slots > 0 evaluates on continuous batching, so the held-out
  records' caps hold (with slots 0 the config refuses the field: test_record_caps)."""
  path = _write_capped(tmp_path / "held.jsonl", [2, None, 4])
  c = config_lib.with_overrides(_capped_config(path), {"rollout.slots": 3})
  exp = types.SimpleNamespace(
      jitted=False, model_config=CFG, tokenizer=ByteTokenizer(),
      settings=types.SimpleNamespace(sampling=engine.SamplingSpec(
          group_size=2, max_new_tokens=T, eos_ids=())))
  evaluate = validation.validator(c, exp, jax.random.PRNGKey(4))
  out = evaluate(transformer.init_params(CFG, jax.random.PRNGKey(0)))
  assert out["response_length"] == (2 + T + 4) / 3 and out["truncation_rate"] == 1.0
