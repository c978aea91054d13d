"""tfds builders on small files: bad records, a user's JSONL, the download path against a
local HTTP server, and the synthetic builder against the jnp generator."""

import functools
import http.server
import json
import os
import threading
import warnings

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from egpo_jax.data import builders, records, synthetic
from egpo_jax.data.loader import decode_record
from egpo_jax.models.byte_tokenizer import ByteTokenizer

tfds.disable_progress_bar()


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((json.dumps(line) if isinstance(line, dict) else line).encode()
              if not isinstance(line, bytes) else line)
      f.write(b"\n")


GOOD = [{"uid": f"u{i}", "question": f"What is {i}+1?", "final": f"\\boxed{{{i + 1}}}"}
        for i in range(4)]
BAD = [
    {"uid": "no-answer", "question": "What?"},
    {"uid": "empty", "question": "What?", "final": "\\boxed{}"},
    b'{"uid": "latin1", "question": "caf\xe9", "final": "\\\\boxed{1}"}',
    b"{not json",
    {"uid": "long", "question": "x" * 500, "final": "\\boxed{1}"},
    {"uid": "unbalanced", "question": "What?", "final": "\\boxed{1"},
]


@pytest.fixture()
def user_jsonl(tmp_path):
  path = tmp_path / "train.jsonl"
  _write_lines(path, GOOD[:2] + BAD + GOOD[2:])
  return str(path)


def _config(name, path, **kw):
  return builders.JsonlConfig(name=name, files={"train": path}, problem_field="question",
                              answer_field="final", id_field="uid", answer_format="boxed",
                              max_problem_chars=200, **kw)


def test_user_jsonl_skips_bad_records_with_a_counted_warning(tmp_path, user_jsonl):
  with pytest.warns(records.BadRecordWarning, match="6 of 10 records are bad") as caught:
    src = builders.prepare(builders.Jsonl, "train", data_dir=str(tmp_path / "tfds"),
                           config=_config("skip", user_jsonl))
  message = str(caught[0].message)
  for rid in ("no-answer", "empty", "latin1", "line 6", "long", "unbalanced"):
    assert rid in message
  got = [decode_record(src[i]) for i in range(len(src))]
  assert [r["id"] for r in got] == ["u0", "u1", "u2", "u3"]
  assert [r["answer"] for r in got] == ["1", "2", "3", "4"]
  assert got[0]["problem"] == "What is 0+1?" and got[0]["verifier"] == "math"
  b = builders.Jsonl(data_dir=str(tmp_path / "tfds"), config=_config("skip", user_jsonl))
  report = b.info.metadata["bad_records"]["train"]
  assert report["num_bad"] == 6 and report["total"] == 10
  reasons = dict(report["bad"])
  assert "missing field 'final'" in reasons["no-answer"]
  assert "invalid UTF-8" in reasons["latin1"]
  assert "invalid JSON" in reasons["line 6"]
  assert "max_problem_chars=200" in reasons["long"]


def test_user_jsonl_rejects_bad_records_when_configured(tmp_path, user_jsonl):
  with pytest.raises(records.RecordError, match="6 of 10 records are bad"):
    builders.prepare(builders.Jsonl, "train", data_dir=str(tmp_path / "tfds"),
                     config=_config("strict", user_jsonl, on_bad_record="raise"))


