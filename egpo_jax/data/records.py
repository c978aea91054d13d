"""Benchmark JSONL -> uniform records, with every bad line reported by id, never a crash.

A record is a dict of strings and one int, the features of every builder:
    id, problem, answer (the extracted reference), solution ("" if none),
    subject ("" if none), level (-1 if none), verifier (a `rewards.KINDS` name)
MMLU-STEM records also keep `choices`; a training record may keep its response token cap
(`CAP_KEY`, from the JSONL field `generic`'s cap_field names). Extraction per benchmark: GSM8K's answer follows
"####" (thousands commas dropped), Minerva's is the last \\boxed{} of its solution, MMLU's
is the letter of its answer index, AMC's float 27.0 becomes "27".

Reading never raises on a record: a line that is not UTF-8 or JSON, lacks a field, has an
empty answer or a problem longer than `max_problem_chars` becomes a `BadRecord`, and the
caller skips it with a counted warning or rejects the file, as configured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from egpo_jax.rewards import verifiers

ON_BAD_RECORD = ("skip", "raise")
NO_LEVEL = -1
CAP_KEY = "max_new_tokens"   # a record's own response token cap, when it has one


class RecordError(ValueError):
  """A record cannot be used; the message says why."""


class BadRecordWarning(UserWarning):
  """Some records were skipped; the message counts them and lists their ids."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  record_id: str
  reason: str
  line: int | None = None   # 1-based line of the file, when read from one

  def where(self) -> str:
    """'line 7 (id x)', 'line 7' for a line without an id, or the id alone."""
    if self.line is None or self.record_id == f"line {self.line}":
      return self.record_id
    return f"line {self.line} (id {self.record_id})"


@dataclasses.dataclass
class ReadReport:
  """What a read kept and what it dropped (`lines`: the file line of each kept record)."""
  source: str
  total: int = 0
  bad: list[BadRecord] = dataclasses.field(default_factory=list)
  lines: list[int] = dataclasses.field(default_factory=list)

  @property
  def num_bad(self) -> int:
    return len(self.bad)

  def summary(self, limit: int = 10) -> str:
    shown = "; ".join(f"{b.where()}: {b.reason}" for b in self.bad[:limit])
    more = f"; ... and {self.num_bad - limit} more" if self.num_bad > limit else ""
    return f"{self.source}: {self.num_bad} of {self.total} records are bad ({shown}{more})"

  def to_json(self, limit: int = 100) -> dict[str, Any]:
    """The counts, and the first `limit` bad records as [id, reason] (+ their lines)."""
    return {"source": self.source, "total": self.total, "num_bad": self.num_bad,
            "bad": [[b.record_id, b.reason] for b in self.bad[:limit]],
            "bad_lines": [b.line for b in self.bad[:limit]]}


def _text(raw: Mapping[str, Any], field: str, *, required: bool = True) -> str:
  if field not in raw or raw[field] is None:
    if required:
      raise RecordError(f"missing field {field!r}")
    return ""
  value = raw[field]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise RecordError(f"field {field!r} is a {type(value).__name__}, expected text")
  return value if isinstance(value, str) else number_text(value)


def number_text(value: int | float) -> str:
  """27.0 -> '27'; 0.5 -> '0.5' (answers stored as JSON numbers)."""
  if isinstance(value, float):
    if not math.isfinite(value):
      raise RecordError(f"answer {value!r} is not a finite number")
    if value.is_integer():
      return str(int(value))
    return repr(value)
  return str(value)


def _record(rid: str, problem: str, answer: str, verifier: str, *, solution: str = "",
            subject: str = "", level: int = NO_LEVEL) -> dict[str, Any]:
  return {"id": rid, "problem": problem, "answer": answer, "solution": solution,
          "subject": subject, "level": int(level), "verifier": verifier}


