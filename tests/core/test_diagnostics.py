"""Tests of egpo_jax.core.diagnostics: hand-computed values and NaN-free empty classes."""

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core import diagnostics as diag

# Rows: all-correct, all-wrong, mixed, mixed with one padded member, one valid response
# (takes no part), fully padded.
CORRECT = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0]],
                   bool)
VALID = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)


def _assert_scalars_finite(metrics):
  for k, v in metrics.items():
    assert jnp.ndim(v) == 0, k
    assert np.isfinite(np.asarray(v)), k


def test_group_outcome_fractions_hand_computed():
  m = diag.group_outcome_fractions(CORRECT, VALID)
  assert int(m["num_groups"]) == 4
  np.testing.assert_allclose([m["frac_all_correct"], m["frac_all_wrong"], m["frac_mixed"]],
                             [0.25, 0.25, 0.5])


def test_advantage_signal_counts_nsr_only_responses():
  # EGPO-like advantages for the rows above; the padded entries hold junk that must not
  # count, and the single-response group has a non-zero value that must (it is valid).
  egpo_adv = np.array([[0, 0, 0], [-1, -0.8, -1], [1.2, -0.6, -0.6], [0.7, -0.7, 5],
                       [0.3, 9, 9], [9, 9, 9]], np.float32)
  m = diag.advantage_signal(egpo_adv, CORRECT, VALID)
  # 12 valid responses; non-zero: all-wrong 3 (NSR) + mixed 3 + mixed 2 + single 1 = 9.
  assert int(m["num_responses"]) == 12
  np.testing.assert_allclose(m["frac_nonzero_adv"], 9 / 12, rtol=1e-6)
  np.testing.assert_allclose(m["frac_nsr_only_adv"], 3 / 12, rtol=1e-6)
  grpo_adv = np.where(np.arange(6)[:, None] == 1, 0.0, egpo_adv)
  m = diag.advantage_signal(grpo_adv, CORRECT, VALID)
  np.testing.assert_allclose(m["frac_nonzero_adv"], 6 / 12, rtol=1e-6)
  assert float(m["frac_nsr_only_adv"]) == 0.0


def test_weights_and_entropy_by_sign_hand_computed():
  weights = np.array([[2.0, 1.0, 1.5, 0.8]], np.float32)
  entropy = np.array([[0.1, 0.3, 0.2, 0.6]], np.float32)
  correct = np.array([[True, True, False, False]])
  valid = np.array([[True, True, True, False]])
  w = diag.weights_by_sign(weights, correct, valid)
  np.testing.assert_allclose([w["mean_weight_correct"], w["mean_weight_wrong"]], [1.5, 1.5])
  assert (int(w["num_correct"]), int(w["num_wrong"])) == (2, 1)
  h = diag.entropy_by_correctness(entropy, correct, valid)
  np.testing.assert_allclose(
      [h["mean_entropy_correct"], h["mean_entropy_wrong"], h["entropy_gap"]],
      [0.2, 0.2, 0.0], atol=1e-7)
  h = diag.entropy_by_correctness(entropy, correct)
  np.testing.assert_allclose(h["entropy_gap"], 0.4 - 0.2, rtol=1e-6)


def test_empty_classes_give_zero_and_counts_not_nan():
  correct = np.ones((2, 3), bool)
  none_valid = np.zeros((2, 3), bool)
  zeros = np.zeros((2, 3), np.float32)
  for valid in (None, none_valid):
    m = diag.group_diagnostics(zeros, zeros + 1, zeros, correct, valid)
    _assert_scalars_finite(m)
    assert float(m["entropy_gap"]) == 0.0 and float(m["mean_weight_wrong"]) == 0.0
    assert int(m["num_wrong"]) == 0
  m = diag.group_diagnostics(zeros, zeros + 1, zeros, correct, none_valid)
  assert int(m["num_groups"]) == 0 and float(m["frac_mixed"]) == 0.0


_diag_jit = jax.jit(diag.group_diagnostics)


@given(hnp.arrays(np.bool_, (3, 4)), hnp.arrays(np.bool_, (3, 4)),
       hnp.arrays(np.float32, (3, 4), elements=st.floats(-3, 3, width=32)))
def test_property_group_diagnostics_finite_and_consistent(correct, valid, adv):
  m = _diag_jit(adv, np.abs(adv) + 0.5, np.abs(adv), correct, valid)
  _assert_scalars_finite(m)
  if int(m["num_groups"]) > 0:
    total = float(m["frac_all_correct"] + m["frac_all_wrong"] + m["frac_mixed"])
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
  assert int(m["num_correct"]) + int(m["num_wrong"]) == int(valid.sum())
  assert 0.0 <= float(m["frac_nsr_only_adv"]) <= float(m["frac_nonzero_adv"]) <= 1.0


def test_bad_input_raises():
  with pytest.raises(ValueError, match="correct_BxG must be bool"):
    diag.group_outcome_fractions(np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match="valid_BxG must have the shape"):
    diag.weights_by_sign(np.ones((2, 3)), np.ones((2, 3), bool), np.ones((2, 4), bool))
