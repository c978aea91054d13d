"""Statistics over seeds: intervals, paired tests, Holm's correction, power and sample size.

Seeds are the unit of replication: one value per seed and algorithm (e.g. the final
validation accuracy). Runs of one seed share the warm start, the RL random stream and the
validation prompts and keys, so two algorithms' values at one seed are a PAIR and their
difference d_s = a_s - b_s is what the tests use.

  mean_ci         mean and t-interval  x_bar +- t_{1-(1-c)/2, n-1} s / sqrt(n)
  mean_ci_curve   the same at every point of a curve, optionally clipped (fractions: [0, 1])
  paired_test     paired t-test and sign-flip permutation test of d, with d's t-interval
  sign_flip_test  two-sided permutation p of mean(d) under random signs (exact to 2^16)
  holm            Holm's step-down adjusted p-values (family-wise error rate)
  summarize       per-algorithm intervals and Holm-corrected paired tests vs references
  power_paired    power of the two-sided paired t-test: P(|T| > t_crit) with T ~ noncentral
                  t(n - 1, delta sqrt(n) / sd_d)
  required_n      the smallest n with power >= target (a pilot's sd_d, an effect delta)
  sd_upper_bound  the upper confidence limit of a pilot's SD, to plan with
  mde_paired      the smallest delta detected with the target power at n pairs
  bootstrap_ci    percentile bootstrap interval of any statistic, resampling the units
                  (seeds or prompts) of paired samples with the same indices
  bootstrap_mean_ci, bootstrap_paired_ci   ... of a mean over seeds / a mean paired difference
  bootstrap_calibration   AUROC and ECE of exp(-H~) with intervals from resampling PROMPTS
                  (all samples of a prompt together), optionally paired with a second model
  markdown_table, tests_table   Markdown renderings of `summarize`

Everything is numpy/scipy on the host (the prompt bootstrap vmaps the jnp calibration
metrics over resamples); NaN marks an undefined value (e.g. AUROC when a run
has no wrong answer) and is dropped pairwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

from egpo_jax.evaluation import calibration

# Sign-flip tests enumerate all 2^n sign patterns up to this many; beyond it they draw
# this many patterns from a fixed seed (the p-value is then a deterministic estimate).
EXACT_SIGN_FLIPS = 2**16


def _finite(values: Any) -> np.ndarray:
  x = np.asarray(values, np.float64).ravel()
  return x[np.isfinite(x)]


def _check_level(name: str, value: float) -> None:
  if not 0 < value < 1:
    raise ValueError(f"{name}={value} must be in (0, 1)")


def mean_ci(values_S: Any, confidence: float = 0.95,
            bounds: tuple[float, float] | None = None) -> tuple[float, float, float, int]:
  """Mean and two-sided t-distribution confidence interval over seeds (NaNs dropped).

  Returns (mean, low, high, n); the interval is NaN with fewer than 2 values. `bounds`
  (lo, hi) clips the interval to the range of the quantity, e.g. (0, 1) for a fraction
  (a t-interval knows nothing of the range).
  """
  _check_level("confidence", confidence)
  x = _finite(values_S)
  n = x.size
  if n == 0:
    return math.nan, math.nan, math.nan, 0
  mean = float(x.mean())
  if n < 2:
    return mean, math.nan, math.nan, n
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  low, high = mean - half, mean + half
  if bounds is not None:
    low, high = float(np.clip(low, *bounds)), float(np.clip(high, *bounds))
  return mean, low, high, n


def mean_ci_curve(values_SxT: Any, confidence: float = 0.95,
                  bounds: tuple[float, float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`mean_ci` at every point t of a curve: (mean_T, low_T, high_T).

  Args:
    values_SxT: one value per seed and curve point.
    confidence: level of the intervals.
    bounds: as in `mean_ci`, e.g. (0, 1) for a fraction.
  """
  x = np.asarray(values_SxT, np.float64)
  chex.assert_rank(x, 2)
  out = np.array([mean_ci(x[:, t], confidence, bounds)[:3] for t in range(x.shape[1])])
  mean_T, low_T, high_T = out.reshape(x.shape[1], 3).T
  return mean_T, low_T, high_T


