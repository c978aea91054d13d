"""The held-out set of host mode's evaluation (`validation.held_out_set`): which problems
are kept, how they are padded, and bad sets named by their field."""

import json

import numpy as np
import pytest

from egpo_jax.models.byte_tokenizer import ByteTokenizer
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
