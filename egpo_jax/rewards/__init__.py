"""Verifiable rewards: answer checkers, the worker pool that runs them, and the registry.

    from egpo_jax import rewards
    out = rewards.verify_batch(responses, references, kind="gsm8k")
    out.correct, out.rewards, out.reasons        # bool, float32 +1/-1 (Eq. 1), why

Registered in `egpo_jax.core.registry.reward_functions` as "math", "gsm8k",
"multiple_choice" and "synthetic"; each is `fn(responses, references, *, timeout=5.0,
correct_reward=1.0, wrong_reward=-1.0, pool=None) -> RewardOutput`.

The pure-jnp verifier of the synthetic task lives with the task, in
`egpo_jax.data.synthetic`. This package imports no jax (its worker processes must not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from egpo_jax.core import registry
from egpo_jax.rewards import verifiers
from egpo_jax.rewards.pool import PoolError, Verdicts, VerifierPool, check_in_process, default_pool
from egpo_jax.rewards.verifiers import (KINDS, check, choice_letter, last_boxed, plain_number,
                                        synthetic_answer)

__all__ = [
    "KINDS", "PoolError", "RewardOutput", "Verdicts", "VerifierPool", "check",
    "check_in_process", "choice_letter", "default_pool", "last_boxed",
    "plain_number", "rewards_from_correct", "synthetic_answer", "verifiers", "verify_batch",
]


class RewardOutput(NamedTuple):
  """correct: bool [N]; rewards: float32 [N]; reasons: why each was scored so."""
  correct: np.ndarray
  rewards: np.ndarray
  reasons: list[str]


def rewards_from_correct(correct: np.ndarray, correct_reward: float = 1.0,
                         wrong_reward: float = -1.0) -> np.ndarray:
  """+1/-1 by default (paper Eq. 1); pass wrong_reward=0.0 for 1/0 rewards."""
  correct = np.asarray(correct)
  if correct.dtype != np.bool_:
    raise TypeError(f"correct must be a bool array, got dtype {correct.dtype}")
  return np.where(correct, np.float32(correct_reward), np.float32(wrong_reward)).astype(np.float32)


def verify_batch(responses: Sequence[str], references: Sequence[str], *,
                 kind: str | Sequence[str] = "math", timeout: float = 5.0,
                 correct_reward: float = 1.0, wrong_reward: float = -1.0,
                 pool: VerifierPool | None = None, in_process: bool = False) -> RewardOutput:
  """Scores each response against its reference, as training does.

  Args:
    responses: decoded model outputs; the answer is each one's last `\\boxed{...}`.
    references: reference answers (one per response).
    kind: a verifier from `KINDS` for all, or one per response.
    timeout: hard limit in seconds per response; over it, the response is wrong.
    correct_reward, wrong_reward: reward values (Eq. 1: +1 / -1).
    pool: a `VerifierPool`; default: the shared `default_pool()`.
    in_process: check here instead (no pool; timeouts need the main thread). The
      "synthetic" kind, a regex, is always checked here.
  """
  kinds = [kind] * len(responses) if isinstance(kind, str) else list(kind)
  if in_process or (kinds and set(kinds) == {"synthetic"}):
    verdicts = check_in_process(kinds, responses, references, timeout=timeout)
  else:
    verdicts = (pool or default_pool()).check(kinds, responses, references, timeout=timeout)
  return RewardOutput(verdicts.correct,
                      rewards_from_correct(verdicts.correct, correct_reward, wrong_reward),
                      verdicts.reasons)


def _reward_fn(kind: str):
  def reward_fn(responses: Sequence[str], references: Sequence[str], *, timeout: float = 5.0,
                correct_reward: float = 1.0, wrong_reward: float = -1.0,
                pool: VerifierPool | None = None) -> RewardOutput:
    return verify_batch(responses, references, kind=kind, timeout=timeout,
                        correct_reward=correct_reward, wrong_reward=wrong_reward, pool=pool)
  reward_fn.__name__ = f"{kind}_reward"
  reward_fn.__doc__ = f"`verify_batch` with kind={kind!r}."
  return reward_fn


for _kind in KINDS:
  registry.reward_functions.register(_kind)(_reward_fn(_kind))
del _kind