def sign_flip_test(d_S: Any, *, seed: int = 0) -> float:
  """Two-sided sign-flip permutation p-value of mean(d) = 0 (NaNs dropped).

  Under H0 (the pair's two values are exchangeable) every sign pattern of d is equally
  likely; p = P(|mean(+-d)| >= |mean(d)|). Exact up to `EXACT_SIGN_FLIPS` patterns,
  else estimated from that many random patterns drawn with `seed`. NaN with fewer than 2
  differences or when all are 0.
  """
  d = _finite(d_S)
  if d.size < 2 or np.all(d == 0):
    return math.nan
  res = scipy_stats.permutation_test(
      (d,), np.mean, permutation_type="samples", alternative="two-sided",
      n_resamples=EXACT_SIGN_FLIPS, rng=np.random.default_rng(seed))
  return float(res.pvalue)


def paired_test(a_S: Any, b_S: Any, confidence: float = 0.95) -> dict[str, float]:
  """Two-sided paired tests of a - b over seeds (pairs with a NaN dropped).

  Returns diff (mean of d = a - b), its t-interval (diff_low, diff_high), sd (of d,
  ddof 1), p (paired t-test), p_sign_flip (`sign_flip_test`) and n. p is NaN (no test)
  with fewer than 2 pairs or when every pair differs by the same amount: the t statistic
  is then undefined, and a discrete metric (e.g. one group in 160) repeating across few
  seeds is no evidence of an effect.
  """
  a, b = np.asarray(a_S, np.float64).ravel(), np.asarray(b_S, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"paired_test needs one value per seed on both sides, got {a.shape} "
                     f"and {b.shape}")
  ok = np.isfinite(a) & np.isfinite(b)
  d = a[ok] - b[ok]
  mean, low, high, n = mean_ci(d, confidence)
  constant = n < 2 or np.allclose(d, d[0], rtol=0.0, atol=1e-12)
  p = math.nan if constant else float(scipy_stats.ttest_rel(a[ok], b[ok]).pvalue)
  return {"diff": mean, "diff_low": low, "diff_high": high,
          "sd": float(d.std(ddof=1)) if n >= 2 else math.nan, "p": p,
          "p_sign_flip": math.nan if constant else sign_flip_test(d), "n": n}


