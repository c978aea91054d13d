"""The answer checkers in this process: extraction, adversarial and equivalent answers."""

import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from egpo_jax.core import registry
from egpo_jax import rewards
from egpo_jax.rewards import verifiers


@pytest.mark.parametrize("text, expected", [
    ("no box here", None),
    ("\\boxed{3}", "3"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a\\}b}", "a\\}b"),                       # escaped brace does not close
    ("\\boxed{\\boxed{7}}", "\\boxed{7}"),              # nested: the outer box
    ("\\boxed{1} and \\boxed{2", None),                 # unclosed last box: malformed
    ("\\boxed{}", ""),
    ("\\boxed {4}", "4"),
    ("\\fbox{5}", "5"),
    ("\\boxed 5", None),
])
def test_last_boxed(text, expected):
  assert verifiers.last_boxed(text) == expected


@given(st.lists(st.text(alphabet="0123456789abx+-", min_size=1, max_size=6), min_size=1,
                max_size=4), st.text(alphabet=" .,:;xyz", max_size=8))
def test_last_boxed_is_the_last_of_many(contents, filler):
  text = filler.join(f"\\boxed{{{c}}}" for c in contents) + filler
  assert verifiers.last_boxed(text) == contents[-1]


REF_RESPONSE_OK = [
    ("0.5", "so the answer is \\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("\\frac12", "\\boxed{\\dfrac{1}{2}}"),
    ("\\{1,2,3\\}", "\\boxed{\\{3,1,2\\}}"),
    ("1,2", "\\boxed{2, 1}"),
    ("3", "\\boxed{x=3}"),
    ("5", "\\boxed{4} is wrong, so \\boxed{5}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3,\\pi/2)}"),
    ("5\\text{ m}", "\\boxed{5\\text{ meters}}"),
    ("27.0", "\\boxed{27}"),
]


@pytest.mark.parametrize("reference, response", REF_RESPONSE_OK)
def test_equivalent_forms_are_accepted(reference, response):
  ok, reason = verifiers.check("math", response, reference, timeout=10)
  assert ok, reason


REF_RESPONSE_WRONG = [
    ("0.52", "\\boxed{1/2}", "mismatch"),
    ("1/2", "\\boxed{0.52}", "mismatch"),
    ("5\\text{ m}", "\\boxed{5\\text{ cm}}", "units differ"),
    ("\\frac{\\pi}{2}", "\\boxed{90^\\circ}", "mismatch"),
    ("5", "\\boxed{5} but finally \\boxed{6}", "mismatch"),
    ("5", "\\boxed{5} and \\boxed{5", "no boxed answer"),
    ("5", "\\boxed{}", "empty box"),
    ("5", "the answer is 5", "no boxed answer"),
    ("1/3", "\\boxed{0.33}", "mismatch"),
]


@pytest.mark.parametrize("reference, response, reason", REF_RESPONSE_WRONG)
def test_wrong_answers_that_look_right_are_rejected(reference, response, reason):
  assert verifiers.check("math", response, reference, timeout=10) == (False, reason)


@pytest.mark.parametrize("reference, response, ok", [
    ("18", "\\boxed{18}", True),
    ("18", "\\boxed{\\$18}", True),
    ("1200", "\\boxed{1,200}", True),
    ("1200", "\\boxed{1{,}200 \\text{ dollars}}", True),
    ("5", "\\boxed{5.0}", True),
    ("20", "\\boxed{20\\%}", True),
    ("-3", "\\boxed{-3}", True),
    ("18", "\\boxed{17}", False),
    ("18", "\\boxed{18.5}", False),
    ("1200", "\\boxed{1,20}", False),
    ("18", "18", False),
    ("7", "\\boxed{\\frac{14}{2}}", True),
])
def test_gsm8k(reference, response, ok):
  assert verifiers.check("gsm8k", response, reference)[0] == ok


def test_plain_number():
  assert verifiers.plain_number("1,234.5") == verifiers.fractions.Fraction("1234.5")
  assert verifiers.plain_number("\\frac{3}{4}") == verifiers.fractions.Fraction(3, 4)
  assert verifiers.plain_number("x+1") is None
  assert verifiers.plain_number("1/0") is None


@pytest.mark.parametrize("reference, response, ok", [
    ("B", "\\boxed{B}", True),
    ("B", "\\boxed{(B)}", True),
    ("B", "\\boxed{\\text{(B)}}", True),
    ("B", "\\boxed{b}", True),
    ("B", "\\boxed{B. 42}", True),
    ("B", "\\boxed{B} no wait \\boxed{C}", False),
    ("B", "\\boxed{BC}", False),
    ("B", "The answer is B", False),
])
def test_multiple_choice(reference, response, ok):
  assert verifiers.check("multiple_choice", response, reference)[0] == ok


@pytest.mark.parametrize("text, value", [
    ("1+2=\\boxed{3}", 3), ("\\boxed{-12}", -12), ("\\boxed{007}", 7),
    ("\\boxed{1}\\boxed{2}", 2), ("\\boxed{3}\\boxed{x}", None), ("\\boxed{1234567890}", None),
    ("\\boxed{12", None), ("\\boxed{}", None), ("\\boxed{--1}", None), ("\\boxed{ 1}", None),
    ("\\boxed{\\boxed{5}}", 5), ("\\boxed{١}", None),
])
def test_synthetic_answer_grammar(text, value):
  assert verifiers.synthetic_answer(text) == value


def test_check_rejects_bad_arguments_clearly():
  with pytest.raises(ValueError, match="kind='algebra'"):
    verifiers.check("algebra", "\\boxed{1}", "1")
  with pytest.raises(TypeError, match="strings"):
    verifiers.check("math", None, "1")


def test_in_process_timeout_returns_wrong_in_time():
  start = time.monotonic()
  ok, reason = verifiers.check("math", "\\boxed{9^{9^{9^{9}}}}", "2", timeout=0.5)
  assert (ok, reason) == (False, "timeout")
  assert time.monotonic() - start < 3.0


def test_rewards_from_correct_values():
  c = np.array([True, False])
  np.testing.assert_array_equal(rewards.rewards_from_correct(c), [1.0, -1.0])
  np.testing.assert_array_equal(rewards.rewards_from_correct(c, 1.0, 0.0), [1.0, 0.0])
  assert rewards.rewards_from_correct(c).dtype == np.float32
  with pytest.raises(TypeError, match="bool"):
    rewards.rewards_from_correct(np.array([1, 0]))


def test_registry_names_and_synthetic_reward_in_process():
  for name in ("math", "gsm8k", "multiple_choice", "synthetic"):
    assert name in registry.reward_functions
  fn = registry.reward_functions.get("synthetic")
  out = fn(["9+9=\\boxed{18}", "\\boxed{17}", "\\boxed{18"], ["18", "18", "18"],
           wrong_reward=0.0)
  np.testing.assert_array_equal(out.correct, [True, False, False])
  np.testing.assert_array_equal(out.rewards, [1.0, 0.0, 0.0])


def test_verify_batch_validates_inputs():
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    rewards.verify_batch(["a", "b"], ["1"], in_process=True)
  with pytest.raises(TypeError, match="not one string"):
    rewards.verify_batch("\\boxed{1}", "1", in_process=True)
  with pytest.raises(ValueError, match="unknown verifier"):
    rewards.verify_batch(["a"], ["1"], kind="nope", in_process=True)
  with pytest.raises(TypeError, match=r"references\[0\] is int"):
    rewards.verify_batch(["a"], [1], in_process=True)
