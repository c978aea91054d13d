"""Tasks from the config: the synthetic task (jnp, runs inside jit) and a user's JSONL of
math problems (prompts through the grain iterator, answers verified on the host)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from egpo_jax import rewards
from egpo_jax.data import loader, records, synthetic, templates
from egpo_jax.training.host_loop import HostTask
from egpo_jax.training.iteration import JaxTask


def synthetic_task(c: ml_collections.ConfigDict) -> JaxTask:
  t = synthetic.jax_task(difficulty=c.task.difficulty, prompt_len=c.task.max_prompt_len)
  return JaxTask(t.sample_prompts, t.verify)


class JsonlTask:
  """Prompts from a JSONL file (shuffled epochs, this host's shard, exact resume) and
  rewards from `egpo_jax.rewards` (math-verify in worker processes, hard timeouts)."""

  def __init__(self, c: ml_collections.ConfigDict, tokenizer: Any, *, seed: int):
    if not c.task.train_file:
      raise ValueError("config.task.train_file is empty: give the training JSONL, e.g. "
                       "--config.task.train_file=/data/train.jsonl")
    parse = lambda raw, i: records.generic(raw, i, problem_field=c.task.problem_field,
                                           answer_field=c.task.answer_field,
                                           verifier=c.task.reward)
    recs, report = records.read_jsonl(c.task.train_file, parse)
    records.apply_policy(report, "skip")
    self.read_report = report
    self.tokenizer = tokenizer
    self.reward_kind = c.task.reward
    self.iterator = loader.PromptIterator(
        recs, batch_size=c.rollout.prompts_per_batch, max_prompt_len=c.task.max_prompt_len,
        encode=templates.encoder(tokenizer, c.task.template,
                                 chat=getattr(tokenizer, "chat_template", None) is not None),
        seed=seed, pad_id=tokenizer.pad_id)

  def sample_prompts(self, rng, batch_size: int):
    del rng  # the data iterator decides the order (and resumes exactly)
    batch = next(self.iterator)
    if batch["prompt_ids"].shape[0] != batch_size:
      raise ValueError(f"the data iterator gave {batch['prompt_ids'].shape[0]} prompts, "
                       f"expected {batch_size}")
    return batch["prompt_ids"], batch["prompt_mask"], [str(a) for a in batch["answer"]]

  def score(self, ids_NxT: np.ndarray, mask_NxT: np.ndarray, answers_N) -> np.ndarray:
    texts = [self.tokenizer.decode(ids[m.astype(bool)].tolist())
             for ids, m in zip(ids_NxT, mask_NxT)]
    return rewards.verify_batch(texts, list(answers_N), kind=self.reward_kind).correct

  def host_task(self) -> HostTask:
    return HostTask(self.sample_prompts, self.score)

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)