def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error); NaNs stay NaN, outside
  the family."""
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(np.isfinite(p))
  m = idx.size
  if m == 0:
    return out
  order = idx[np.argsort(p[idx], kind="stable")]
  adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  out[order] = adjusted
  return out


def summarize(values_AxS: Any, names: Sequence[str], *,
              references: Sequence[str] = ("egpo", "grpo"), alpha: float = 0.05,
              confidence: float = 0.95) -> dict[str, Any]:
  """Per algorithm mean and CI over seeds; paired tests of every algorithm against each
  reference, with Holm's correction over all tests of this metric.

  Args:
    values_AxS: one metric, [algorithms, seeds] (e.g. final validation accuracy).
    names: the A algorithm names, in the order of the rows.
    references: algorithms everything else is compared with (those present are used).
    alpha: family-wise significance level of the Holm-corrected tests.
    confidence: level of the intervals.

  Returns:
    {"rows": [{"name", "mean", "low", "high", "n"}], "tests": [{"name", "reference",
     "diff", "diff_low", "diff_high", "sd", "p", "p_sign_flip", "p_holm", "significant",
     "n"}]}
  """
  x = np.asarray(values_AxS, np.float64)
  chex.assert_rank(x, 2)
  if x.shape[0] != len(names):
    raise ValueError(f"values_AxS has {x.shape[0]} rows but {len(names)} names were given")
  rows = []
  for name, row in zip(names, x):
    mean, low, high, n = mean_ci(row, confidence)
    rows.append({"name": name, "mean": mean, "low": low, "high": high, "n": n})
  tests, seen = [], set()
  index = {n: i for i, n in enumerate(names)}
  for ref in references:
    if ref not in index:
      continue
    for name in names:
      if name == ref or frozenset((name, ref)) in seen:
        continue   # each pair once (egpo vs grpo)
      seen.add(frozenset((name, ref)))
      tests.append({"name": name, "reference": ref,
                    **paired_test(x[index[name]], x[index[ref]], confidence)})
  for t, p_holm in zip(tests, holm([t["p"] for t in tests])):
    t["p_holm"] = float(p_holm)
    t["significant"] = bool(np.isfinite(p_holm) and p_holm < alpha)
  return {"rows": rows, "tests": tests}


# ---------------------------------------------------------------- bootstrap


def bootstrap_ci(statistic: Any, *samples: Any, n_resamples: int = 10_000,
                 confidence: float = 0.95, seed: int = 0,
                 bounds: tuple[float, float] | None = None) -> tuple[float, float, float, int]:
  """Percentile bootstrap interval of statistic(*samples).

  The units along axis 0 (seeds, or prompts with their samples on further axes) are drawn
  with replacement, with the SAME indices for every sample, so pairs stay pairs.

  Args:
    statistic: maps the samples, each with an extra leading resample axis [R, n, ...], to
      [R] values (vectorised); NaN values (an undefined resample) are dropped.
    *samples: arrays with the same length n along axis 0.
    n_resamples, seed: the bootstrap draws (deterministic given the seed).
    confidence: level of the interval.
    bounds: clip the interval to (lo, hi), e.g. (0, 1) for a fraction (a percentile
      interval of a statistic in that range already lies in it; the clip guards rounding).

  Returns:
    (estimate on the data, low, high, n); the interval is NaN with fewer than 2 units or
    when under half the resamples are defined.
  """
  _check_level("confidence", confidence)
  xs = [np.asarray(x) for x in samples]
  if not xs or len({x.shape[0] for x in xs}) != 1:
    raise ValueError("bootstrap_ci needs samples of one length along axis 0 (the units), "
                     f"got shapes {[x.shape for x in xs]}")
  n = xs[0].shape[0]
  if n == 0:
    return math.nan, math.nan, math.nan, 0
  estimate = float(np.asarray(statistic(*[x[None] for x in xs])).reshape(-1)[0])
  if n < 2:
    return estimate, math.nan, math.nan, n
  idx_RxN = _resample_indices(n, n_resamples, seed)
  values_R = np.asarray(statistic(*[x[idx_RxN] for x in xs]), np.float64).reshape(-1)
  if values_R.shape != (n_resamples,):
    raise ValueError(f"statistic must map [R, n, ...] samples to [R] values, got "
                     f"{values_R.shape} for R={n_resamples}")
  return (estimate, *_percentile_interval(values_R, confidence, bounds), n)


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
  """[R, n] unit indices drawn with replacement (one bootstrap resample per row)."""
  return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentile_interval(values_R: np.ndarray, confidence: float,
                         bounds: tuple[float, float] | None) -> tuple[float, float]:
  """The central `confidence` quantiles of the defined resampled values (NaN when under
  half of the resamples are defined), clipped to `bounds`."""
  finite = values_R[np.isfinite(values_R)]
  if finite.size < values_R.size / 2 or finite.size == 0:
    return math.nan, math.nan
  low, high = np.quantile(finite, [0.5 - confidence / 2, 0.5 + confidence / 2])
  if bounds is not None:
    low, high = np.clip(low, *bounds), np.clip(high, *bounds)
  return float(low), float(high)


def bootstrap_mean_ci(values_S: Any, *, bounds: tuple[float, float] | None = None,
                      **kwargs) -> tuple[float, float, float, int]:
  """`bootstrap_ci` of the mean over seeds (NaNs dropped first); e.g. per-seed AUROC."""
  return bootstrap_ci(lambda x: x.mean(-1), _finite(values_S), bounds=bounds, **kwargs)


def bootstrap_paired_ci(a_S: Any, b_S: Any, **kwargs) -> tuple[float, float, float, int]:
  """`bootstrap_ci` of mean(a - b) over seeds, resampling pairs (pairs with a NaN
  dropped); the bootstrap twin of `paired_test`'s t-interval."""
  a, b = np.asarray(a_S, np.float64).ravel(), np.asarray(b_S, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"bootstrap_paired_ci needs one value per seed on both sides, got "
                     f"{a.shape} and {b.shape}")
  ok = np.isfinite(a) & np.isfinite(b)
  return bootstrap_ci(lambda x, y: (x - y).mean(-1), a[ok], b[ok], **kwargs)


