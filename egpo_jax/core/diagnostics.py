"""Training diagnostics as pure functions: group outcomes, signal, weights, entropy.

Each function returns a dict of scalar jnp arrays, ready to be merged into one metrics
dict (a key that two functions share, e.g. num_correct, has the same value in both). Means over an empty class (no correct response, no valid
group, no valid token) are 0 and come with the class count, so that JSON logs never
contain NaN; read a 0 mean together with its count.

Group quantities follow `egpo_jax.core.advantages`: only valid responses count, and a
group takes part only if it has at least `MIN_VALID_PER_GROUP` (2) valid responses.

  outcome fractions: all-correct / all-wrong / mixed groups over groups that take part.
  advantage signal:  fraction of valid responses with A != 0; and the fraction whose
                     A != 0 only because of NSR (they sit in an all-wrong group, where
                     GRPO gives 0) - the signal that EGPO's NSR recovers.
  weights by sign:   mean EGPO weight of correct and of wrong valid responses.
  entropy by sign:   mean entropy of correct and of wrong valid responses and the gap
                     wrong - correct (EGPO Fig. 3: 0.129 - 0.080 = 0.048 after EGPO).

The token-level metrics of the update (clip fractions, the policy's drift
`kl_old_new_k3`, the reference KL) are computed once, by `losses.policy_loss`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from egpo_jax.core.advantages import MIN_VALID_PER_GROUP

Metrics = dict[str, jax.Array]


def _mask(name: str, m, like, default_shape) -> jax.Array:
  if m is None:
    return jnp.ones(default_shape, jnp.bool_)
  m = jnp.asarray(m)
  chex.assert_shape(m, default_shape, custom_message=f"{name} must have the shape of {like}",
                    exception_type=ValueError)
  return m if m.dtype == jnp.bool_ else m != 0


def _check_bxg(name: str, x) -> jax.Array:
  x = jnp.asarray(x)
  chex.assert_rank(x, 2, custom_message=f"{name} must be [B, G]", exception_type=ValueError)
  return x


def _check_correct(correct_BxG, shape) -> jax.Array:
  correct_BxG = jnp.asarray(correct_BxG)
  chex.assert_shape(correct_BxG, shape, custom_message="correct_BxG must be [B, G] like the "
                    "other inputs", exception_type=ValueError)
  if correct_BxG.dtype != jnp.bool_:
    raise ValueError(f"correct_BxG must be bool, got {correct_BxG.dtype}; pass "
                     "correct_BxG.astype(bool)")
  return correct_BxG


def _safe_mean(x, mask) -> tuple[jax.Array, jax.Array]:
  """Mean of x over mask (0 if empty) and the count, as float32 / int32 scalars."""
  count = jnp.sum(mask)
  total = jnp.sum(jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0))
  return total / jnp.maximum(count, 1).astype(jnp.float32), count.astype(jnp.int32)


def _groups(correct_BxG, valid_BxG):
  """(takes_part_B, all_correct_B, all_wrong_B) under the estimators' convention."""
  n_B = jnp.sum(valid_BxG, axis=-1)
  n_correct_B = jnp.sum(correct_BxG & valid_BxG, axis=-1)
  part_B = n_B >= MIN_VALID_PER_GROUP
  return part_B, part_B & (n_correct_B == n_B), part_B & (n_correct_B == 0)


def group_outcome_fractions(correct_BxG: jax.Array,
                            valid_BxG: jax.Array | None = None) -> Metrics:
  """Fractions of all-correct, all-wrong and mixed groups among groups that take part.

  Returns:
    frac_all_correct, frac_all_wrong, frac_mixed (float32, sum to 1 unless there is no
    group, then all 0) and num_groups (int32).
  """
  correct_BxG = _check_correct(_check_bxg("correct_BxG", correct_BxG),
                               jnp.shape(correct_BxG))
  valid_BxG = _mask("valid_BxG", valid_BxG, "correct_BxG", correct_BxG.shape)
  part_B, all_correct_B, all_wrong_B = _groups(correct_BxG, valid_BxG)
  frac_ac, num = _safe_mean(all_correct_B, part_B)
  frac_aw, _ = _safe_mean(all_wrong_B, part_B)
  frac_mixed, _ = _safe_mean(~all_correct_B & ~all_wrong_B, part_B)
  return {"frac_all_correct": frac_ac, "frac_all_wrong": frac_aw, "frac_mixed": frac_mixed,
          "num_groups": num}


