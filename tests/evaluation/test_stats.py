"""Statistics over seeds (`egpo_jax.evaluation.stats`) against hand computations, scipy
and published power tables."""

import itertools
import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from scipy import stats as scipy_stats

from egpo_jax.evaluation import stats


def test_mean_ci_by_hand():
  mean, low, high, n = stats.mean_ci([1.0, 2.0, 3.0])
  half = 4.302652729911275 * 1.0 / math.sqrt(3)   # t_{0.975, 2} * sd / sqrt(n)
  assert (mean, n) == (2.0, 3)
  np.testing.assert_allclose([low, high], [2.0 - half, 2.0 + half], rtol=1e-9)
  # NaNs (undefined metrics) are dropped; one value has no interval.
  mean, low, high, n = stats.mean_ci([np.nan, 5.0])
  assert mean == 5.0 and n == 1 and math.isnan(low) and math.isnan(high)
  with pytest.raises(ValueError, match="confidence"):
    stats.mean_ci([1.0, 2.0], confidence=1.5)


def test_paired_test_by_hand():
  # d = [1, 2, 2]: mean 5/3, sd 1/sqrt(3), t = 5; df = 2 has the closed-form CDF
  # 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2).
  out = stats.paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(out["diff"], 5 / 3)
  np.testing.assert_allclose(out["p"], 1 - 5 / math.sqrt(27), rtol=1e-9)
  assert out["n"] == 3 and out["diff_low"] < 5 / 3 < out["diff_high"]
  assert math.isnan(stats.paired_test([1., 2.], [0., 1.])["p"])   # constant d: no test
  assert math.isnan(stats.paired_test([1., 2.], [1., 2.])["p"])
  assert math.isnan(stats.paired_test([1., np.nan], [0., 0.])["p"])
  with pytest.raises(ValueError, match="one value per seed"):
    stats.paired_test([1., 2.], [1.])


def test_holm_by_hand():
  # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(., 2 * 0.03), max(., 1 * 0.04)
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  np.testing.assert_allclose(stats.holm([0.2, np.nan, 0.3]), [0.4, np.nan, 0.4])


@hypothesis.given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_properties(p):
  adj = stats.holm(p)
  p = np.asarray(p)
  assert np.all(adj >= p - 1e-15) and np.all(adj <= 1.0)
  order = np.argsort(p, kind="stable")
  assert np.all(np.diff(adj[order]) >= 0)   # monotone in the raw p-values
  assert adj.min() == pytest.approx(min(1.0, len(p) * p.min()))


def test_summarize_and_tables():
  names = ["grpo", "egpo", "c1"]
  rng = np.random.default_rng(0)
  base = rng.normal(size=5)
  values = np.stack([base, base + 1.0 + 0.01 * rng.normal(size=5),
                     base + 0.5 * rng.normal(size=5)])
  out = stats.summarize(values, names)
  assert [r["name"] for r in out["rows"]] == names
  np.testing.assert_allclose(out["rows"][1]["mean"], values[1].mean())
  pairs = {(t["name"], t["reference"]) for t in out["tests"]}
  assert pairs == {("grpo", "egpo"), ("c1", "egpo"), ("c1", "grpo")}   # each pair once
  sig = {(t["name"], t["reference"]): t["significant"] for t in out["tests"]}
  assert sig == {("grpo", "egpo"): True, ("c1", "egpo"): True, ("c1", "grpo"): False}
  for t in out["tests"]:
    assert t["p_holm"] >= t["p"]
  table = stats.markdown_table({"accuracy": out})
  assert table.splitlines()[0] == "| algorithm | accuracy |"
  grpo_row, egpo_row, c1_row = table.splitlines()[2:]
  assert grpo_row.endswith("]* |") and egpo_row.endswith("]+ |") and c1_row.endswith("]* |")
  assert "| accuracy | c1 | grpo |" in stats.tests_table({"accuracy": out})
  with pytest.raises(ValueError, match="names"):
    stats.summarize(values, names[:2])


def test_paired_test_reports_sd_and_sign_flip():
  out = stats.paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(out["sd"], np.std([1, 2, 2], ddof=1))
  # d = [1, 2, 2]: of the 8 sign patterns only all-plus and all-minus reach |mean| 5/3.
  assert out["p_sign_flip"] == pytest.approx(2 / 8)


def _sign_flip_by_enumeration(d):
  d = np.asarray(d, np.float64)
  means = [abs(np.mean(np.array(s) * d)) for s in itertools.product((1, -1), repeat=d.size)]
  return np.mean(np.array(means) >= abs(d.mean()) - 1e-12)