def bootstrap_calibration(confidence_PxG: Any, correct_PxG: Any,
                          reference: tuple[Any, Any] | None = None, *,
                          metrics: Sequence[str] = ("auroc", "ece"), num_bins: int = 10,
                          n_resamples: int = 2_000, confidence: float = 0.95, seed: int = 0
                          ) -> dict[str, tuple[float, float, float, int]]:
  """AUROC and ECE of a confidence (e.g. exp(-H~)) with prompt-bootstrap intervals.

  The G samples of a prompt are not independent (one prompt's difficulty), so whole
  prompts are resampled. The metrics are `evaluation.calibration.calibration_stats`'s
  (AUROC of confidence for a correct answer, ties 1/2; ECE over `num_bins` equal-mass
  bins), vmapped over the resamples. With `reference` = (confidence_PxG, correct_PxG) of a
  second model on the SAME prompts, the statistic is this model's metric minus the
  reference's, both on each resample's prompts (paired over prompts).

  Returns:
    {metric: (estimate, low, high, num_prompts)}; AUROC and ECE lie in [0, 1] and their
    intervals are bounded to it (differences to [-1, 1]).
  """
  def arrays(conf, corr):
    conf, corr = np.asarray(conf, np.float32), np.asarray(corr, bool)
    chex.assert_rank([conf, corr], 2)
    chex.assert_equal_shape([conf, corr])
    return conf, corr

  models = [arrays(confidence_PxG, correct_PxG)]
  if reference is not None:
    models.append(arrays(*reference))
    chex.assert_equal_shape([models[0][0], models[1][0]])
  unknown = set(metrics) - set(calibration.METRICS)
  if unknown:
    raise ValueError(f"metrics={list(metrics)}: {sorted(unknown)} are not calibration "
                     f"metrics; use names of evaluation.calibration.METRICS")

  _check_level("confidence", confidence)
  num_prompts = models[0][0].shape[0]

  def metric_values(idx_RxP):   # {metric: [R]}, this model minus the reference
    out = [jax.device_get(_calibration_per_resample(conf[idx_RxP], corr[idx_RxP],
                                                    num_bins=num_bins))
           for conf, corr in models]
    return {m: np.asarray(out[0][m], np.float64) - (
        np.asarray(out[1][m], np.float64) if len(out) > 1 else 0.0) for m in metrics}

  estimate = metric_values(np.arange(num_prompts)[None])
  resampled = (metric_values(_resample_indices(num_prompts, n_resamples, seed))
               if num_prompts >= 2 else None)
  bounds = (-1.0, 1.0) if reference is not None else (0.0, 1.0)
  result = {}
  for m in metrics:
    low, high = (_percentile_interval(resampled[m], confidence, bounds)
                 if resampled is not None else (math.nan, math.nan))
    result[m] = (float(estimate[m][0]), low, high, num_prompts)
  return result


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _calibration_per_resample(conf_RxPxG: jax.Array, corr_RxPxG: jax.Array, *,
                              num_bins: int) -> dict[str, jax.Array]:
  """`calibration_stats` of each resample's responses, vmapped over resamples."""
  def one(conf_PxG, corr_PxG):
    return calibration.calibration_stats(conf_PxG.reshape(-1), corr_PxG.reshape(-1),
                                         jnp.zeros(conf_PxG.size), num_bins=num_bins)
  return jax.vmap(one)(conf_RxPxG, corr_RxPxG)


# ---------------------------------------------------------------- power and sample size


def _check_design(sd_diff: float, alpha: float) -> None:
  if not (np.isfinite(sd_diff) and sd_diff > 0):
    raise ValueError(f"sd_diff={sd_diff} must be a positive number (the SD of the paired "
                     "differences, e.g. from a pilot)")
  _check_level("alpha", alpha)


def sd_upper_bound(sd: float, n: int, confidence: float = 0.8) -> float:
  """One-sided upper confidence limit of a normal SD estimated from n values:
  sd sqrt((n - 1) / chi2_{1 - confidence, n - 1}). Planning with it instead of a small
  pilot's sd keeps the planned power from resting on a lucky low estimate (Browne 1995)."""
  _check_level("confidence", confidence)
  if n < 2:
    raise ValueError(f"n={n}: an SD needs at least 2 values")
  return float(sd * math.sqrt((n - 1) / scipy_stats.chi2.ppf(1 - confidence, n - 1)))