def advantage_signal(advantages_BxG: jax.Array, correct_BxG: jax.Array,
                     valid_BxG: jax.Array | None = None) -> Metrics:
  """How many valid responses carry a learning signal, and how many only through NSR.

  Returns:
    frac_nonzero_adv: valid responses with advantage != 0, over valid responses.
    frac_nsr_only_adv: valid responses with advantage != 0 in an all-wrong group (where
      GRPO's advantage is 0), over valid responses.
    num_responses: valid responses (int32).
  """
  advantages_BxG = _check_bxg("advantages_BxG", advantages_BxG)
  correct_BxG = _check_correct(correct_BxG, advantages_BxG.shape)
  valid_BxG = _mask("valid_BxG", valid_BxG, "advantages_BxG", advantages_BxG.shape)
  _, _, all_wrong_B = _groups(correct_BxG, valid_BxG)
  nonzero_BxG = advantages_BxG != 0
  frac, num = _safe_mean(nonzero_BxG, valid_BxG)
  frac_nsr, _ = _safe_mean(nonzero_BxG & all_wrong_B[:, None], valid_BxG)
  return {"frac_nonzero_adv": frac, "frac_nsr_only_adv": frac_nsr, "num_responses": num}


def weights_by_sign(weights_BxG: jax.Array, correct_BxG: jax.Array,
                    valid_BxG: jax.Array | None = None) -> Metrics:
  """Mean weight of correct and of wrong valid responses (0 for an empty class) + counts."""
  weights_BxG = _check_bxg("weights_BxG", weights_BxG)
  correct_BxG = _check_correct(correct_BxG, weights_BxG.shape)
  valid_BxG = _mask("valid_BxG", valid_BxG, "weights_BxG", weights_BxG.shape)
  w_c, n_c = _safe_mean(weights_BxG, valid_BxG & correct_BxG)
  w_w, n_w = _safe_mean(weights_BxG, valid_BxG & ~correct_BxG)
  return {"mean_weight_correct": w_c, "mean_weight_wrong": w_w,
          "num_correct": n_c, "num_wrong": n_w}


def entropy_by_correctness(entropy_BxG: jax.Array, correct_BxG: jax.Array,
                           valid_BxG: jax.Array | None = None) -> Metrics:
  """Mean entropy of correct and of wrong valid responses, and the gap wrong - correct.

  The gap is 0 when either class is empty (see num_correct / num_wrong).
  """
  entropy_BxG = _check_bxg("entropy_BxG", entropy_BxG)
  correct_BxG = _check_correct(correct_BxG, entropy_BxG.shape)
  valid_BxG = _mask("valid_BxG", valid_BxG, "entropy_BxG", entropy_BxG.shape)
  h_c, n_c = _safe_mean(entropy_BxG, valid_BxG & correct_BxG)
  h_w, n_w = _safe_mean(entropy_BxG, valid_BxG & ~correct_BxG)
  gap = jnp.where((n_c > 0) & (n_w > 0), h_w - h_c, 0.0)
  return {"mean_entropy_correct": h_c, "mean_entropy_wrong": h_w, "entropy_gap": gap,
          "num_correct": n_c, "num_wrong": n_w}


def group_diagnostics(advantages_BxG: jax.Array, weights_BxG: jax.Array,
                      entropy_BxG: jax.Array, correct_BxG: jax.Array,
                      valid_BxG: jax.Array | None = None) -> Metrics:
  """All group-level metrics above in one dict (outcomes, signal, weights, entropy)."""
  out = group_outcome_fractions(correct_BxG, valid_BxG)
  out.update(advantage_signal(advantages_BxG, correct_BxG, valid_BxG))
  out.update(weights_by_sign(weights_BxG, correct_BxG, valid_BxG))
  out.update(entropy_by_correctness(entropy_BxG, correct_BxG, valid_BxG))
  return out
