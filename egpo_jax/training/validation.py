"""The trainer's evaluation of the policy: before RL, every `train.eval_every` iterations,
and after RL, on a fixed set of prompts, with the same metrics in both modes.

  jitted mode  `evaluate_jax_task`: `train.eval_prompts` prompts drawn from the jnp task
               with a fixed key, verified by its jnp verifier.
  host mode    `evaluate_held_out`: the first `train.eval_prompts` problems of the held-out
               set `train.eval_set` (a benchmark of `evaluation.benchmarks` or a JSONL
               read like the training file) that fit in `task.max_prompt_len`, rendered
               with the training template and verified on the host by `task.reward`
               (a record's own verifier for a benchmark).

Both sample `EVAL_SAMPLES` responses per prompt at the rollout's sampling settings and
with its sampler (host mode with rollout.slots > 0: continuous batching, which stops each
response at its record's own cap, `task.max_new_tokens_field`, as in training) and score
them with `calibration.evaluate_generation` (accuracy, pass@k, AUROC, ECE, entropy
of correct vs wrong, lengths), plus `seconds`, the evaluation's wall time. `validator`
builds the one function the orchestrator calls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from egpo_jax import rewards
from egpo_jax.data import records as records_lib
from egpo_jax.data import templates
from egpo_jax.evaluation import benchmarks, calibration
from egpo_jax.models.config import ModelConfig
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import experiment, host_loop

log = logging.getLogger(__name__)

EVAL_SAMPLES = 4   # responses per evaluation prompt (pass@1..4 and the calibration)

# params -> metrics dict; raises ValueError for diverged params (non-finite log-probs).
Validator = Callable[[Any], dict[str, Any]]


def evaluate_jax_task(params, rng: jax.Array, *, task, model_config: ModelConfig,
                      spec: engine.SamplingSpec, num_prompts: int,
                      delimiter_ids: Sequence[int] | None = None,
                      num_bins: int = calibration.DEFAULT_NUM_BINS) -> dict[str, Any]:
  """Validation on a jnp task: sample, verify (jnp), `calibration.evaluate_generation`.

  Args:
    params: the policy's parameters.
    rng: key of the validation prompts and samples; keep it fixed across calls so every
      validation sees the same prompts.
    task: a `training.iteration.JaxTask` (sample_prompts, verify).
    model_config: the model's ModelConfig.
    spec: the sampling settings (`engine.SamplingSpec`; group_size = samples per prompt).
    num_prompts: validation prompts.
    delimiter_ids: reasoning delimiter token ids for the answer-segment metrics.
    num_bins: ECE bins.
  """
  k_prompts, k_sample = jax.random.split(rng)
  ids, mask, answers = task.sample_prompts(k_prompts, num_prompts)
  gen = engine.generate(params, ids, mask, k_sample, config=model_config,
                        group_size=spec.group_size, max_new_tokens=spec.max_new_tokens,
                        eos_ids=spec.eos_ids, temperature=spec.temperature, top_p=spec.top_p,
                        top_k=spec.top_k, greedy=spec.greedy, pad_id=spec.pad_id)
  answers_n = jax.tree.map(lambda a: jnp.repeat(a, spec.group_size, axis=0), answers)
  correct = np.asarray(jax.device_get(
      task.verify(gen.completion_ids_NxT, gen.completion_mask_NxT, answers_n)), bool)
  return calibration.evaluate_generation(gen, correct, group_size=spec.group_size,
                                         delimiter_ids=delimiter_ids, num_bins=num_bins)


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
  """The held-out prompts, encoded once: left-padded token ids, references, verifiers."""
  source: str
  ids_BxP: np.ndarray
  mask_BxP: np.ndarray
  answers_B: tuple[str, ...]
  verifiers_B: tuple[str, ...]
  skipped: int   # records scanned but not kept (unrenderable, over max_prompt_len, or
                 # capped over rollout.max_new_tokens)
  # int32 [B]: each problem's response cap with task.max_new_tokens_field set (its own,
  # else rollout.max_new_tokens); None without the field.
  caps_B: np.ndarray | None = None


def _records(c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  name = c.train.eval_set
  if name in benchmarks.BENCHMARKS:
    return list(benchmarks.load(name, synthetic_difficulty=c.task.difficulty).records)
  parse = lambda raw, i: records_lib.generic(raw, i, problem_field=c.task.problem_field,
                                             answer_field=c.task.answer_field,
                                             verifier=c.task.reward,
                                             cap_field=c.task.get("max_new_tokens_field", ""))
  recs, report = records_lib.read_jsonl(name, parse)
  if report.num_bad:
    log.warning("train.eval_set=%s: %d of %d records are bad and skipped", name,
                report.num_bad, report.total)
  return recs


def held_out_set(c: ml_collections.ConfigDict, tokenizer) -> HeldOutSet:
  """The first `train.eval_prompts` records of `train.eval_set` whose prompt, rendered
  with `task.template` as in training, fits in `task.max_prompt_len` tokens, and whose
  response cap (`task.max_new_tokens_field`, as in training) fits in
  `rollout.max_new_tokens`."""
  encode = templates.encoder(tokenizer, c.task.template,
                             chat=getattr(tokenizer, "chat_template", None) is not None)
  max_new = c.rollout.max_new_tokens
  kept, skipped = [], 0
  for rec in _records(c):
    if len(kept) == c.train.eval_prompts:
      break
    try:
      ids = encode(rec)
    except (KeyError, TypeError, ValueError):
      ids = []
    fits = rec.get(records_lib.CAP_KEY, max_new) <= max_new
    if 0 < len(ids) <= c.task.max_prompt_len and fits:
      kept.append((ids, rec))
    else:
      skipped += 1
  if not kept:
    raise ValueError(f"config.train.eval_set={c.train.eval_set!r}: no problem fits in "
                     f"task.max_prompt_len={c.task.max_prompt_len} tokens ({skipped} "
                     "skipped); raise task.max_prompt_len or use another set")
  width = max(len(ids) for ids, _ in kept)
  ids_BxP = np.full((len(kept), width), tokenizer.pad_id, np.int32)
  mask_BxP = np.zeros((len(kept), width), np.int32)
  for b, (ids, _) in enumerate(kept):
    ids_BxP[b, width - len(ids):] = ids
    mask_BxP[b, width - len(ids):] = 1
  caps_B = (np.asarray([r.get(records_lib.CAP_KEY, max_new) for _, r in kept], np.int32)
            if c.task.get("max_new_tokens_field") else None)
  return HeldOutSet(c.train.eval_set, ids_BxP, mask_BxP,
                    tuple(str(r["answer"]) for _, r in kept),
                    tuple(r.get("verifier", c.task.reward) for _, r in kept), skipped,
                    caps_B)


# score(completion_ids_NxT, completion_mask_NxT, answers_N) -> correct_N (bool, numpy),
# as `host_loop.HostTask.score`.
Scorer = Callable[[np.ndarray, np.ndarray, Sequence[str]], np.ndarray]


def record_scorer(tokenizer, verifiers_N: Sequence[str]) -> Scorer:
  """Decodes each response and verifies it with its record's verifier (a benchmark's
  records name theirs: math, multiple_choice, ...)."""
  def score(ids_NxT, mask_NxT, answers_N):
    texts = [tokenizer.decode(ids[m.astype(bool)].tolist()) for ids, m in zip(ids_NxT, mask_NxT)]
    return rewards.verify_batch(texts, list(answers_N), kind=list(verifiers_N)).correct
  return score


def evaluate_held_out(params, rng: jax.Array, held: HeldOutSet, *, model_config: ModelConfig,
                      spec: engine.SamplingSpec | continuous.ContinuousSpec, tokenizer,
                      batch_size: int, score: Scorer,
                      stop_strings: Sequence[str] = ()) -> dict[str, Any]:
  """Host-verified evaluation on `held`: batches of `batch_size` prompts (the last one
  padded with repeats, so the sampler compiles once), G = group_size responses each,
  cut at `stop_strings` as in training, then `score`d on the host.

  `spec` picks the sampler as training's rollout does: a `continuous.ContinuousSpec`
  (rollout.slots > 0) samples with continuous batching and stops each response at its
  problem's cap (`held.caps_B`); an `engine.SamplingSpec` with the static sampler, which
  refuses caps (`engine.CAPS_NEED_SLOTS`). Both draw a response's tokens from the same
  random stream (keyed by its problem's index, not its batch), so they agree up to float
  rounding at a near-tie.
  """
  slots = isinstance(spec, continuous.ContinuousSpec)
  sampling = spec.sampling if slots else spec
  if held.caps_B is not None and not slots:
    raise ValueError(engine.CAPS_NEED_SLOTS)
  n = held.ids_BxP.shape[0]
  g = sampling.group_size
  parts = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n if n >= batch_size else np.arange(n)
    if slots:
      caps_N = None if held.caps_B is None else np.repeat(held.caps_B[rows], g)
      gen = continuous.generate(params, held.ids_BxP[rows], held.mask_BxP[rows], rng,
                                config=model_config, spec=spec, caps_N=caps_N,
                                prompt_ids_B=np.asarray(rows, np.int32))
    else:
      gen = engine.generate(params, held.ids_BxP[rows], held.mask_BxP[rows], rng,
                            config=model_config, group_size=g,
                            max_new_tokens=spec.max_new_tokens, eos_ids=spec.eos_ids,
                            temperature=spec.temperature, top_p=spec.top_p,
                            top_k=spec.top_k, greedy=spec.greedy, pad_id=spec.pad_id,
                            prompt_ids_B=jnp.asarray(rows, jnp.int32))
    keep = (min(start + batch_size, n) - start) * g
    parts.append(jax.tree.map(lambda x: np.asarray(x)[:keep], jax.device_get(
        {"completion_ids_NxT": gen.completion_ids_NxT,
         "completion_mask_NxT": gen.completion_mask_NxT, "logps_NxT": gen.logps_NxT,
         "lengths_N": gen.lengths_N, "truncated_N": gen.truncated_N})))
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if stop_strings:
    decode = lambda ids: tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    lengths = host_loop.stop_lengths(out["completion_ids_NxT"], out["lengths_N"], decode,
                                     stop_strings)
    keep_NxT = np.arange(out["completion_mask_NxT"].shape[1])[None] < lengths[:, None]
    out["completion_mask_NxT"] = out["completion_mask_NxT"] & keep_NxT
    out["logps_NxT"] = np.where(keep_NxT, out["logps_NxT"], 0.0)
    out["truncated_N"] = out["truncated_N"] & (lengths >= out["lengths_N"])
    out["lengths_N"] = np.minimum(lengths, out["lengths_N"])
  correct = np.asarray(score(out["completion_ids_NxT"], out["completion_mask_NxT"],
                             [a for a in held.answers_B for _ in range(g)]), bool)
  return calibration.evaluate_generation(types.SimpleNamespace(**out), correct, group_size=g)


def validator(c: ml_collections.ConfigDict, exp, rng: jax.Array, host_task=None
              ) -> Validator | None:
  """params -> metrics (with `seconds`) of this job's evaluation, always on the same
  prompts and samples (key `rng`); None for a host-verified task without
  `train.eval_set` (nothing to evaluate on). A JSONL held-out set is scored like the
  training data, by `host_task.score` (a `tasks.JsonlTask`); a benchmark by each
  record's own verifier."""
  spec = dataclasses.replace(exp.settings.sampling, group_size=EVAL_SAMPLES,
                             return_entropy=False)
  if exp.jitted:
    def evaluate(params):
      return evaluate_jax_task(params, rng, task=exp.task, model_config=exp.model_config,
                               spec=spec, num_prompts=c.train.eval_prompts)
  elif c.train.get("eval_set"):
    if jax.process_count() > 1:
      raise ValueError("config.train.eval_set: the held-out evaluation runs in one "
                       "process only for now; set it to '' for a multi-process run")
    held = held_out_set(c, exp.tokenizer)
    batch = min(held.ids_BxP.shape[0], c.rollout.prompts_per_batch)
    g = EVAL_SAMPLES
    score = (host_task.score if host_task is not None and c.train.eval_set.endswith(".jsonl")
             else record_scorer(exp.tokenizer, [v for v in held.verifiers_B for _ in range(g)]))

    # The training rollout's sampler: continuous batching with rollout.slots > 0.
    sampler = experiment.continuous_spec(c, spec) or spec

    def evaluate(params):
      return evaluate_held_out(params, rng, held, model_config=exp.model_config,
                               spec=sampler, tokenizer=exp.tokenizer, batch_size=batch,
                               score=score, stop_strings=tuple(c.rollout.stop_strings))
  else:
    return None

  def timed(params):
    t0 = time.perf_counter()
    out = evaluate(params)
    return {**out, "seconds": time.perf_counter() - t0}
  return timed
