"""Sampling, verification and scoring of a model on benchmarks: the evaluation loop.

    settings = runner.EvalSettings(num_samples=8, max_new_tokens=3072)
    results = runner.evaluate(model, ["math500", "gsm8k"], settings)

Per benchmark: prompts are rendered with a template and encoded; prompts longer than
`max_prompt_len` tokens are skipped, counted and listed with the reason; the first
`limit` prompts that fit are kept. Each prompt gets `num_samples` responses from the KV
-cache sampler (`sampling.engine.generate`, the paper's temperature 0.6 / top-p 0.95 /
top-k 20 by default), verified by the record's checker (math-verify in worker processes;
the synthetic task by its jnp verifier), and summarised: pass@k, maj@k, lengths,
truncation, calibration of exp(-H~) (whole response and answer segment), and the same
per subject and per level where the data has them.

All batches of one evaluation are left-padded to one prompt length and one batch size,
so the sampler compiles once per evaluation. Response j of the prompt at position i of a
benchmark's records uses the random stream (seed, benchmark, i, j), whatever the batch.

The trainer's own evaluation during a run (a jnp task, or a held-out set verified on the
host) is `training.validation`; this module imports nothing from training.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from egpo_jax import rewards
from egpo_jax.data import records as records_lib
from egpo_jax.data import synthetic, templates
from egpo_jax.evaluation import benchmarks as benchmarks_lib
from egpo_jax.evaluation import calibration, passk
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.sampling import engine


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How to evaluate. Defaults: the paper's evaluation of Qwen2.5-Math (EGPO_METHOD.md).

  Attributes:
    num_samples: responses per problem (n of pass@k).
    temperature, top_p, top_k: sampling (0 temperature = greedy).
    max_new_tokens: response budget; longer responses are truncated (and counted).
    max_prompt_len: prompts with more tokens are skipped, counted and listed.
    limit: problems per benchmark (the first that fit); None for all.
    batch_size: prompts per sampler call (rows = batch_size * num_samples).
    seed: sampling seed.
    template: prompt template (`data.templates.TEMPLATES`).
    chat: render through the tokenizer's chat template (else the raw template).
    add_bos: prepend the tokenizer's BOS token to rendered prompts.
    ks: pass@k and maj@k budgets (those > num_samples are left out).
    num_bins: equal-mass bins of the ECE and the reliability diagrams.
    segment_delimiter: reasoning delimiter text for the answer-segment confidence
      (None or "" to skip it).
    verify_timeout: seconds per response for the verifier.
  """
  num_samples: int = 8
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 20
  max_new_tokens: int = 3072
  max_prompt_len: int = 1024
  limit: int | None = None
  batch_size: int = 16
  seed: int = 0
  template: str = "qwen25_math"
  chat: bool = True
  add_bos: bool = False
  ks: tuple[int, ...] = passk.DEFAULT_KS
  num_bins: int = calibration.DEFAULT_NUM_BINS
  segment_delimiter: str | None = "</think>"
  verify_timeout: float = 5.0

  def validate(self, model_config=None) -> None:
    """Raises ValueError naming the setting and the fix."""
    for name in ("num_samples", "max_new_tokens", "max_prompt_len", "batch_size", "num_bins"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
      raise ValueError(f"limit must be None (all problems) or an int >= 1, got {self.limit!r}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not self.ks or any(k < 1 for k in self.ks):
      raise ValueError(f"ks must be positive budgets, got {self.ks}")
    templates.get(self.template)
    if model_config is not None:
      total = self.max_prompt_len + self.max_new_tokens
      if total > model_config.max_position_embeddings:
        raise ValueError(
            f"max_prompt_len ({self.max_prompt_len}) + max_new_tokens ({self.max_new_tokens}) "
            f"= {total} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); lower one of them")


@dataclasses.dataclass
class Model:
  """What the evaluation needs of a checkpoint."""
  params: Any
  config: Any  # models.config.ModelConfig
  tokenizer: Any  # ByteTokenizer or models.tokenizer.HFTokenizer
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prompts:
  """The prompts of one benchmark that will be evaluated, and those that were skipped."""
  name: str
  records: list[dict[str, Any]]
  ids: list[list[int]]
  positions: list[int]  # index of each record in the benchmark (its random stream)
  skipped: list[tuple[str, str]]
  scanned: int


def encode_prompts(bench: benchmarks_lib.Benchmark, tokenizer, settings: EvalSettings
                   ) -> Prompts:
  """Renders and encodes the first `limit` prompts that fit in `max_prompt_len` tokens.

  The synthetic task's prompt is `<bos>` + the problem text, as in training; the others
  are `templates.render(problem, tokenizer, template, chat=...)`.
  """
  out = Prompts(bench.name, [], [], [], [], 0)
  for i, rec in enumerate(bench.records):
    if settings.limit is not None and len(out.records) >= settings.limit:
      break
    out.scanned += 1
    rid = str(rec.get("id", i))
    try:
      if rec.get("verifier") == "synthetic":
        ids = tokenizer.encode(rec["problem"], add_bos=tokenizer.bos_id is not None)
      else:
        text = templates.render(rec["problem"], tokenizer, settings.template,
                                verifier=rec.get("verifier", "math"), chat=settings.chat)
        ids = tokenizer.encode(text, add_bos=settings.add_bos)
    except (KeyError, TypeError, ValueError) as e:
      out.skipped.append((rid, f"cannot render the prompt ({type(e).__name__}: {e})"))
      continue
    if not ids:
      out.skipped.append((rid, "the prompt encodes to no tokens"))
    elif len(ids) > settings.max_prompt_len:
      out.skipped.append((rid, f"prompt has {len(ids)} tokens, over max_prompt_len="
                               f"{settings.max_prompt_len}"))
    else:
      out.records.append(rec)
      out.ids.append(list(ids))
      out.positions.append(i)
  return out


def delimiter_ids(tokenizer, delimiter: str | None) -> tuple[int, ...] | None:
  if not delimiter:
    return None
  ids = tuple(int(i) for i in tokenizer.encode(delimiter))
  return ids or None


@dataclasses.dataclass
class Responses:
  """Per-response results of one benchmark, rows b * G + g, as host arrays."""
  texts: list[str]
  lengths: np.ndarray
  truncated: np.ndarray
  entropy: np.ndarray
  answer_entropy: np.ndarray | None
  answer_fallback: np.ndarray | None
  correct: np.ndarray
  reasons: list[str]
  answers: list[str | None]


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def sample_and_verify(model: Model, prompts: Prompts, settings: EvalSettings, *,
                      pad_len: int, rng: jax.Array, pool: rewards.VerifierPool | None = None,
                      on_batch: Callable[[int], None] | None = None) -> Responses:
  """Samples `num_samples` responses per prompt and scores them."""
  g, tok = settings.num_samples, model.tokenizer
  delim = delimiter_ids(tok, settings.segment_delimiter)
  eos = tuple(tok.eos_ids)
  jnp_verify = isinstance(tok, ByteTokenizer)
  texts, lengths, truncated, ent, ans_ent, fallback, jnp_correct = [], [], [], [], [], [], []
  b = settings.batch_size
  for start, stop in _batches(len(prompts.ids), b):
    rows = list(range(start, stop)) + [start] * (b - (stop - start))  # fixed batch shape
    ids_BxP = np.full((b, pad_len), tok.pad_id, np.int32)
    mask_BxP = np.zeros((b, pad_len), np.int32)
    for r, i in enumerate(rows):
      p = prompts.ids[i]
      ids_BxP[r, pad_len - len(p):] = p
      mask_BxP[r, pad_len - len(p):] = 1
    gen = engine.generate(
        model.params, ids_BxP, mask_BxP, rng, config=model.config, group_size=g,
        max_new_tokens=settings.max_new_tokens, eos_ids=eos, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, pad_id=tok.pad_id,
        prompt_ids_B=np.asarray([prompts.positions[i] for i in rows], np.int32))
    keep = (stop - start) * g
    h = calibration.entropy_proxy_jit(gen.logps_NxT, gen.completion_mask_NxT)
    parts = {"ids": gen.completion_ids_NxT, "len": gen.lengths_N, "trunc": gen.truncated_N,
             "h": h}
    if delim is not None:
      parts["h_ans"], parts["fb"] = calibration.segment_entropy_proxy_jit(
          gen.logps_NxT, gen.completion_ids_NxT, gen.completion_mask_NxT, segment="answer",
          delimiter=delim)
    if jnp_verify and prompts.name == benchmarks_lib.SYNTHETIC:
      answers_N = np.repeat([int(prompts.records[i]["answer"]) for i in rows], g)
      parts["ok"] = synthetic.verify(gen.completion_ids_NxT, gen.completion_mask_NxT,
                                     jnp.asarray(answers_N, jnp.int32))
    host = jax.device_get(parts)
    for n in range(keep):
      texts.append(tok.decode(host["ids"][n, :host["len"][n]].tolist()))
    lengths.append(host["len"][:keep])
    truncated.append(host["trunc"][:keep])
    ent.append(host["h"][:keep])
    if delim is not None:
      ans_ent.append(host["h_ans"][:keep])
      fallback.append(host["fb"][:keep])
    if "ok" in host:
      jnp_correct.append(host["ok"][:keep])
    if on_batch is not None:
      on_batch(stop - start)

  kinds = [rec.get("verifier", "math") for rec in prompts.records for _ in range(g)]
  refs = [str(rec["answer"]) for rec in prompts.records for _ in range(g)]
  if jnp_correct:
    correct = np.concatenate(jnp_correct).astype(bool)
    reasons = ["match" if c else "jnp verifier: no match" for c in correct]
  elif texts:
    verdict = rewards.verify_batch(texts, refs, kind=kinds, timeout=settings.verify_timeout,
                                   pool=pool)
    correct, reasons = np.asarray(verdict.correct, bool), list(verdict.reasons)
  else:
    correct, reasons = np.zeros((0,), bool), []
  cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros((0,), dtype)
  return Responses(
      texts=texts, lengths=cat(lengths, np.int64), truncated=cat(truncated, bool),
      entropy=cat(ent, np.float64),
      answer_entropy=cat(ans_ent, np.float64) if delim is not None else None,
      answer_fallback=cat(fallback, bool) if delim is not None else None,
      correct=correct, reasons=reasons,
      answers=[passk.answer_key(t, k) for t, k in zip(texts, kinds)])


def _group_summary(correct_BxG: np.ndarray, answers_BxG: list, conf_N: np.ndarray,
                   entropy_N: np.ndarray, ks: Sequence[int], num_bins: int) -> dict[str, Any]:
  g = correct_BxG.shape[1]
  kmax = max([k for k in ks if k <= g] or [1])
  cal = calibration.calibration_metrics(conf_N, correct_BxG.reshape(-1), entropy_N,
                                        num_bins=num_bins)
  out = {"num_problems": int(correct_BxG.shape[0]),
         "pass@1": passk.mean_pass_at_k(correct_BxG, 1),
         f"pass@{kmax}": passk.mean_pass_at_k(correct_BxG, kmax),
         f"maj@{kmax}": passk.maj_at_ks(answers_BxG, correct_BxG, [kmax])[str(kmax)]}
  for key in ("auroc", "entropy_gap"):
    out[key] = cal[key]
    if cal[key] is None:
      out[f"{key}_undefined_reason"] = cal[f"{key}_undefined_reason"]
  return out


def summarize(prompts: Prompts, resp: Responses, settings: EvalSettings,
              bench: benchmarks_lib.Benchmark | None = None) -> dict[str, Any]:
  """The JSON summary of one benchmark (see the module docstring for what it holds)."""
  g = settings.num_samples
  out: dict[str, Any] = {
      "num_problems": len(prompts.records), "num_samples": g,
      "num_responses": int(resp.correct.size),
      "skipped": {"count": len(prompts.skipped), "scanned": prompts.scanned,
                  "records": [list(s) for s in prompts.skipped[:100]]},
  }
  if bench is not None:
    out["source"] = bench.source
    if bench.bad_records is not None and bench.bad_records.num_bad:
      out["bad_records"] = bench.bad_records.to_json()
  if not prompts.records:
    out["undefined_reason"] = (f"no problem was evaluated: {len(prompts.skipped)} of "
                               f"{prompts.scanned} scanned were skipped")
    return out
  correct_BxG = resp.correct.reshape(-1, g)
  answers_BxG = [resp.answers[i * g:(i + 1) * g] for i in range(correct_BxG.shape[0])]
  conf = np.exp(-resp.entropy)
  out["pass@k"] = passk.pass_at_ks(correct_BxG, settings.ks)
  out["maj@k"] = passk.maj_at_ks(answers_BxG, correct_BxG, settings.ks)
  out["accuracy"] = float(resp.correct.mean())
  out["response_length"] = {"mean": float(resp.lengths.mean()),
                            "median": float(np.median(resp.lengths)),
                            "max": int(resp.lengths.max())}
  out["truncation_rate"] = float(resp.truncated.mean())
  out["no_answer_rate"] = float(np.mean([a is None for a in resp.answers]))
  out["calibration"] = calibration.calibration_metrics(conf, resp.correct, resp.entropy,
                                                       num_bins=settings.num_bins)
  out["reliability"] = calibration.reliability_bins(conf, resp.correct,
                                                    num_bins=settings.num_bins)
  if resp.answer_entropy is not None:
    fallbacks = int(resp.answer_fallback.sum())
    out["answer_segment"] = {"delimiter": settings.segment_delimiter, "fallbacks": fallbacks}
    if fallbacks == resp.correct.size:
      out["answer_segment"]["undefined_reason"] = (
          f"no response contains the delimiter {settings.segment_delimiter!r}, so the "
          "answer segment is the whole response (see calibration)")
    else:
      out["answer_segment"]["calibration"] = calibration.calibration_metrics(
          np.exp(-resp.answer_entropy), resp.correct, resp.answer_entropy,
          num_bins=settings.num_bins)
  for field, missing in (("subject", ""), ("level", records_lib.NO_LEVEL)):
    values = [rec.get(field, missing) for rec in prompts.records]
    if all(v == missing for v in values):
      continue
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for b, v in enumerate(values):
      groups[str(v) if v != missing else "(none)"].append(b)
    out[f"by_{field}"] = {
        key: _group_summary(correct_BxG[idx], [answers_BxG[b] for b in idx],
                            conf.reshape(-1, g)[idx].reshape(-1),
                            resp.entropy.reshape(-1, g)[idx].reshape(-1),
                            settings.ks, settings.num_bins)
        for key, idx in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}
  out["verdicts"] = dict(collections.Counter(resp.reasons).most_common(10))
  return out


def _sort_key(value: str):
  try:
    return (0, float(value), "")
  except ValueError:
    return (1, 0.0, value)


def benchmark_rng(seed: int, name: str) -> jax.Array:
  """The sampling key of one benchmark: independent of the other benchmarks evaluated."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def evaluate(model: Model, names: Sequence[str], settings: EvalSettings, *,
             loaded: dict[str, benchmarks_lib.Benchmark] | None = None,
             load_kwargs: dict[str, Any] | None = None, progress: bool = True,
             keep_responses: bool = False, pool: rewards.VerifierPool | None = None
             ) -> dict[str, Any]:
  """Evaluates `model` on the benchmarks `names`; returns the results dict.

  Args:
    model: params, config and tokenizer.
    names: benchmarks (`benchmarks.BENCHMARKS`).
    settings: sampling and scoring settings.
    loaded: already loaded benchmarks by name (else `benchmarks.load(name, **load_kwargs)`).
    load_kwargs: arguments of `benchmarks.load` (data_dir, synthetic_difficulty, ...).
    progress: show a progress bar per benchmark.
    keep_responses: also return the per-response results (results["responses"][name]).
    pool: the verification pool (default: the shared one).

  Returns:
    {"settings": ..., "benchmarks": {name: summary}, "responses": ... (optional)}
  """
  settings.validate(model.config)
  benches = {n: (loaded or {}).get(n) or benchmarks_lib.load(n, **(load_kwargs or {}))
             for n in benchmarks_lib.parse_names(list(names))}
  prompts = {n: encode_prompts(b, model.tokenizer, settings) for n, b in benches.items()}
  lengths = [len(p) for ps in prompts.values() for p in ps.ids]
  pad_len = max(lengths) if lengths else 1
  results: dict[str, Any] = {"settings": dataclasses.asdict(settings), "benchmarks": {},
                             "prompt_pad_len": pad_len}
  kept: dict[str, Any] = {}
  for n, ps in prompts.items():
    with tqdm.tqdm(total=len(ps.ids), desc=n, unit="problem", disable=not progress,
                   leave=True) as bar:
      resp = sample_and_verify(model, ps, settings, pad_len=pad_len,
                               rng=benchmark_rng(settings.seed, n), pool=pool,
                               on_batch=bar.update)
      results["benchmarks"][n] = summarize(ps, resp, settings, benches[n])
      acc = results["benchmarks"][n].get("accuracy")
      if acc is not None:
        bar.set_postfix(pass1=f"{acc:.3f}")
    if keep_responses:
      kept[n] = (ps, resp)
  if keep_responses:
    results["responses"] = kept
  return results


def response_rows(prompts: Prompts, resp: Responses, num_samples: int):
  """Per-response JSON rows (for responses_<benchmark>.jsonl)."""
  for n, text in enumerate(resp.texts):
    rec = prompts.records[n // num_samples]
    row = {"id": str(rec.get("id", "")), "sample": n % num_samples, "response": text,
           "reference": str(rec["answer"]), "answer": resp.answers[n],
           "correct": bool(resp.correct[n]), "reason": resp.reasons[n],
           "length": int(resp.lengths[n]), "truncated": bool(resp.truncated[n]),
           "entropy": float(resp.entropy[n]), "confidence": float(np.exp(-resp.entropy[n]))}
    if resp.answer_entropy is not None:
      row["answer_entropy"] = float(resp.answer_entropy[n])
      row["answer_fallback"] = bool(resp.answer_fallback[n])
    yield row
