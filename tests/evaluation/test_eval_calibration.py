"""Calibration metrics: scikit-learn (Brier, AUROC), a NumPy loop (ECE), hand cases,
degenerate inputs, and `evaluate_generation` on a hand-built Generation."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from egpo_jax.evaluation import calibration
from egpo_jax.sampling.engine import Generation


def ece_loop(conf, correct, num_bins):
  """Equal-mass ECE, written independently: a response's bin is floor(r * K / N), where r
  counts the responses with strictly lower confidence (so ties share a bin)."""
  n = len(conf)
  sums = [[0, 0.0, 0.0] for _ in range(num_bins)]
  for i in range(n):
    r = sum(1 for j in range(n) if conf[j] < conf[i])
    b = r * num_bins // n
    sums[b][0] += 1
    sums[b][1] += conf[i]
    sums[b][2] += float(correct[i])
  return sum(c / n * abs(s_conf / c - s_acc / c) for c, s_conf, s_acc in sums if c)


HAND_CONF = np.array([0.9, 0.8, 0.6, 0.3])
HAND_CORRECT = np.array([True, False, True, False])


def test_hand_computed_case():
  m = calibration.calibration_metrics(HAND_CONF, HAND_CORRECT, -np.log(HAND_CONF), num_bins=2)
  # Bins by rank: {0.3 wrong, 0.6 right} and {0.8 wrong, 0.9 right}.
  assert m["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.35)
  assert m["brier"] == pytest.approx((0.01 + 0.64 + 0.16 + 0.09) / 4)
  assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (right, wrong) pairs ordered
  assert m["mean_entropy_correct"] == pytest.approx(-(np.log(0.9) + np.log(0.6)) / 2, rel=1e-6)
  assert m["mean_entropy_wrong"] == pytest.approx(-(np.log(0.8) + np.log(0.3)) / 2, rel=1e-6)
  assert m["entropy_gap"] == pytest.approx(m["mean_entropy_wrong"] - m["mean_entropy_correct"])
  assert m["median_confidence_correct"] == pytest.approx(0.75)
  assert m["overconfident_failure_frac"] == pytest.approx(0.5)  # 0.8 > 0.75, 0.3 is not
  assert (m["num_responses"], m["num_correct"], m["num_wrong"]) == (4, 2, 2)
  assert not any(k.endswith("_undefined_reason") for k in m)


class CalibrationStatsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_core_on_the_hand_case_with_padding(self):
    conf = jnp.asarray([0.9, 0.8, 0.6, 0.3, jnp.nan, 7.0], jnp.float32)
    correct = jnp.asarray([True, False, True, False, True, False])
    valid = jnp.asarray([True] * 4 + [False] * 2)
    stats = self.variant(lambda c, y, h, v: calibration.calibration_stats(
        c, y, h, v, num_bins=2))(conf, correct, -jnp.log(conf), valid)
    np.testing.assert_allclose(stats["ece"], 0.2, atol=1e-6)
    np.testing.assert_allclose(stats["auroc"], 0.75, atol=1e-6)
    np.testing.assert_array_equal(stats["bin_count_K"], [2, 2])
    np.testing.assert_allclose(stats["bin_confidence_K"], [0.45, 0.85], atol=1e-6)
    np.testing.assert_allclose(stats["bin_accuracy_K"], [0.5, 0.5])
    assert int(stats["num_valid"]) == 4


@st.composite
def scored_responses(draw):
  n = draw(st.sampled_from([5, 37, 64]))  # padded to one bucket: one compilation
  levels = draw(st.sampled_from([3, 5, 50]))  # few levels: many ties
  conf = np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))) / levels
  correct = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
  num_bins = draw(st.sampled_from([1, 4, 10]))
  return conf, correct, num_bins


@given(scored_responses())
def test_against_sklearn_and_a_numpy_loop(case):
  conf, correct, num_bins = case
  entropy = np.linspace(0.0, 2.0, conf.size)
  m = calibration.calibration_metrics(conf, correct, entropy, num_bins=num_bins)
  assert m["ece"] == pytest.approx(ece_loop(conf, correct, num_bins), abs=1e-6)
  assert m["brier"] == pytest.approx(skm.brier_score_loss(correct, conf), abs=1e-6)
  assert m["accuracy"] == pytest.approx(correct.mean())
  if correct.all() or not correct.any():
    assert m["auroc"] is None and "needs correct and wrong" in m["auroc_undefined_reason"]
    assert m["entropy_gap"] is None and m["overconfident_failure_frac"] is None
    return
  assert m["auroc"] == pytest.approx(skm.roc_auc_score(correct, conf), abs=1e-6)
  assert m["mean_entropy_correct"] == pytest.approx(entropy[correct].mean(), abs=1e-6)
  assert m["mean_entropy_wrong"] == pytest.approx(entropy[~correct].mean(), abs=1e-6)
  median = np.median(conf[correct])
  assert m["median_confidence_correct"] == pytest.approx(median, abs=1e-6)
  assert m["overconfident_failure_frac"] == pytest.approx(
      np.mean(conf[~correct] > median), abs=1e-6)
  # Order-free: the same responses in another order give the same metrics.
  perm = np.random.default_rng(0).permutation(conf.size)
  m2 = calibration.calibration_metrics(conf[perm], correct[perm], entropy[perm],
                                       num_bins=num_bins)
  for key in calibration.METRICS:
    assert m2[key] == pytest.approx(m[key], abs=1e-6), key


def test_degenerate_inputs_are_undefined_with_a_reason():
  conf = np.array([0.9, 0.5, 0.7])
  right = calibration.calibration_metrics(conf, np.ones(3, bool), -np.log(conf))
  assert right["ece"] is not None and right["brier"] == pytest.approx(np.mean((conf - 1) ** 2))
  for key in ("auroc", "mean_entropy_wrong", "entropy_gap", "overconfident_failure_frac"):
    assert right[key] is None
    assert "no wrong response (all 3 are correct)" in right[f"{key}_undefined_reason"]
  assert right["mean_entropy_correct"] is not None

  wrong = calibration.calibration_metrics(conf, np.zeros(3, bool), -np.log(conf))
  for key in ("auroc", "mean_entropy_correct", "entropy_gap", "median_confidence_correct"):
    assert wrong[key] is None and "no correct response" in wrong[f"{key}_undefined_reason"]
  assert wrong["brier"] == pytest.approx(np.mean(conf ** 2))

  empty = calibration.calibration_metrics(conf, np.ones(3, bool), -np.log(conf),
                                          np.zeros(3, bool))
  assert empty["num_responses"] == 0
  assert all(empty[k] is None and empty[f"{k}_undefined_reason"] for k in calibration.METRICS)

  flat = calibration.calibration_metrics(np.full(4, 0.5), HAND_CORRECT, np.zeros(4))
  assert flat["auroc"] == 0.5 and flat["overconfident_failure_frac"] == 0.0
  assert calibration.numeric(wrong).keys() == {k for k in wrong if "reason" not in k}


def test_invalid_rows_do_not_count():
  conf = np.array([0.9, 0.8, 0.6, 0.3, np.nan, 2.0])
  correct = np.array([True, False, True, False, True, True])
  valid = np.array([True, True, True, True, False, False])
  padded = calibration.calibration_metrics(conf, correct, np.r_[np.ones(4), np.nan, 1.0], valid)
  plain = calibration.calibration_metrics(conf[:4], correct[:4], np.ones(4))
  assert padded == plain
  bins = calibration.reliability_bins(conf, correct, valid, num_bins=3)
  assert sum(bins["count"]) == 4


def test_bad_inputs_name_the_field():
  with pytest.raises(ValueError, match="confidence_N must be finite and in"):
    calibration.calibration_metrics(np.array([1.5]), np.array([True]), np.zeros(1))
  with pytest.raises(ValueError, match="correct_N must be bool"):
    calibration.calibration_metrics(np.array([0.5]), np.array([1]), np.zeros(1))
  with pytest.raises(ValueError, match="entropy_N must be finite"):
    calibration.calibration_metrics(np.array([0.5]), np.array([True]), np.array([np.inf]))
  with pytest.raises(ValueError, match="1-D arrays of one length"):
    calibration.calibration_metrics(np.zeros(2), np.ones(3, bool), np.zeros(2))


DELIM = (7, 8)


def _generation(ids, logps):
  ids = np.asarray(ids, np.int32)
  mask = ids != 0
  lengths = mask.sum(1).astype(np.int32)
  return Generation(completion_ids_NxT=jnp.asarray(ids), completion_mask_NxT=jnp.asarray(mask),
                    logps_NxT=jnp.asarray(np.where(mask, logps, 0.0), jnp.float32),
                    entropy_NxT=None, lengths_N=jnp.asarray(lengths),
                    truncated_N=jnp.asarray(lengths == ids.shape[1]),
                    num_steps=jnp.asarray(ids.shape[1]))


def test_evaluate_generation_whole_response_and_answer_segment():
  # Rows b*G+g with G = 2. Rows 0 and 2 close their reasoning with the delimiter 7 8.
  ids = [[5, 7, 8, 9, 2], [5, 5, 5, 0, 0], [5, 5, 7, 8, 9], [9, 2, 0, 0, 0]]
  logps = -np.array([[0.1, 0.0, 0.0, 0.5, 0.3], [0.2, 0.4, 0.6, 9, 9],
                     [0.9, 0.9, 0.0, 0.0, 0.2], [1.0, 2.0, 9, 9, 9]])
  correct = np.array([True, False, True, False])
  out = calibration.evaluate_generation(_generation(ids, logps), correct, group_size=2,
                                        delimiter_ids=DELIM, num_bins=2)
  h = np.array([0.9 / 5, 1.2 / 3, 2.0 / 5, 3.0 / 2])
  assert out["accuracy"] == 0.5 and out["pass@1"] == 0.5 and out["pass@2"] == 1.0
  assert out["response_length"] == pytest.approx((5 + 3 + 5 + 2) / 4)
  assert out["truncation_rate"] == 0.5
  assert out["mean_entropy_correct"] == pytest.approx((h[0] + h[2]) / 2, rel=1e-5)
  assert out["entropy_gap"] == pytest.approx((h[1] + h[3] - h[0] - h[2]) / 2, rel=1e-5)
  # The answer segment: tokens after "7 8"; rows 1 and 3 fall back to the whole response.
  h_ans = np.array([0.8 / 2, h[1], 0.2, h[3]])
  assert out["answer_segment_fallbacks"] == 2
  assert out["answer_mean_entropy_correct"] == pytest.approx((h_ans[0] + h_ans[2]) / 2,
                                                             rel=1e-5)
  # Pairs (right, wrong): 0.2 beats 0.4 and 1.5; 0.4 beats 1.5 and ties 0.4 (counts 1/2).
  assert out["answer_auroc"] == pytest.approx(3.5 / 4)

  none = calibration.evaluate_generation(_generation(ids, logps), correct, delimiter_ids=(42,))
  assert none["answer_segment_fallbacks"] == 4
  assert none["answer_auroc"] is None and "no response has an answer segment" in (
      none["answer_auroc_undefined_reason"])
  with pytest.raises(ValueError, match="correct_N must be bool of shape"):
    calibration.evaluate_generation(_generation(ids, logps), correct[:3])
