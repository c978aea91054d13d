"""The host-mode training JSONL: file line numbers in every report (after blank lines
and with CRLF endings), one message per bad record, strict mode, the saved read report."""

import json
import os
import warnings

import pytest

from egpo_jax.data import records
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.training import config as config_lib
from egpo_jax.training import tasks
from experiments.configs import default


def _good(i):
  return json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)})


# line: content (1-based file lines); blank lines 2 and 6 shift every later line.
LINES = [_good(0), "", "{not json", _good(1), json.dumps({"problem": "2+2="}), "",
         json.dumps({"problem": "9" * 40 + "+1=", "answer": "1"}), _good(2), _good(3),
         _good(4), _good(5)]


@pytest.fixture(params=["\n", "\r\n"], ids=["lf", "crlf"])
def train_file(tmp_path, request):
  path = tmp_path / "train.jsonl"
  path.write_bytes(request.param.join(LINES).encode() + request.param.encode())
  return str(path)


def _task(train_file, **overrides):
  c = config_lib.with_overrides(default.get_config(), {
      "task.name": "jsonl", "task.train_file": train_file, "task.reward": "math",
      "task.max_prompt_len": 16, "rollout.prompts_per_batch": 2, **overrides})
  return tasks.JsonlTask(c, ByteTokenizer(), seed=0, shard_index=0, shard_count=1)


def test_bad_records_are_reported_once_with_their_file_lines(train_file, tmp_path, caplog):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    task = _task(train_file)
  bad = [w for w in caught if issubclass(w.category, records.BadRecordWarning)]
  assert len(bad) == 1, [str(w.message) for w in caught]
  assert "records are bad" not in caplog.text   # not logged a second time
  message = str(bad[0].message)
  assert "3 of 9 records are bad" in message
  assert "line 3: invalid JSON" in message
  assert "line 5: missing field 'answer'" in message
  # The over-long prompt is named by its file line, not its position in a list.
  assert "line 7 (id 4): prompt has 43 tokens, over max_prompt_len=16" in message
  assert message.count("line ") == 3
  report = task.report_json()
  assert (report["total"], report["num_bad"], report["kept"]) == (9, 3, 6)
  assert report["bad_lines"] == [3, 5, 7]
  path = task.save_report(str(tmp_path))
  with open(path) as f:
    assert json.load(f) == report
  assert os.path.basename(path) == tasks.DATA_REPORT


def test_strict_mode_refuses_the_file_naming_every_bad_line(train_file):
  with pytest.raises(records.RecordError) as err:
    _task(train_file, **{"task.on_bad_record": "raise"})
  for text in ("3 of 9 records are bad", "line 3: invalid JSON", "line 5: missing",
               "line 7 (id 4): prompt has 43 tokens"):
    assert text in str(err.value)


def test_read_jsonl_counts_file_lines_past_blank_and_crlf_lines(train_file):
  recs, report = records.read_jsonl(train_file, records.generic)
  assert report.lines == [1, 4, 7, 8, 9, 10, 11]
  assert [b.line for b in report.bad] == [3, 5]
  assert [r["id"] for r in recs] == ["0", "2", "4", "5", "6", "7", "8"]