def power_paired(n: int, sd_diff: float, delta: float, alpha: float = 0.05) -> float:
  """Power of the two-sided paired t-test at level alpha with n pairs to detect a true
  mean difference delta when the differences have SD sd_diff.

  power = P(T > t_c) + P(T < -t_c), T ~ noncentral t(n - 1, delta sqrt(n) / sd_diff),
  t_c = t_{1 - alpha / 2, n - 1} (the one-sample t-test's power, as G*Power computes it).
  """
  _check_design(sd_diff, alpha)
  if n < 2:
    raise ValueError(f"n={n} pairs: a paired t-test needs at least 2")
  df, nc = n - 1, abs(delta) * math.sqrt(n) / sd_diff
  t_c = scipy_stats.t.ppf(1 - alpha / 2, df)
  # The lower tail is below alpha / 2 for nc >= 0; scipy returns NaN for some far-tail
  # values (~1e-17) at large nc, which count as 0.
  lower = np.nan_to_num(scipy_stats.nct.cdf(-t_c, df, nc), nan=0.0)
  return float(scipy_stats.nct.sf(t_c, df, nc) + lower)


def required_n(sd_diff: float, delta: float, *, alpha: float = 0.05, power: float = 0.8,
               n_min: int = 2, n_max: int = 100_000) -> int:
  """The smallest n >= n_min of pairs whose paired t-test has `power` for `delta`."""
  _check_level("power", power)
  if delta == 0:
    raise ValueError("delta=0: no sample size detects a zero effect; give the minimum "
                     "effect of interest")
  n = max(2, n_min)
  while power_paired(n, sd_diff, delta, alpha) < power:
    n += 1
    if n > n_max:
      raise ValueError(f"more than n_max={n_max} pairs needed for delta={delta} at "
                       f"sd_diff={sd_diff}")
  return n


def mde_paired(n: int, sd_diff: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
  """The minimum detectable effect: the delta at which n pairs have `power`."""
  _check_level("power", power)
  _check_design(sd_diff, alpha)
  f = lambda delta: power_paired(n, sd_diff, delta, alpha) - power
  hi = sd_diff
  while f(hi) < 0:
    hi *= 2
  return float(optimize.brentq(f, 0.0, hi, xtol=1e-12 * sd_diff))


# ---------------------------------------------------------------- Markdown


def fmt(x: float | None, digits: int = 3) -> str:
  """A number for a table; '-' for None, NaN or inf."""
  return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def markdown_table(summaries: Mapping[str, Mapping[str, Any]], *, digits: int = 3) -> str:
  """One row per algorithm, one column per metric: mean [95% CI]; a metric's marks:
  * significantly different from EGPO, + from GRPO (paired t-test, Holm, see summarize)."""
  metrics = list(summaries)
  names = [r["name"] for r in summaries[metrics[0]]["rows"]]
  marks: dict[tuple[str, str], str] = {}
  for m, summ in summaries.items():
    for t in summ["tests"]:
      if t["significant"]:
        for who in (t["name"], t["reference"]):
          other = t["reference"] if who == t["name"] else t["name"]
          sym = {"egpo": "*", "grpo": "+"}.get(other, "")
          marks[(m, who)] = "".join(sorted(set(marks.get((m, who), "") + sym)))
  lines = ["| algorithm | " + " | ".join(metrics) + " |",
           "|---|" + "---|" * len(metrics)]
  for i, name in enumerate(names):
    cells = []
    for m in metrics:
      r = summaries[m]["rows"][i]
      cells.append(f"{fmt(r['mean'], digits)} [{fmt(r['low'], digits)}, "
                   f"{fmt(r['high'], digits)}]{marks.get((m, name), '')}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def tests_table(summaries: Mapping[str, Mapping[str, Any]], *, digits: int = 3) -> str:
  """Every paired test: metric, algorithm, reference, difference [95% CI], p, Holm p."""
  lines = ["| metric | algorithm | vs | diff [95% CI] | p | p (Holm) | significant |",
           "|---|---|---|---|---|---|---|"]
  for m, summ in summaries.items():
    for t in summ["tests"]:
      lines.append(
          f"| {m} | {t['name']} | {t['reference']} | {fmt(t['diff'], digits)} "
          f"[{fmt(t['diff_low'], digits)}, {fmt(t['diff_high'], digits)}] | "
          f"{fmt(t['p'], 4)} | {fmt(t['p_holm'], 4)} | "
          f"{'yes' if t['significant'] else 'no'} |")
  return "\n".join(lines)
