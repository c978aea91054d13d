"""pass@k against brute-force enumeration of k-subsets; maj@k and answer keys by hand."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpo_jax.evaluation import passk


def brute_force_pass_at_k(correct, k):
  """The fraction of k-subsets of the samples that hold at least one correct sample."""
  subsets = list(itertools.combinations(range(len(correct)), k))
  return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@st.composite
def samples_and_k(draw):
  n = draw(st.sampled_from([1, 2, 3, 5, 8, 10]))
  correct = draw(st.lists(st.booleans(), min_size=n, max_size=n))
  k = draw(st.integers(1, n))
  return correct, k


@given(samples_and_k())
def test_pass_at_k_equals_enumeration_over_k_subsets(case):
  correct, k = case
  got = passk.pass_at_k(len(correct), sum(correct), k)
  assert got == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)


def test_mean_pass_at_k_over_problems_matches_enumeration():
  rng = np.random.default_rng(0)
  correct_BxG = rng.random((6, 8)) < rng.random((6, 1))
  for k in (1, 2, 4, 8):
    want = np.mean([brute_force_pass_at_k(list(row), k) for row in correct_BxG])
    assert passk.mean_pass_at_k(correct_BxG, k) == pytest.approx(want, abs=1e-12)
  # pass@1 is the mean accuracy of all samples.
  assert passk.mean_pass_at_k(correct_BxG, 1) == pytest.approx(correct_BxG.mean())


def test_pass_at_ks_is_monotone_and_leaves_out_budgets_over_the_samples():
  correct_BxG = np.array([[True, False, False, False], [False, False, False, False]])
  got = passk.pass_at_ks(correct_BxG, (1, 2, 4, 8))
  assert list(got) == ["1", "2", "4"]  # pass@8 cannot be estimated from 4 samples
  assert got["1"] == pytest.approx(0.125)
  assert got["2"] == pytest.approx(0.25)
  assert got["4"] == pytest.approx(0.5)


def test_pass_at_k_rejects_impossible_arguments_naming_them():
  with pytest.raises(ValueError, match="num_samples=2"):
    passk.pass_at_k(2, 1, 4)
  with pytest.raises(ValueError, match="num_correct"):
    passk.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError, match="correct_BxG must be bool"):
    passk.mean_pass_at_k(np.ones((2, 2), np.int32), 1)


def test_majority_vote_by_hand():
  answers = ["5", "3", "5", None]
  correct = [True, False, True, False]
  assert passk.majority_correct(answers, correct, 4)
  assert passk.majority_correct(answers, correct, 1)
  # A tie goes to the answer seen first among the k samples.
  assert not passk.majority_correct(["3", "5"], [False, True], 2)
  assert passk.majority_correct(["5", "3"], [True, False], 2)
  # Samples without an answer do not vote; no answer at all is wrong.
  assert passk.majority_correct([None, None, "7"], [False, False, True], 3)
  assert not passk.majority_correct([None, None], [False, False], 2)
  # Only the first k samples vote.
  assert not passk.majority_correct(["1", "2", "2"], [False, True, True], 1)
  got = passk.maj_at_ks([answers, ["1", "1", "2", "2"]],
                        np.array([correct, [False, False, True, True]]), (1, 4))
  assert got == {"1": 0.5, "4": 0.5}


def test_answer_keys_normalise_equivalent_spellings():
  key = passk.answer_key
  assert key(r"so \boxed{\dfrac{1}{2}}", "math") == key(r"\boxed{0.5}", "math") == "1/2"
  assert key(r"\boxed{ 1,000 }", "gsm8k") == "1000"
  assert key(r"\boxed{x^2 + 1}", "math") == key(r"\boxed{x^2+1.}", "math") == "x^2+1"
  assert key(r"\boxed{\left( 1, 2 \right)}", "math") == "(1,2)"
  assert key(r"\boxed{(B)}", "multiple_choice") == "B"
  assert key(r"\boxed{12}\boxed{-12}", "synthetic") == "-12"
  assert key("no box here", "math") is None
  assert key(r"\boxed{}", "math") is None
  with pytest.raises(ValueError, match="verifier"):
    key(r"\boxed{1}", "nope")
