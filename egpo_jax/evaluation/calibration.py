"""Does the policy know when it is right? Calibration of response confidence vs correctness.

EGPO's metacognitive claim (paper Fig. 3, Table 3) is that after training the policy's
uncertainty separates its right answers from its wrong ones. The uncertainty of a
response is the entropy proxy H~ of docs/METHOD.md (Eq. 5: the mean negative
log-probability of its sampled tokens) and its confidence is

    confidence = exp(-H~)      (the geometric-mean probability of its sampled tokens).

Metrics over N responses (only those with valid_N set):
  ece           expected calibration error with `num_bins` EQUAL-MASS bins:
                sum_b (n_b / N) |accuracy_b - mean confidence_b|. Responses are ranked by
                confidence; a response whose confidence is larger than exactly r others
                goes to bin floor(r * num_bins / N), so tied confidences share a bin and
                the result does not depend on the order of the inputs.
  brier         mean (confidence - correct)^2.
  auroc         area under the ROC curve of confidence as a score for "correct" (ties
                count 1/2); equal to the AUROC of H~ for predicting a WRONG answer,
                the paper's Table 3 quantity, since exp(-x) is decreasing.
  mean_entropy_correct / mean_entropy_wrong / entropy_gap (= wrong - correct):
                the Fig. 3 quantities (after EGPO: 0.080 vs 0.129, gap 0.048).
  overconfident_failure_frac
                the fraction of wrong responses whose confidence is strictly above the
                median confidence of the correct ones.
A metric that needs both classes (auroc, the gap, ...) is undefined when all responses are
right or all are wrong; `calibration_metrics` then reports None and a
`<metric>_undefined_reason` string, never a NaN.

`calibration_stats` is the jittable core (NaN where undefined, with the class counts);
`calibration_metrics` is the host-side, JSON-safe wrapper; `evaluate_generation` is what
the trainer calls on a `sampling.engine.Generation` and its verdicts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.core import entropy as entropy_lib
from egpo_jax.evaluation import passk

DEFAULT_NUM_BINS = 10
# Metrics reported by calibration_metrics, in table order.
METRICS = ("accuracy", "mean_confidence", "ece", "brier", "auroc", "mean_entropy_correct",
           "mean_entropy_wrong", "entropy_gap", "overconfident_failure_frac",
           "median_confidence_correct")
_NEEDS_CORRECT = ("auroc", "mean_entropy_correct", "entropy_gap",
                  "overconfident_failure_frac", "median_confidence_correct")
_NEEDS_WRONG = ("auroc", "mean_entropy_wrong", "entropy_gap", "overconfident_failure_frac")


def calibration_stats(confidence_N: jax.Array, correct_N: jax.Array, entropy_N: jax.Array,
                      valid_N: jax.Array | None = None, *,
                      num_bins: int = DEFAULT_NUM_BINS) -> dict[str, jax.Array]:
  """The calibration metrics as float32 scalars (NaN where undefined); jittable.

  Args:
    confidence_N: confidence of each response in [0, 1], e.g. exp(-H~).
    correct_N: bool verdicts.
    entropy_N: the entropy proxy H~ of each response (Eq. 5).
    valid_N: bool, the responses that count (default: all). Rows that do not count may
      hold anything, NaN included.
    num_bins: number of equal-mass bins of the ECE (static).

  Returns:
    scalars `num_valid`, `num_correct`, `num_wrong` (int32) and the `METRICS` (float32),
    plus the reliability diagram `bin_count_K` (int32), `bin_confidence_K` and
    `bin_accuracy_K` (float32, NaN for an empty bin), K = num_bins.
  """
  chex.assert_rank([confidence_N, correct_N, entropy_N], 1)
  chex.assert_equal_shape([confidence_N, correct_N, entropy_N])
  chex.assert_type(correct_N, bool)
  if valid_N is None:
    valid_N = jnp.ones(correct_N.shape, bool)
  chex.assert_equal_shape([valid_N, correct_N])
  chex.assert_type(valid_N, bool)
  if not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")

  conf_N = jnp.where(valid_N, jnp.asarray(confidence_N, jnp.float32), 0.0)
  ent_N = jnp.where(valid_N, jnp.asarray(entropy_N, jnp.float32), 0.0)
  pos_N = valid_N & correct_N
  neg_N = valid_N & ~correct_N
  n_valid, n_pos, n_neg = (jnp.sum(m, dtype=jnp.int32) for m in (valid_N, pos_N, neg_N))
  fv, fp, fn = (jnp.maximum(x, 1).astype(jnp.float32) for x in (n_valid, n_pos, n_neg))
  y_N = pos_N.astype(jnp.float32)
  nan = jnp.float32(jnp.nan)

  def only(mask_N):  # Confidences of one class, sorted, the others pushed past the end.
    return jnp.sort(jnp.where(mask_N, conf_N, jnp.inf))

  # Equal-mass bins by rank; tied confidences take the bin of their lowest rank.
  below_N = jnp.searchsorted(only(valid_N), conf_N, side="left")
  bin_N = jnp.where(valid_N, below_N * num_bins // jnp.maximum(n_valid, 1), num_bins)
  seg = functools.partial(jax.ops.segment_sum, segment_ids=bin_N, num_segments=num_bins + 1)
  count_K = seg(valid_N.astype(jnp.int32))[:num_bins]
  conf_sum_K = seg(conf_N)[:num_bins]
  hits_K = seg(y_N)[:num_bins]
  ece = jnp.sum(jnp.abs(conf_sum_K - hits_K)) / fv
  brier = jnp.sum(jnp.where(valid_N, (conf_N - y_N) ** 2, 0.0)) / fv

  # AUROC (Mann-Whitney): per correct response, the share of wrong ones it outranks.
  neg_sorted = only(neg_N)
  lt_N = jnp.searchsorted(neg_sorted, conf_N, side="left")
  le_N = jnp.searchsorted(neg_sorted, conf_N, side="right")
  auroc = jnp.sum(jnp.where(pos_N, (lt_N + le_N).astype(jnp.float32) / (2.0 * fn), 0.0)) / fp

  h_pos = jnp.sum(jnp.where(pos_N, ent_N, 0.0)) / fp
  h_neg = jnp.sum(jnp.where(neg_N, ent_N, 0.0)) / fn
  pos_sorted = only(pos_N)
  lo, hi = jnp.maximum(n_pos - 1, 0) // 2, n_pos // 2
  median_pos = 0.5 * (pos_sorted[jnp.minimum(lo, pos_sorted.shape[0] - 1)] +
                      pos_sorted[jnp.minimum(hi, pos_sorted.shape[0] - 1)])
  overconfident = jnp.sum(neg_N & (conf_N > median_pos)) / fn

  has_any, has_pos, has_neg = n_valid > 0, n_pos > 0, n_neg > 0
  both = has_pos & has_neg
  k_valid = count_K > 0
  return {
      "num_valid": n_valid, "num_correct": n_pos, "num_wrong": n_neg,
      "accuracy": jnp.where(has_any, jnp.sum(y_N) / fv, nan),
      "mean_confidence": jnp.where(has_any, jnp.sum(conf_N) / fv, nan),
      "ece": jnp.where(has_any, ece, nan),
      "brier": jnp.where(has_any, brier, nan),
      "auroc": jnp.where(both, auroc, nan),
      "mean_entropy_correct": jnp.where(has_pos, h_pos, nan),
      "mean_entropy_wrong": jnp.where(has_neg, h_neg, nan),
      "entropy_gap": jnp.where(both, h_neg - h_pos, nan),
      "overconfident_failure_frac": jnp.where(both, overconfident, nan),
      "median_confidence_correct": jnp.where(has_pos, median_pos, nan),
      "bin_count_K": count_K,
      "bin_confidence_K": jnp.where(k_valid, conf_sum_K / jnp.maximum(count_K, 1), nan),
      "bin_accuracy_K": jnp.where(k_valid, hits_K / jnp.maximum(count_K, 1), nan),
  }


_stats_jit = jax.jit(calibration_stats, static_argnames=("num_bins",))


def _bucket(n: int) -> int:
  """Inputs are padded to a power of two (>= 64) so that few shapes get compiled."""
  return max(64, 1 << max(0, n - 1).bit_length())


def _host_inputs(confidence_N, correct_N, entropy_N, valid_N):
  """Validates on the host (jitted code cannot raise on values) and pads to a bucket."""
  conf = np.asarray(jax.device_get(confidence_N), np.float64)
  corr = np.asarray(jax.device_get(correct_N))
  ent = np.asarray(jax.device_get(entropy_N), np.float64)
  if conf.ndim != 1 or corr.shape != conf.shape or ent.shape != conf.shape:
    raise ValueError(f"confidence_N, correct_N and entropy_N must be 1-D arrays of one "
                     f"length N, got shapes {conf.shape}, {corr.shape}, {ent.shape}")
  if corr.dtype != np.bool_:
    raise ValueError(f"correct_N must be bool, got {corr.dtype}; pass correct.astype(bool)")
  valid = np.ones(conf.shape, bool) if valid_N is None else np.asarray(jax.device_get(valid_N))
  if valid.shape != conf.shape or valid.dtype != np.bool_:
    raise ValueError(f"valid_N must be a bool array of shape {conf.shape}, got "
                     f"{valid.dtype} {valid.shape}")
  bad = valid & ~(np.isfinite(conf) & (conf >= 0) & (conf <= 1))
  if bad.any():
    raise ValueError(f"confidence_N must be finite and in [0, 1]; rows "
                     f"{np.flatnonzero(bad)[:8].tolist()} are {conf[bad][:8].tolist()}")
  bad = valid & ~np.isfinite(ent)
  if bad.any():
    raise ValueError(f"entropy_N must be finite; rows {np.flatnonzero(bad)[:8].tolist()} "
                     "are not (were the log-probs masked?)")
  n = conf.shape[0]
  pad = _bucket(n) - n
  return (np.pad(conf, (0, pad)).astype(np.float32), np.pad(corr, (0, pad)),
          np.pad(ent, (0, pad)).astype(np.float32), np.pad(valid, (0, pad)))


def _reasons(n_valid: int, n_pos: int, n_neg: int) -> dict[str, str]:
  if n_valid == 0:
    return {m: "no responses to evaluate" for m in METRICS}
  out: dict[str, str] = {}
  if n_pos == 0:
    why = (f"no correct response (all {n_valid} are wrong); it needs correct and wrong "
           "responses")
    out.update({m: why for m in _NEEDS_CORRECT})
  if n_neg == 0:
    why = (f"no wrong response (all {n_valid} are correct); it needs correct and wrong "
           "responses")
    out.update({m: why for m in _NEEDS_WRONG if m not in out})
  return out


def calibration_metrics(confidence_N, correct_N, entropy_N, valid_N=None, *,
                        num_bins: int = DEFAULT_NUM_BINS) -> dict[str, float | int | str | None]:
  """The calibration metrics of N responses as a JSON-safe dict.

  Args:
    confidence_N: confidence in [0, 1] of each response, e.g. exp(-H~).
    correct_N: bool verdict of each response.
    entropy_N: entropy proxy H~ (Eq. 5) of each response.
    valid_N: bool, the responses that count (default: all).
    num_bins: equal-mass bins of the ECE.

  Returns:
    num_responses, num_correct, num_wrong (ints) and each of `METRICS` as a float, or
    None when undefined together with `<metric>_undefined_reason` (a string saying why).
  """
  conf, corr, ent, valid = _host_inputs(confidence_N, correct_N, entropy_N, valid_N)
  stats = jax.device_get(_stats_jit(conf, corr, ent, valid, num_bins=num_bins))
  n_valid, n_pos, n_neg = (int(stats[k]) for k in ("num_valid", "num_correct", "num_wrong"))
  reasons = _reasons(n_valid, n_pos, n_neg)
  out: dict[str, Any] = {"num_responses": n_valid, "num_correct": n_pos, "num_wrong": n_neg}
  for m in METRICS:
    value = float(stats[m])
    out[m] = None if m in reasons or not np.isfinite(value) else value
    if out[m] is None:
      out[f"{m}_undefined_reason"] = reasons.get(m, "not finite")
  return out


def reliability_bins(confidence_N, correct_N, valid_N=None, *,
                     num_bins: int = DEFAULT_NUM_BINS) -> dict[str, list]:
  """The reliability diagram of `calibration_metrics`'s ECE, JSON-safe.

  Returns:
    {"count": [K ints], "confidence": [K], "accuracy": [K]}: per equal-mass bin (lowest
    confidence first) its size, mean confidence and accuracy (None for an empty bin).
  """
  conf = np.asarray(jax.device_get(confidence_N))
  conf, corr, ent, valid = _host_inputs(conf, correct_N, np.zeros(conf.shape), valid_N)
  stats = jax.device_get(_stats_jit(conf, corr, ent, valid, num_bins=num_bins))
  none_if_nan = lambda xs: [None if not np.isfinite(x) else float(x) for x in xs]
  return {"count": [int(c) for c in stats["bin_count_K"]],
          "confidence": none_if_nan(stats["bin_confidence_K"]),
          "accuracy": none_if_nan(stats["bin_accuracy_K"])}


def prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {f"{prefix}{k}": v for k, v in metrics.items()}


def numeric(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
  """The metrics without the `*_undefined_reason` strings (for TensorBoard / plots)."""
  return {k: v for k, v in metrics.items() if not isinstance(v, str)}


# One compilation per shape, instead of one per eager op.
entropy_proxy_jit = jax.jit(entropy_lib.entropy_proxy)
segment_entropy_proxy_jit = jax.jit(entropy_lib.segment_entropy_proxy,
                                    static_argnames=("segment", "delimiter"))


def response_confidence(logps_NxT: jax.Array, mask_NxT: jax.Array
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(confidence_N = exp(-H~), H~_N) on the host, H~ = `core.entropy.entropy_proxy`."""
  h_N = np.asarray(jax.device_get(entropy_proxy_jit(logps_NxT, mask_NxT)), np.float64)
  return np.exp(-h_N), h_N


