"""Batches of tokenised, left-padded prompts from a random-access source, through grain.

    source = builders.prepare("egpo_gsm8k", "train", data_dir=..., manual_dir=...)
    it = PromptIterator(source, batch_size=64, max_prompt_len=1024, seed=0,
                        encode=templates.encoder(tokenizer, "qwen25_math"))
    batch = next(it)          # prompt_ids [B, P] int32, prompt_mask [B, P] bool, answer, ...
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly

Shuffling is a seeded permutation per epoch (grain's index shuffle), epochs repeat
(`num_epochs=None`: forever), and each host reads its own shard
(`shard_index`/`shard_count`, by default jax.process_index()/process_count()); with
`drop_remainder` every host gets the same number of records, so hosts stay in step.
`shard_by="batch"` instead gives host i rows [i*B, (i+1)*B) of every global batch of
shard_count*B records drawn from one stream, so the global batches (and so a training
run) do not depend on the number of hosts; a host still reads only its own rows.

Every record is checked once, before the first batch: records whose prompt is longer
than `max_prompt_len` tokens, or that cannot be decoded or encoded, or (given
`max_new_tokens`) whose response cap (`records.CAP_KEY`) is not an int in
[1, max_new_tokens], or (given `max_positions`) whose prompt + max_new_tokens tokens
exceed the model's positions, are skipped with a counted warning (`on_bad_record="skip"`) or rejected (`"raise"`) up front, so nothing
fails mid-epoch. Given the read report of the source's file (`source_report`, from
`records.read_jsonl`), they are named by their file line and join that report, so the
file's bad lines and its bad prompts make one message.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from egpo_jax.data import records as records_lib

_TEXT_FIELDS = ("id", "problem", "answer", "solution", "subject", "verifier")


def decode_record(raw: dict[str, Any]) -> dict[str, Any]:
  """A tfds record (text as bytes) -> str fields; invalid UTF-8 raises RecordError."""
  out = {}
  for key, value in raw.items():
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise records_lib.RecordError(f"field {key!r} is not UTF-8 (byte {e.start})") from None
    elif isinstance(value, (list, np.ndarray)) and key == "choices":
      value = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
    elif isinstance(value, np.generic):
      value = value.item()
    out[key] = value
  return out


def _rows_of_global_batches(ds: grain.MapDataset, rows: int, index: int, count: int
                            ) -> grain.MapDataset:
  """Rows [index*rows, (index+1)*rows) of each consecutive global batch of count*rows."""
  per_batch = rows * count
  local = grain.MapDataset.range(len(ds) // per_batch * rows)
  return local.map(lambda i: ds[(i // rows) * per_batch + index * rows + i % rows])


class PromptIterator:
  """An iterator of prompt batches with an exactly restorable state.

  Args:
    source: a random-access source of records (`tfds.data_source`, a list of dicts).
    batch_size: prompts per batch (B).
    max_prompt_len: P; prompts are left-padded to it, longer ones are bad records.
    encode: record -> prompt token ids (e.g. `templates.encoder(tokenizer, ...)`).
    seed: shuffling seed (0 <= seed < 2**32).
    shuffle: shuffle each epoch (a different permutation per epoch).
    num_epochs: epochs to read; None repeats forever.
    shard_index, shard_count: this host's shard (default: jax process index and count).
    drop_remainder: drop a last partial batch, and trim records so shards are equal.
    shard_by: "record" (host i reads records i, i + shard_count, ...) or "batch" (host
      i reads its block of rows of each global batch; needs drop_remainder).
    on_bad_record: "skip" (warn and count) or "raise".
    pad_id: the padding token id.
    source_report: the `records.ReadReport` that read `source` from a file (its
      `lines[i]` is record i's file line); the scan adds its bad records to it and
      `self.report` is it. Default: a new report naming records by index or id.
    max_new_tokens: T, the longest response; given, batches carry each record's
      response cap (its `records.CAP_KEY`, else T) and a cap above T is a bad record.
    max_positions: the model's positions (max_position_embeddings); given, a prompt of
      n tokens with n + T > max_positions is a bad record (the sampler sizes every
      response for T, whatever its cap; left padding takes no positions).
    cap_field: the cap's name in reports (the JSONL field it was read from).

  Batches are dicts: prompt_ids [B, P] int32, prompt_mask [B, P] bool, answer, id,
  verifier (str arrays [B]), index [B] int64 (the record's position in source) and,
  given max_new_tokens, max_new_tokens [B] int32.
  """

  def __init__(self, source: Sequence[Any], *, batch_size: int, max_prompt_len: int,
               encode: Callable[[dict[str, Any]], Sequence[int]], seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               drop_remainder: bool = True, on_bad_record: str = "skip", pad_id: int = 0,
               shard_by: str = "record", source_report: records_lib.ReadReport | None = None,
               max_new_tokens: int | None = None, max_positions: int | None = None,
               cap_field: str = records_lib.CAP_KEY):
    for name, value in (("batch_size", batch_size), ("max_prompt_len", max_prompt_len)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("max_positions", max_positions)):
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if max_positions is not None and max_new_tokens is None:
      raise ValueError("max_positions needs max_new_tokens (the responses' length)")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if shard_by not in ("record", "batch") or (shard_by == "batch" and not drop_remainder):
      raise ValueError(f"shard_by={shard_by!r}: use 'record', or 'batch' with "
                       "drop_remainder=True")
    if on_bad_record not in records_lib.ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={on_bad_record!r}; use one of {records_lib.ON_BAD_RECORD}")
    if source_report is not None and len(source_report.lines) != len(source):
      raise ValueError(f"source_report has {len(source_report.lines)} lines for "
                       f"{len(source)} records; pass the report that read this source")
    self._source = source
    self._encode = encode
    self._batch_size = batch_size
    self._max_prompt_len = max_prompt_len
    self._pad_id = pad_id
    self._max_new_tokens, self._max_positions = max_new_tokens, max_positions
    self._cap_field = cap_field

    good, self.report = self._scan(on_bad_record, source_report)
    if shard_by == "batch":
      mine, per_host = good, batch_size * shard_count
    else:
      if drop_remainder:
        good = good[:len(good) // shard_count * shard_count]
      mine, per_host = good[shard_index::shard_count], batch_size
    if len(mine) < per_host and drop_remainder:
      raise ValueError(f"shard {shard_index}/{shard_count} has {len(mine)} usable records, "
                       f"fewer than batch_size={batch_size}"
                       + (f" x {shard_count} hosts" if shard_by == "batch" else ""))
    self.num_records = len(mine)
    # Hosts sharding by batch share one stream, so their (identical) states are exchangeable.
    shard = [shard_index, shard_count] if shard_by == "record" else ["batch", shard_count]
    self._fingerprint = {"num_records": len(mine), "seed": seed, "shuffle": shuffle,
                         "num_epochs": num_epochs, "shard": shard,
                         "batch_size": batch_size, "max_prompt_len": max_prompt_len}
    ds = grain.MapDataset.source(mine)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if shard_by == "batch":
      ds = _rows_of_global_batches(ds, batch_size, shard_index, shard_count)
    ds = ds.map(self._example)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    self._iter = iter(iter_ds.batch(batch_size, drop_remainder=drop_remainder))

  def _scan(self, on_bad_record: str, report: records_lib.ReadReport | None
            ) -> tuple[list[int], records_lib.ReadReport]:
    lines = report.lines if report is not None else None
    if report is None:
      report = records_lib.ReadReport(source=f"{type(self._source).__name__}")
    good = []
    for i in range(len(self._source)):
      if lines is None:   # a file's report counted its records already
        report.total += 1
      line = None if lines is None else lines[i]
      rid = f"index {i}"
      try:
        raw = self._source[i]
        if isinstance(raw, dict) and "id" in raw:
          rid = (raw["id"].decode("utf-8", "replace") if isinstance(raw["id"], bytes)
                 else str(raw["id"]))
        rec = decode_record(raw)
        n = len(self._encode(rec))
        if n == 0:
          raise records_lib.RecordError("the prompt encodes to no tokens")
        if n > self._max_prompt_len:
          raise records_lib.RecordError(
              f"prompt has {n} tokens, over max_prompt_len={self._max_prompt_len}")
        self._check_cap(rec, n)
        good.append(i)
      except records_lib.RecordError as e:
        report.bad.append(records_lib.BadRecord(rid, str(e), line=line))
      except (KeyError, TypeError, ValueError) as e:
        report.bad.append(records_lib.BadRecord(rid, f"{type(e).__name__}: {e}",
                                                line=line))
    with warnings.catch_warnings():
      warnings.simplefilter("always", records_lib.BadRecordWarning)
      records_lib.apply_policy(report, on_bad_record)
    return good, report

  def _check_cap(self, rec: dict[str, Any], n: int) -> None:
    """The record's response cap and its room in the model's positions (class doc)."""
    t = self._max_new_tokens
    if t is None:
      return
    if rec.get(records_lib.CAP_KEY) is not None:
      cap = records_lib.response_cap(rec[records_lib.CAP_KEY], self._cap_field)
      if cap > t:
        raise records_lib.RecordError(
            f"field {self._cap_field!r} is {cap}, over rollout.max_new_tokens={t}")
    if self._max_positions is not None and n + t > self._max_positions:
      raise records_lib.RecordError(
          f"prompt has {n} tokens: with rollout.max_new_tokens={t} that is {n + t} "
          f"positions, over the model's max_position_embeddings={self._max_positions}")

  def _example(self, index: int) -> dict[str, Any]:
    rec = decode_record(self._source[index])
    ids = np.asarray(self._encode(rec), np.int32)
    p = self._max_prompt_len
    prompt = np.full((p,), self._pad_id, np.int32)
    mask = np.zeros((p,), bool)
    prompt[p - len(ids):] = ids
    mask[p - len(ids):] = True
    out = {"prompt_ids": prompt, "prompt_mask": mask, "answer": np.str_(rec["answer"]),
           "id": np.str_(rec.get("id", "")), "verifier": np.str_(rec.get("verifier", "math")),
           "index": np.int64(index)}
    if self._max_new_tokens is not None:
      cap = rec.get(records_lib.CAP_KEY)
      out["max_new_tokens"] = np.int32(self._max_new_tokens if cap is None else cap)
    return out

  def __iter__(self) -> PromptIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict (for the trainer's orbax JsonSave)."""
    return {"grain": self._iter.get_state(), "fingerprint": dict(self._fingerprint)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` of an iterator built with the same arguments."""
    if not isinstance(state, dict) or "grain" not in state:
      raise ValueError("state must be a dict from PromptIterator.get_state()")
    saved = state.get("fingerprint", {})
    if saved != self._fingerprint:
      diff = sorted(k for k in set(saved) | set(self._fingerprint)
                    if saved.get(k) != self._fingerprint.get(k))
      raise ValueError(f"the saved data state does not match this iterator in {diff}: "
                       f"saved {[saved.get(k) for k in diff]}, now "
                       f"{[self._fingerprint.get(k) for k in diff]}; build the iterator with "
                       "the same data, seed, sharding and batch size to resume")
    self._iter.set_state(state["grain"])
