"""pass@k (the unbiased estimator of Chen et al. 2021) and maj@k (majority voting).

With n samples of a problem of which c are correct, the probability that at least one of
k samples drawn without replacement from the n is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

(Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1), averaged
over problems. pass@1 is the mean accuracy of all samples (the paper's "mean pass@1").
It is computed with Python integers (`math.comb`), so it is exact up to the final float
division, for any n.

maj@k takes the FIRST k samples of a problem, votes over their extracted answers (a
sample without an answer does not vote), and is 1 if the winning answer is correct.
Ties go to the answer that appeared first among the k samples (what
`collections.Counter.most_common` does), and a problem where no sample has an answer
scores 0. Answers vote by a normalised string (`answer_key`), so two spellings of one
value that the normalisation does not merge (`1/2` vs `0.5`) split their votes.
"""

from __future__ import annotations

import collections
import fractions
import math
import re
from collections.abc import Sequence

import numpy as np

from egpo_jax.rewards import verifiers

DEFAULT_KS = (1, 2, 4, 8)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """The unbiased pass@k estimate of one problem: 1 - C(n - c, k) / C(n, k).

  Args:
    num_samples: n >= k, the samples drawn for the problem.
    num_correct: c in [0, n], how many of them are correct.
    k: the budget, 1 <= k <= n.

  Raises:
    ValueError: naming the argument, if k > n or a count is out of range.
  """
  n, c, k = int(num_samples), int(num_correct), int(k)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if n < k:
    raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got "
                     f"num_samples={n}; sample more or lower k")
  if not 0 <= c <= n:
    raise ValueError(f"num_correct must be in [0, num_samples={n}], got {c}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_BxG: np.ndarray, k: int) -> float:
  """Mean over the B problems of pass@k, from a [B, G] bool array of verdicts."""
  correct_BxG = _check_correct(correct_BxG)
  g = correct_BxG.shape[1]
  counts = correct_BxG.sum(axis=1)
  return float(np.mean([pass_at_k(g, c, k) for c in counts]))


def pass_at_ks(correct_BxG: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """{"1": pass@1, "2": ...} for the ks <= G (the others cannot be estimated)."""
  correct_BxG = _check_correct(correct_BxG)
  return {str(k): mean_pass_at_k(correct_BxG, k) for k in ks if k <= correct_BxG.shape[1]}


def _check_correct(correct_BxG) -> np.ndarray:
  correct_BxG = np.asarray(correct_BxG)
  if correct_BxG.ndim != 2 or correct_BxG.shape[0] == 0 or correct_BxG.shape[1] == 0:
    raise ValueError(f"correct_BxG must be a non-empty [B problems, G samples] array, got "
                     f"shape {correct_BxG.shape}")
  if correct_BxG.dtype != np.bool_:
    raise ValueError(f"correct_BxG must be bool, got {correct_BxG.dtype}; pass "
                     "correct.astype(bool)")
  return correct_BxG


# --- majority voting -------------------------------------------------------------------
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$")


def answer_key(response: str, verifier: str) -> str | None:
  """The normalised final answer of a response, for voting; None if it has none.

  verifier: the record's checker kind (`rewards.KINDS`). synthetic: the integer of the last
  `\\boxed{`; multiple_choice: the choice letter; math and gsm8k: the content of the last
  `\\boxed{}` with whitespace and sizing commands dropped, `\\dfrac`/`\\tfrac` as `\\frac`,
  and plain numbers (`1,000`, `2.50`, `3/4`) in one canonical form.
  """
  if verifier not in verifiers.KINDS:
    raise ValueError(f"verifier={verifier!r} is not a checker kind; use one of "
                     f"{verifiers.KINDS}")
  if verifier == "synthetic":
    value = verifiers.synthetic_answer(response)
    return None if value is None else str(value)
  boxed = verifiers.last_boxed(response)
  if boxed is None:
    return None
  if verifier == "multiple_choice":
    return verifiers.choice_letter(boxed)
  text = _LATEX_NOISE.sub("", boxed)
  text = re.sub(r"\s+", "", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  text = text.rstrip(".")
  if not text:
    return None
  number = verifiers.plain_number(text)
  if isinstance(number, fractions.Fraction):
    return str(number)
  return text


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
  """maj@k of one problem: the most common answer among the first k samples is correct.

  Args:
    answers: each sample's `answer_key` (None: no answer, no vote), in sampling order.
    correct: each sample's verdict; the winner's verdict is that of its first sample.
    k: 1 <= k <= len(answers).
  """
  if len(answers) != len(correct):
    raise ValueError(f"answers and correct must have one entry per sample, got "
                     f"{len(answers)} and {len(correct)}")
  if not 1 <= k <= len(answers):
    raise ValueError(f"maj@{k} needs 1 <= k <= the {len(answers)} samples of the problem")
  votes = collections.Counter(a for a in answers[:k] if a is not None)
  if not votes:
    return False
  winner = votes.most_common(1)[0][0]
  return bool(correct[list(answers).index(winner)])


def maj_at_ks(answers_BxG: Sequence[Sequence[str | None]], correct_BxG: np.ndarray,
              ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """{"1": maj@1, ...}: mean over problems of `majority_correct`, for the ks <= G."""
  correct_BxG = _check_correct(correct_BxG)
  if len(answers_BxG) != correct_BxG.shape[0]:
    raise ValueError(f"answers_BxG has {len(answers_BxG)} problems, correct_BxG "
                     f"{correct_BxG.shape[0]}")
  g = correct_BxG.shape[1]
  return {str(k): float(np.mean([majority_correct(a, c, k)
                                 for a, c in zip(answers_BxG, correct_BxG)]))
          for k in ks if k <= g}