def evaluate_generation(gen, correct_N, *, group_size: int | None = None,
                        delimiter_ids: Sequence[int] | None = None, valid_N=None,
                        num_bins: int = DEFAULT_NUM_BINS,
                        ks: Sequence[int] = passk.DEFAULT_KS) -> dict[str, Any]:
  """Accuracy, lengths and calibration of one batch of sampled responses (cheap, host side).

  The trainer calls it every K iterations on the responses to a validation split.

  Args:
    gen: a `sampling.engine.Generation` (rows b * G + g), or anything with its
      completion_ids_NxT, completion_mask_NxT, logps_NxT, lengths_N, truncated_N.
    correct_N: bool verdict of each row.
    group_size: G; when given (and every row is valid), pass@k for the k in `ks` <= G.
    delimiter_ids: token ids of the reasoning delimiter (e.g. "</think>"); when given,
      the same calibration metrics from answer-segment tokens are added as "answer_*"
      (a response without the delimiter falls back to all its tokens, as in training),
      with `answer_segment_fallbacks`, the number of such responses.
    valid_N: bool, the rows that count (default: all).
    num_bins: equal-mass bins of the ECE.
    ks: the pass@k budgets.

  Returns:
    a JSON-safe dict: accuracy, num_responses, response_length, truncation_rate, the
    `calibration_metrics` keys, and optionally pass@k and answer_* keys.
  """
  mask_NxT = jnp.asarray(gen.completion_mask_NxT)
  chex.assert_rank([gen.completion_ids_NxT, mask_NxT, gen.logps_NxT], 2)
  chex.assert_equal_shape([gen.completion_ids_NxT, mask_NxT, gen.logps_NxT])
  correct = np.asarray(jax.device_get(correct_N))
  n = mask_NxT.shape[0]
  if correct.shape != (n,) or correct.dtype != np.bool_:
    raise ValueError(f"correct_N must be bool of shape ({n},) like the generation's rows, "
                     f"got {correct.dtype} {correct.shape}")
  valid = np.ones((n,), bool) if valid_N is None else np.asarray(jax.device_get(valid_N))
  conf, h = response_confidence(gen.logps_NxT, mask_NxT)
  lengths = np.asarray(jax.device_get(gen.lengths_N), np.float64)
  truncated = np.asarray(jax.device_get(gen.truncated_N), bool)
  num_valid = max(int(valid.sum()), 1)
  out: dict[str, Any] = {
      "response_length": float(lengths[valid].sum() / num_valid),
      "truncation_rate": float(truncated[valid].sum() / num_valid),
      **calibration_metrics(conf, correct, h, valid, num_bins=num_bins)}
  if group_size is not None and valid.all():
    if n % group_size:
      raise ValueError(f"group_size={group_size} does not divide the {n} rows")
    for k, v in passk.pass_at_ks(correct.reshape(-1, group_size), ks).items():
      out[f"pass@{k}"] = v
  if delimiter_ids is not None:
    h_ans, fallback = segment_entropy_proxy_jit(
        gen.logps_NxT, gen.completion_ids_NxT, mask_NxT, segment="answer",
        delimiter=tuple(int(i) for i in delimiter_ids))
    h_ans = np.asarray(jax.device_get(h_ans), np.float64)
    fallback = np.asarray(jax.device_get(fallback), bool) & valid
    out["answer_segment_fallbacks"] = int(fallback.sum())
    answer = calibration_metrics(np.exp(-h_ans), correct, h_ans, valid, num_bins=num_bins)
    if valid.any() and fallback[valid].all():
      why = ("no response has an answer segment (the delimiter is in none of them), so it "
             "would repeat the whole-response metrics")
      for m in METRICS:
        answer[m] = None
        answer[f"{m}_undefined_reason"] = why
    out.update(prefixed(answer, "answer_"))
  return out
