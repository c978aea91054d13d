"""PromptIterator: padding, epochs and shuffling, host shards, bad records, exact resume."""

import json
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from egpo_jax.data import builders, records, templates
from egpo_jax.data.loader import PromptIterator
from egpo_jax.models.byte_tokenizer import BOS_ID, ByteTokenizer

tfds.disable_progress_bar()
TOK = ByteTokenizer()
ENCODE = templates.encoder(TOK, "plain", chat=False, add_bos=True)
N = 23


def _source(n=N, long_ids=()):
  """Records as tfds returns them (text as bytes)."""
  return [{"id": f"r{i}".encode(), "problem": (("x" * 40) if i in long_ids else f"{i}+1=").encode(),
           "answer": str(i + 1).encode(), "verifier": b"synthetic", "level": np.int32(-1)}
          for i in range(n)]


def _make(source=None, **kw):
  args = dict(batch_size=4, max_prompt_len=8, encode=ENCODE, seed=7, shard_index=0,
              shard_count=1)
  args.update(kw)
  return PromptIterator(_source() if source is None else source, **args)


def test_batches_are_left_padded_prompts():
  batch = next(_make())
  assert batch["prompt_ids"].shape == (4, 8) and batch["prompt_ids"].dtype == np.int32
  assert batch["prompt_mask"].dtype == np.bool_
  for ids, mask, answer, index in zip(batch["prompt_ids"], batch["prompt_mask"],
                                      batch["answer"], batch["index"]):
    assert (np.diff(mask.astype(int)) >= 0).all() and (ids[~mask] == 0).all()
    assert ids[mask][0] == BOS_ID
    assert TOK.decode(ids[mask]) == f"{index}+1="
    assert answer == str(index + 1)
  assert list(batch["verifier"]) == ["synthetic"] * 4


def test_epochs_cover_every_record_once_in_a_new_order():
  it = _make(num_epochs=2, batch_size=1, drop_remainder=False)
  seen = [int(b["index"][0]) for b in it]
  first, second = seen[:N], seen[N:]
  assert sorted(first) == sorted(second) == list(range(N))
  assert first != second and first != list(range(N))
  again = [int(b["index"][0]) for b in _make(num_epochs=2, batch_size=1, drop_remainder=False)]
  assert again == seen
  other = [int(b["index"][0]) for b in _make(num_epochs=1, batch_size=1, seed=8,
                                               drop_remainder=False)]
  assert other != first
  plain = [int(b["index"][0]) for b in _make(num_epochs=1, batch_size=1, shuffle=False,
                                               drop_remainder=False)]
  assert plain == list(range(N))


def test_shards_are_disjoint_equal_and_cover_the_trimmed_records():
  shards = [[int(i) for b in _make(num_epochs=1, batch_size=1, shard_index=k, shard_count=3)
             for i in b["index"]] for k in range(3)]
  assert len({len(s) for s in shards}) == 1 and len(shards[0]) == N // 3
  union = set().union(*map(set, shards))
  assert len(union) == 3 * (N // 3)
  with pytest.raises(ValueError, match="shard_index=3"):
    _make(shard_index=3, shard_count=3)


def test_state_round_trips_through_json_and_resumes_with_the_next_batch():
  it = _make(num_epochs=None)
  for _ in range(7):  # crosses an epoch boundary (23 records, batches of 4)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]
  restored = _make(num_epochs=None)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["prompt_ids"], want["prompt_ids"])


def test_restoring_into_a_different_iterator_is_refused():
  state = _make().get_state()
  with pytest.raises(ValueError, match="seed"):
    _make(seed=8).set_state(state)
  with pytest.raises(ValueError, match="get_state"):
    _make().set_state({"next_index": 3})


def test_too_long_and_undecodable_records_are_skipped_and_counted():
  source = _source(long_ids=(3, 9))
  source[5]["problem"] = b"caf\xe9"
  with pytest.warns(records.BadRecordWarning, match="3 of 23 records are bad") as caught:
    it = _make(source, num_epochs=1, batch_size=1, drop_remainder=False)
  message = str(caught[0].message)
  assert "r3: prompt has 41 tokens, over max_prompt_len=8" in message
  assert "r5" in message and "UTF-8" in message
  assert it.report.num_bad == 3 and it.num_records == 20
  assert sorted(int(b["index"][0]) for b in it) == sorted(set(range(N)) - {3, 5, 9})
  with pytest.raises(records.RecordError, match="3 of 23 records are bad"):
    _make(source, on_bad_record="raise")


def test_argument_errors():
  with pytest.raises(ValueError, match="batch_size"):
    _make(batch_size=0)
  with pytest.raises(ValueError, match="fewer than batch_size=30"):
    _make(batch_size=30)
  with pytest.raises(ValueError, match="on_bad_record"):
    _make(on_bad_record="ignore")


def test_reads_a_tfds_source_with_a_chat_template(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)})
                            for i in range(6)))
  cfg = builders.JsonlConfig(name="tiny", files={"train": str(path)})
  src = builders.prepare(builders.Jsonl, "train", data_dir=str(tmp_path / "tfds"), config=cfg)
  encode = templates.encoder(TOK, "qwen25_math")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    it = PromptIterator(src, batch_size=3, max_prompt_len=160, encode=encode, seed=0,
                        shard_index=0, shard_count=1)
  batch = next(it)
  text = TOK.decode(batch["prompt_ids"][0][batch["prompt_mask"][0]])
  assert text.startswith("system: " + templates.BOXED_INSTRUCTION + "\nuser: What is ")
  assert text.endswith("\nassistant: ")
  assert sorted(batch["answer"].tolist()) == sorted(
      str(2 * int(i)) for i in batch["index"])


def test_templates():
  msgs = templates.messages("1+1?", "qwen25_math")
  assert msgs == [{"role": "system", "content": templates.BOXED_INSTRUCTION},
                  {"role": "user", "content": "1+1?"}]
  r1 = templates.messages("1+1?", "r1_distill")
  assert r1 == [{"role": "user", "content": "1+1?\n" + templates.BOXED_INSTRUCTION}]
  assert templates.render("1+1?", TOK, "r1_distill").endswith("assistant: <think>\n")
  mc = templates.messages("Pick\nAnswer Choices: (A) x (B) y", "qwen25_math",
                          verifier="multiple_choice")
  assert "letter" in mc[0]["content"] and "\\boxed{}" in mc[0]["content"]
  assert templates.raw_prompt("1+1?", "qwen25_math") == (
      "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n")
  assert templates.raw_prompt("7+8=", "plain") == "7+8="
  with pytest.raises(ValueError, match="unknown prompt template 'llama'"):
    templates.messages("x", "llama")
  with pytest.raises(ValueError, match="non-empty"):
    templates.messages("  ", "qwen25_math")