@pytest.mark.parametrize("d", [[0.3, -0.1, 0.2, 0.5, 0.05], [1.0, 1.0, 1.0, 1.0],
                               [0.02, -0.03, 0.01, 0.04, 0.0, -0.01, 0.03, 0.02]])
def test_sign_flip_is_exact_for_small_n(d):
  assert stats.sign_flip_test(d) == pytest.approx(_sign_flip_by_enumeration(d))


def test_sign_flip_undefined_cases_and_large_n_is_deterministic():
  assert math.isnan(stats.sign_flip_test([0.0, 0.0, 0.0]))
  assert math.isnan(stats.sign_flip_test([1.0]))
  d = np.random.default_rng(1).normal(0.5, 1.0, size=24)     # 2^24 > EXACT_SIGN_FLIPS
  p = stats.sign_flip_test(d)
  assert p == stats.sign_flip_test(d)
  # A 0.5-sd effect at n = 24: the t-test and the permutation test agree roughly.
  assert abs(p - scipy_stats.ttest_1samp(d, 0.0).pvalue) < 0.02


def test_mean_ci_curve_clips_fractions():
  values = np.array([[0.0, 0.5, 1.0], [0.02, 0.6, 1.0], [0.0, 0.4, 0.95]])
  mean, low, high = stats.mean_ci_curve(values, bounds=(0.0, 1.0))
  np.testing.assert_allclose(mean, values.mean(0))
  raw = [stats.mean_ci(values[:, t]) for t in range(3)]
  assert raw[0][1] < 0 and raw[2][2] > 1                 # the t-band leaves [0, 1] ...
  assert low[0] == 0.0 and high[2] == 1.0                # ... the clipped one does not
  np.testing.assert_allclose([low[1], high[1]], raw[1][1:3])
  unclipped = stats.mean_ci_curve(values)
  assert unclipped[1][0] < 0
  assert stats.mean_ci(values[:, 0], bounds=(0.0, 1.0))[1] == 0.0


# G*Power 3.1, "t tests - Means: difference from constant (one sample case)", two-tailed,
# alpha 0.05: effect size d -> total sample size and actual power for power >= 0.80.
@pytest.mark.parametrize("d, n, power", [(0.5, 34, 0.8077775), (1.0, 10, 0.8030969),
                                         (0.8, 15, 0.8213105)])
def test_power_matches_gpower(d, n, power):
  assert stats.required_n(1.0, d) == n
  assert stats.power_paired(n, 1.0, d) == pytest.approx(power, abs=1e-6)
  assert stats.power_paired(n - 1, 1.0, d) < 0.8
  # Scale-free: only delta / sd matters.
  assert stats.power_paired(n, 0.04, 0.04 * d) == pytest.approx(
      stats.power_paired(n, 1.0, d), rel=1e-9)


