"""Tasks from the config: the synthetic task (jnp, runs inside jit) and a user's JSONL of
math problems (prompts through the grain iterator, answers verified on the host by the
reward function config.task.reward names in `registry.reward_functions`).

The synthetic task verifies inside jit with its jnp verifier (`data.synthetic`); the
registered "synthetic" reward function is the same check on decoded text, for host mode
and evaluation."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from egpo_jax import rewards  # noqa: F401  (registers the reward functions)
from egpo_jax.core import registry
from egpo_jax.data import loader, records, synthetic, templates
from egpo_jax.training import config as config_lib
from egpo_jax.training.host_loop import HostTask
from egpo_jax.training.iteration import JaxTask


def synthetic_task(c: ml_collections.ConfigDict) -> JaxTask:
  t = synthetic.jax_task(difficulty=c.task.difficulty, prompt_len=c.task.max_prompt_len)
  return JaxTask(t.sample_prompts, t.verify)


DATA_REPORT = "data_report.json"


class JsonlTask:
  """Prompts from a JSONL file (shuffled epochs, this host's shard, exact resume) and
  verdicts from the registered reward function `task.reward` (`egpo_jax.rewards`'s run
  math-verify in worker processes, with hard timeouts).

  With several processes, process i reads (and later verifies) rows
  [i B / n, (i + 1) B / n) of every global batch of B prompts, so the global batches are
  the same for any number of processes.

  Per-record response caps: with task.max_new_tokens_field set, a record's int in that
  field caps each of its G responses (records without it: rollout.max_new_tokens), and
  `sample_prompts` also returns the batch's caps_B.

  Bad records (unparsable lines, missing fields, prompts over task.max_prompt_len, a
  cap that is not an int in [1, rollout.max_new_tokens], or, given `max_positions` (the
  model's max_position_embeddings), a prompt without room for rollout.max_new_tokens
  more) are reported once, with their file line, and skipped or refused
  (`task.on_bad_record`); `read_report` says what was kept, and `save_report` writes it
  into the workdir.
  """

  def __init__(self, c: ml_collections.ConfigDict, tokenizer: Any, *, seed: int,
               shard_index: int | None = None, shard_count: int | None = None,
               max_positions: int | None = None):
    if not c.task.train_file:
      raise ValueError("config.task.train_file is empty: give the training JSONL, e.g. "
                       "--config.task.train_file=/data/train.jsonl")
    self.cap_field = c.task.get("max_new_tokens_field", "")
    parse = lambda raw, i: records.generic(raw, i, problem_field=c.task.problem_field,
                                           answer_field=c.task.answer_field,
                                           verifier=c.task.reward, cap_field=self.cap_field)
    recs, report = records.read_jsonl(c.task.train_file, parse)
    self.tokenizer = tokenizer
    self.reward_fn = registry.reward_functions.get(c.task.reward)
    self.reward_hparams = dict(config_lib.hparam_pairs(c, "task"))   # its own, by name
    self.stop_strings = tuple(c.rollout.stop_strings)
    # Found on the decoded text unless it is one token (a special token, which decoding
    # would skip, stays a token match: host_loop's module doc).
    delimiter = c.algo.segment_delimiter
    self.delimiter_text = (delimiter if c.algo.entropy_segment != "joint" and delimiter
                           and len(tokenizer.encode(delimiter)) > 1 else None)
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      shard_index, shard_count = jax.process_index(), jax.process_count()
    if c.rollout.prompts_per_batch % shard_count:
      raise ValueError(f"config.rollout.prompts_per_batch={c.rollout.prompts_per_batch} "
                       f"does not split over {shard_count} processes; make it a multiple")
    self.iterator = loader.PromptIterator(
        recs, batch_size=c.rollout.prompts_per_batch // shard_count,
        max_prompt_len=c.task.max_prompt_len,
        encode=templates.encoder(tokenizer, c.task.template,
                                 chat=getattr(tokenizer, "chat_template", None) is not None),
        seed=seed, pad_id=tokenizer.pad_id, shard_index=shard_index,
        shard_count=shard_count, shard_by="batch", on_bad_record=c.task.on_bad_record,
        source_report=report, max_new_tokens=c.rollout.max_new_tokens,
        max_positions=max_positions, cap_field=self.cap_field or records.CAP_KEY)
    self.read_report = self.iterator.report

  def report_json(self) -> dict[str, Any]:
    """The read report for summary.json: source, total, num_bad, kept and bad records."""
    return {**self.read_report.to_json(), "kept": self.read_report.total - self.read_report.num_bad}

  def save_report(self, workdir: str) -> str:
    """Writes `report_json()` to <workdir>/data_report.json; returns its path."""
    path = os.path.join(workdir, DATA_REPORT)
    with open(path, "w") as f:
      json.dump(self.report_json(), f, indent=2)
    return path

  def sample_prompts(self, rng, batch_size: int):
    del rng  # the data iterator decides the order (and resumes exactly)
    batch = next(self.iterator)
    if batch["prompt_ids"].shape[0] != batch_size:
      raise ValueError(f"the data iterator gave {batch['prompt_ids'].shape[0]} prompts, "
                       f"expected {batch_size}")
    out = batch["prompt_ids"], batch["prompt_mask"], [str(a) for a in batch["answer"]]
    return (*out, batch["max_new_tokens"]) if self.cap_field else out

  def score(self, ids_NxT: np.ndarray, mask_NxT: np.ndarray, answers_N) -> np.ndarray:
    texts = [self.tokenizer.decode(ids[m.astype(bool)].tolist())
             for ids, m in zip(ids_NxT, mask_NxT)]
    out = registry.call(self.reward_fn, texts, list(answers_N), **self.reward_hparams)
    return np.asarray(out.correct, bool)

  def decode(self, ids) -> str:
    """One response's text with its special tokens, for stop strings and the delimiter."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def host_task(self) -> HostTask:
    return HostTask(self.sample_prompts, self.score, decode=self.decode,
                    stop_strings=self.stop_strings, delimiter_text=self.delimiter_text)

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)