def test_user_jsonl_config_errors(tmp_path):
  with pytest.raises(ValueError, match="files is empty"):
    builders.prepare(builders.Jsonl, "train", data_dir=str(tmp_path),
                     config=builders.JsonlConfig(name="nofiles"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    builders.prepare(builders.Jsonl, "train", data_dir=str(tmp_path),
                     config=builders.JsonlConfig(name="missing", files={"train": "/no/such"}))
  with pytest.raises(ValueError, match="unknown builder"):
    builders.prepare("gsm9k", "test", data_dir=str(tmp_path))


def test_record_parsers():
  assert records.gsm8k({"question": "q", "answer": "a\n#### 1,200"}, 3)["answer"] == "1200"
  with pytest.raises(records.RecordError, match="####"):
    records.gsm8k({"question": "q", "answer": "12"}, 0)
  m = records.minerva_math({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}} cm",
                            "idx": 7, "type": "Physics"}, 0)
  assert (m["answer"], m["id"], m["subject"]) == ("\\frac{1}{2}", "7", "Physics")
  q = records.mmlu_stem({"question": "Pick", "choices": ["x", "y"], "answer": 1,
                         "type": "bio"}, 4)
  assert q["answer"] == "B" and q["problem"] == "Pick\nAnswer Choices: (A) x (B) y"
  with pytest.raises(records.RecordError, match="not an index"):
    records.mmlu_stem({"question": "Pick", "choices": ["x"], "answer": 3}, 0)
  assert records.amc23({"id": 1, "problem": "p", "answer": 27.0}, 0)["answer"] == "27"
  assert records.amc23({"id": 1, "problem": "p", "answer": 0.5}, 0)["answer"] == "0.5"
  with pytest.raises(records.RecordError, match="finite"):
    records.amc23({"id": 1, "problem": "p", "answer": float("nan")}, 0)


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture()
def http_root(tmp_path):
  """Serves tmp_path/www on 127.0.0.1 from a thread; stops itself after 60 s at most."""
  root = tmp_path / "www"
  root.mkdir()
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  watchdog = threading.Timer(60.0, server.shutdown)
  watchdog.start()
  try:
    yield root, f"http://127.0.0.1:{server.server_port}"
  finally:
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_from_the_official_url_when_no_local_copy(tmp_path, http_root):
  root, base = http_root
  (root / "gsm8k").mkdir()
  rows = {"train": [{"question": "1+1?", "answer": "2\n#### 2"}],
          "test": [{"question": "2+2?", "answer": "4\n#### 4"},
                   {"question": "9*9?", "answer": "81\n#### 81"}]}
  for split, lines in rows.items():
    _write_lines(root / "gsm8k" / f"{split}.jsonl", lines)
  urls = {s: f"{base}/gsm8k/{s}.jsonl" for s in rows}
  empty_manual = tmp_path / "manual"
  empty_manual.mkdir()
  src = builders.prepare("egpo_gsm8k", None, data_dir=str(tmp_path / "tfds"),
                         manual_dir=str(empty_manual), urls=urls)
  assert len(src["train"]) == 1 and len(src["test"]) == 2
  assert [decode_record(src["test"][i])["answer"] for i in range(2)] == ["4", "81"]
  assert os.listdir(tmp_path / "tfds" / "downloads")


def test_download_failure_names_the_local_path_to_use(tmp_path, http_root):
  _, base = http_root
  with pytest.raises(FileNotFoundError, match="amc23/test.jsonl"):
    builders.prepare("egpo_amc23", "test", data_dir=str(tmp_path / "tfds"),
                     urls={"test": f"{base}/missing.jsonl"})


def test_synthetic_builder_matches_the_jnp_generator(tmp_path):
  n = 64  # one size for both splits: one compilation
  cfg = builders.SyntheticConfig(name="d2_s3", difficulty=2, seed=3, num_train=n, num_test=n)
  src = builders.prepare("egpo_synthetic_arithmetic", None, data_dir=str(tmp_path), config=cfg)
  assert (len(src["train"]), len(src["test"])) == (n, n)
  tok = ByteTokenizer()
  for split in ("train", "test"):
    key = builders.synthetic_split_key(3, split)
    p = jax.device_get(synthetic.sample_problems(key, n, difficulty=2))
    ids, mask, answers = map(np.asarray, synthetic.sample_prompts(
        key, n, difficulty=2, prompt_len=synthetic.max_prompt_len(2)))
    for i in range(n):
      rec = decode_record(src[split][i])
      assert rec["id"] == f"{split}/{i}" and rec["verifier"] == "synthetic"
      assert rec["problem"] == tok.decode(ids[i][mask[i]])
      assert rec["answer"] == str(answers[i])
      assert rec["level"] == p.num_terms_B[i]
      assert rec["solution"] == synthetic.solution_text(p.operands_BxK[i], p.signs_BxK[i],
                                                        p.num_terms_B[i])
  assert decode_record(src["train"][0])["problem"] != decode_record(src["test"][0])["problem"]


def test_bad_record_policy_is_validated():
  report = records.ReadReport("x", total=1, bad=[records.BadRecord("a", "why")])
  with pytest.raises(ValueError, match="on_bad_record='ignore'"):
    records.apply_policy(report, "ignore")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    records.apply_policy(records.ReadReport("x", total=3), "raise")


def test_repeated_ids_are_made_unique(tmp_path):
  path = tmp_path / "dup.jsonl"
  _write_lines(path, [{"key": "x", "problem": "p", "answer": "1"}] * 3)
  parse = functools.partial(records.generic, id_field="key")
  got, report = records.read_jsonl(path, parse)
  assert [r["id"] for r in got] == ["x", "x#2", "x#3"] and report.num_bad == 0