# --- per-benchmark parsers: (raw JSON object, line index) -> record ------------------
def gsm8k(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  full = _text(raw, "answer")
  if "####" not in full:
    raise RecordError("answer has no '####' final answer")
  solution, answer = full.rsplit("####", 1)
  answer = answer.strip().replace(",", "")
  return _record(str(index), _text(raw, "question"), answer, "gsm8k",
                 solution=solution.strip())


def math500(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  level = raw.get("level", NO_LEVEL)
  return _record(_text(raw, "unique_id", required=False) or str(index), _text(raw, "problem"),
                 _text(raw, "answer"), "math", solution=_text(raw, "solution", required=False),
                 subject=_text(raw, "subject", required=False),
                 level=level if isinstance(level, int) else NO_LEVEL)


def minerva_math(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  solution = _text(raw, "solution")
  answer = verifiers.last_boxed(solution)
  if answer is None:
    raise RecordError("solution has no balanced \\boxed{} answer")
  rid = raw.get("idx", index)
  return _record(str(rid), _text(raw, "problem"), answer.strip(), "math", solution=solution,
                 subject=_text(raw, "type", required=False))


def format_choices(question: str, choices: Iterable[str]) -> str:
  """Qwen2.5-Math's evaluation format: question, then 'Answer Choices: (A) .. (B) ..'."""
  options = " ".join(f"({chr(ord('A') + i)}) {str(c).strip()}" for i, c in enumerate(choices))
  return f"{question.strip()}\nAnswer Choices: {options}"


def mmlu_stem(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  choices = raw.get("choices")
  if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
    raise RecordError("field 'choices' must be a non-empty list of strings")
  answer = raw.get("answer")
  if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
    raise RecordError(f"answer {answer!r} is not an index into the {len(choices)} choices")
  question = _text(raw, "question")
  rec = _record(str(index), format_choices(question, choices), chr(ord("A") + answer),
                "multiple_choice", subject=_text(raw, "type", required=False))
  rec["choices"] = list(choices)
  return rec


def aime24(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  return _record(str(raw.get("id", index)), _text(raw, "problem"), _text(raw, "answer"), "math",
                 solution=_text(raw, "solution", required=False))


def amc23(raw: Mapping[str, Any], index: int) -> dict[str, Any]:
  return _record(str(raw.get("id", index)), _text(raw, "problem"), _text(raw, "answer"), "math")


ANSWER_FORMATS = ("raw", "boxed", "gsm8k")


def response_cap(value: Any, field: str) -> int:
  """A record's response token cap: a JSON int >= 1 (27.0 and true are refused)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise RecordError(f"field {field!r} is {value!r}, expected a positive int (the "
                      "response's token cap)")
  return value


def generic(raw: Mapping[str, Any], index: int, *, problem_field: str = "problem",
            answer_field: str = "answer", id_field: str = "", solution_field: str = "",
            answer_format: str = "raw", verifier: str = "math",
            cap_field: str = "") -> dict[str, Any]:
  """A user's training JSONL (e.g. OpenR1-style): field names and answer format configured.

  answer_format: "raw" (the field is the answer), "boxed" (its last \\boxed{}), "gsm8k"
  (after "####"). cap_field: the field holding the record's response token cap (kept
  as rec[CAP_KEY] when present and not null); "" = none.
  """
  answer = _text(raw, answer_field)
  if answer_format == "boxed":
    boxed = verifiers.last_boxed(answer)
    if boxed is None:
      raise RecordError(f"field {answer_field!r} has no balanced \\boxed{{}} answer")
    answer = boxed
  elif answer_format == "gsm8k":
    if "####" not in answer:
      raise RecordError(f"field {answer_field!r} has no '####' final answer")
    answer = answer.rsplit("####", 1)[1].replace(",", "")
  elif answer_format != "raw":
    raise ValueError(f"answer_format={answer_format!r}; use one of {ANSWER_FORMATS}")
  rid = _text(raw, id_field) if id_field else str(index)
  solution = _text(raw, solution_field, required=False) if solution_field else ""
  rec = _record(rid, _text(raw, problem_field), answer.strip(), verifier, solution=solution)
  if cap_field and raw.get(cap_field) is not None:
    rec[CAP_KEY] = response_cap(raw[cap_field], cap_field)
  return rec


PARSERS: dict[str, Callable[[Mapping[str, Any], int], dict[str, Any]]] = {
    "gsm8k": gsm8k, "math500": math500, "minerva_math": minerva_math,
    "mmlu_stem": mmlu_stem, "aime24": aime24, "amc23": amc23,
}


DEFAULT_ID_FIELDS = ("id", "unique_id", "idx")


def _guess_id(line: str, lineno: int, id_fields: tuple[str, ...] = DEFAULT_ID_FIELDS) -> str:
  """An id for the report of a line that failed to parse as a whole."""
  try:
    raw = json.loads(line)
  except ValueError:
    return f"line {lineno}"
  if isinstance(raw, dict):
    for key in id_fields:
      if isinstance(raw.get(key), (str, int)) and not isinstance(raw.get(key), bool):
        return str(raw[key])
  return f"line {lineno}"


def read_jsonl(path: str | os.PathLike, parse: Callable[[Mapping[str, Any], int], dict],
               *, max_problem_chars: int | None = None,
               id_fields: tuple[str, ...] = DEFAULT_ID_FIELDS
               ) -> tuple[list[dict[str, Any]], ReadReport]:
  """Parses every line of a JSONL file; bad lines go to the report, not an exception.

  A bad line is reported with its file line number (1-based, counting blank lines; a
  CRLF ending is one line) and the first of `id_fields` it has. `parse` gets the index
  of the record among the non-blank lines; `report.lines[i]` is the file line of the
  i-th returned record.
  """
  report = ReadReport(source=os.fspath(path))
  records: list[dict[str, Any]] = []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  index = 0
  for lineno, raw_line in enumerate(lines, start=1):
    if not raw_line.strip():
      continue
    report.total += 1
    rid = f"line {lineno}"
    try:
      try:
        line = raw_line.decode("utf-8")
      except UnicodeDecodeError as e:
        rid = _guess_id(raw_line.decode("utf-8", errors="replace"), lineno, id_fields)
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
      try:
        raw = json.loads(line)
      except ValueError as e:
        raise RecordError(f"invalid JSON ({e.msg})") from None
      if not isinstance(raw, dict):
        raise RecordError(f"a line must hold a JSON object, got {type(raw).__name__}")
      rid = _guess_id(line, lineno, id_fields)
      rec = parse(raw, index)
      rid = rec["id"]
      if not rec["problem"].strip():
        raise RecordError("empty problem")
      if not rec["answer"].strip():
        raise RecordError("empty answer")
      if max_problem_chars is not None and len(rec["problem"]) > max_problem_chars:
        raise RecordError(f"problem has {len(rec['problem'])} characters, over "
                          f"max_problem_chars={max_problem_chars}")
      records.append(rec)
      report.lines.append(lineno)
    except RecordError as e:
      report.bad.append(BadRecord(rid, str(e), line=lineno))
    index += 1
  # Ids must be unique (they key results): a repeated id gets "#2", "#3", ... appended.
  counts: dict[str, int] = {}
  for r in records:
    counts[r["id"]] = counts.get(r["id"], 0) + 1
    if counts[r["id"]] > 1:
      r["id"] = f"{r['id']}#{counts[r['id']]}"
  return records, report


def apply_policy(report: ReadReport, on_bad_record: str) -> None:
  """Warns (skip: the bad records are already left out) or raises (raise)."""
  if on_bad_record not in ON_BAD_RECORD:
    raise ValueError(f"on_bad_record={on_bad_record!r}; use one of {ON_BAD_RECORD}")
  if not report.bad:
    return
  if on_bad_record == "raise":
    raise RecordError(report.summary() + ". Fix those lines, or set on_bad_record='skip' "
                      "(task.on_bad_record=skip in a training config) to leave them out.")
  # One message: a log line as well would print every report twice.
  warnings.warn(report.summary() + "; they were skipped.", BadRecordWarning, stacklevel=3)