def test_power_against_simulation():
  """The noncentral t power equals the rejection rate of scipy's paired t-test."""
  rng = np.random.default_rng(0)
  n, sd, delta = 12, 0.03, 0.02
  d = rng.normal(delta, sd, size=(20000, n))
  rate = np.mean(scipy_stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
  assert stats.power_paired(n, sd, delta) == pytest.approx(rate, abs=0.012)


def test_mde_inverts_power_and_required_n_floor():
  mde = stats.mde_paired(16, 0.03, alpha=0.025)
  assert stats.power_paired(16, 0.03, mde, alpha=0.025) == pytest.approx(0.8, abs=1e-9)
  assert stats.required_n(0.001, 0.02, n_min=16) == 16
  assert stats.required_n(0.03, 0.02, alpha=0.025, n_min=16) > 16
  with pytest.raises(ValueError, match="sd_diff"):
    stats.power_paired(10, 0.0, 0.02)
  with pytest.raises(ValueError, match="delta=0"):
    stats.required_n(0.03, 0.0)
  with pytest.raises(ValueError, match="alpha"):
    stats.power_paired(10, 0.03, 0.02, alpha=1.0)
  with pytest.raises(ValueError, match="n=1"):
    stats.power_paired(1, 0.03, 0.02)


def test_sd_upper_bound_by_hand():
  # n = 4: chi2_{0.2, 3} = 1.0052 (tables), so the 80% upper limit is sd * sqrt(3 / 1.0052).
  assert stats.sd_upper_bound(0.01, 4) == pytest.approx(0.01 * math.sqrt(3 / 1.005174), rel=1e-5)
  assert stats.sd_upper_bound(0.01, 4, 0.5) < stats.sd_upper_bound(0.01, 4)
  assert stats.sd_upper_bound(0.01, 1000) == pytest.approx(0.01, rel=0.05)
  with pytest.raises(ValueError, match="n=1"):
    stats.sd_upper_bound(0.01, 1)


def test_bootstrap_ci_hand_case_and_invariants():
  # Two seeds [0, 1]: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so
  # the 95% percentile interval is [0, 1]; the estimate is the data's mean.
  est, low, high, n = stats.bootstrap_mean_ci([0.0, 1.0], n_resamples=4000)
  assert (est, low, high, n) == (0.5, 0.0, 1.0, 2)
  # A constant sample has a degenerate interval; one value has none; NaNs are dropped.
  assert stats.bootstrap_mean_ci([0.7, 0.7, np.nan, 0.7])[:3] == pytest.approx((0.7,) * 3)
  assert math.isnan(stats.bootstrap_mean_ci([0.3])[1])
  # Paired: b = a - c gives exactly c whatever is resampled; unpaired noise would not.
  a = np.random.default_rng(0).uniform(size=12)
  assert stats.bootstrap_paired_ci(a, a - 0.02)[:3] == pytest.approx((0.02, 0.02, 0.02))
  # Deterministic given the seed; close to the t-interval for a roughly normal sample.
  x = np.random.default_rng(1).normal(0.5, 0.1, size=40)
  assert stats.bootstrap_mean_ci(x) == stats.bootstrap_mean_ci(x)
  _, t_low, t_high, _ = stats.mean_ci(x)
  _, b_low, b_high, _ = stats.bootstrap_mean_ci(x)
  np.testing.assert_allclose([b_low, b_high], [t_low, t_high], atol=0.01)
  with pytest.raises(ValueError, match="one length"):
    stats.bootstrap_ci(lambda x, y: x.mean(-1), np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="one value per seed"):
    stats.bootstrap_paired_ci([1.0, 2.0], [1.0])


@hypothesis.settings(deadline=None, max_examples=20)
@hypothesis.given(st.lists(st.floats(0, 1), min_size=2, max_size=12))
def test_bootstrap_interval_of_a_fraction_stays_within_the_data_and_0_1(xs):
  est, low, high, _ = stats.bootstrap_mean_ci(xs, bounds=(0.0, 1.0), n_resamples=500)
  assert 0.0 <= low <= high <= 1.0
  assert min(xs) - 1e-12 <= low and high <= max(xs) + 1e-12


def test_bootstrap_calibration_hand_cases():
  # Confidence separates right from wrong perfectly within every prompt: AUROC is 1 on
  # every resample (with both classes), so the interval is [1, 1].
  conf = np.array([[0.9, 0.2], [0.8, 0.1], [0.95, 0.3], [0.7, 0.05]])
  corr = np.array([[True, False]] * 4)
  out = stats.bootstrap_calibration(conf, corr, n_resamples=200)
  assert out["auroc"] == (1.0, 1.0, 1.0, 4)
  # ECE by hand with one bin: |mean confidence - accuracy| = |0.5 - 0.5| = 0.
  out = stats.bootstrap_calibration(conf, corr, num_bins=1, n_resamples=200)
  np.testing.assert_allclose(out["ece"][0], abs(conf.mean() - 0.5), atol=1e-6)
  assert 0.0 <= out["ece"][1] <= out["ece"][0] <= out["ece"][2] <= 1.0
  # Paired with itself every resample's difference is 0; against a model whose
  # confidence is uninformative (constant: AUROC 1/2 by ties) the AUROC gain is 1/2.
  same = stats.bootstrap_calibration(conf, corr, (conf, corr), n_resamples=200)
  assert same["auroc"][:3] == (0.0, 0.0, 0.0) and same["ece"][:3] == (0.0, 0.0, 0.0)
  gain = stats.bootstrap_calibration(conf, corr, (np.full_like(conf, 0.5), corr),
                                     n_resamples=200)
  assert gain["auroc"][:3] == pytest.approx((0.5, 0.5, 0.5))
  # A resample whose prompts hold no wrong answer has no AUROC and is dropped; all-correct
  # data leaves no interval at all.
  none = stats.bootstrap_calibration(conf, np.ones_like(corr), n_resamples=50)
  assert all(math.isnan(v) for v in none["auroc"][:3])
  with pytest.raises(ValueError, match="calibration metrics"):
    stats.bootstrap_calibration(conf, corr, metrics=("auc",))
