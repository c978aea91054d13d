"""Group advantages for outcome-reward RL: GRPO, Dr.GRPO, RLOO, EDGE-GRPO and EGPO.

Every statistic is taken over the G responses of ONE prompt (a row of a [B, G] array),
and only over that group's VALID responses (`valid_BxG`; padding rows, filtered groups
and skipped records are False). Invalid responses get advantage 0 and weight 1. A group
with fewer than 2 valid responses (`MIN_VALID_PER_GROUP`) has no spread to learn from and
gets advantage 0 under every estimator here (GRPO's ddof=1 std is undefined there; for
EGPO one response is too little evidence to call a prompt "all wrong").

With r the rewards, n the group's valid count, mean/std over valid members:

  GRPO (EGPO paper Eq. 2):  A_i = (r_i - mean(r)) / (std(r) + std_eps)
      std with `ddof` (verl: ddof=1, std_eps=1e-6). Degenerate groups (std 0) give 0.
  Dr.GRPO (arXiv 2503.20783): A_i = r_i - mean(r)          (no std division)
  RLOO:  A_i = r_i - mean_{j != i}(r_j) = n / (n - 1) * (r_i - mean(r))
  EDGE-GRPO (arXiv 2507.21848), entropy-driven advantage:
      A^_i = A_i * f_i,  f_i = mean(P) / (P_i + eps_p), optionally clamped to
      clamp = (lo, hi) (the EGPO authors' baseline: (0.5, 2.0)); P_i is the mean
      full-vocabulary Shannon entropy of response i (`shannon_BxG`). The factor is the
      same for both signs and is returned as the weights.

EGPO (arXiv 2602.22751, docs/METHOD.md sections 2-4), with H~_i = `entropy_BxG`
(Eq. 5, see `egpo_jax.core.entropy`):

  H_bar  = mean over the group's valid responses of H~_i             (Eq. 6)
  w^_i   = H_bar / (H~_i + eps_h)                                    (Eq. 7)
  w_i    = clip(w^_i, lo_s, hi_s), s = sign of response i            (Eq. 8)
           EGPO: correct [1, lam_max], wrong [lam_min, 1], i.e. max(1, clip(w^)) for
           correct and min(1, clip(w^)) for wrong when lam_min <= 1 <= lam_max.
  optional w_i <- w_i / mean(w)                                      (Eq. 9)
  triage (Eq. 10): all-correct group A_i = 0; mixed group A_i = GRPO z-score on the
           rewards; all-incorrect group A_i = nsr_advantage (-1, negative sample
           reinforcement, NSR).
  A~_i   = w_i * A_i                                                 (Eq. 11)

The weights are constants of the loss (stop-gradient). Groups are triaged by
`correct_BxG` (bool), the z-score uses `rewards_BxG` (float, may be shaped).

The paper's Table 2 ablations are one parameterisation, `EGPOVariant` (a pytree of
scalar arrays: per-sign bounds, NSR weight mode, renorm order), so that a jitted loop can
vmap over a stacked variant without recompiling; the named presets are built by
`egpo_variant(name, lam_min=..., lam_max=...)`:

  | name            | correct [lo, hi]   | wrong [lo, hi]     | NSR weight | renorm       |
  | egpo            | [1, lam_max]       | [lam_min, 1]       | w          | none         |
  | c1 (symmetric)  | [lam_min, lam_max] | [lam_min, lam_max] | w          | none         |
  | c2 (wrong only) | [1, 1]             | [lam_min, 1]       | w          | none         |
  | c3 = lock_one   | [1, lam_max]       | [1, 1]             | w (= 1)    | none         |
  | c4 (uniform NSR)| [1, lam_max]       | [lam_min, 1]       | 1          | none         |
  | c5              | [1, lam_max]       | [lam_min, 1]       | w          | after clamp  |
  | c6              | [1, lam_max]       | [lam_min, 1]       | w          | w^ before    |

Numerical guards (never active at the paper's settings): the denominator of Eq. 7 is
floored at the smallest normal float32 and w^ is capped at `W_HAT_MAX` = 1e12, so eps_h = 0
with a zero entropy stays finite; a renormalisation by a zero group mean is skipped.

Every estimator here accepts the keywords

    fn(rewards_BxG, *, correct_BxG=None, valid_BxG=None, entropy_BxG=None,
       shannon_BxG=None, **hparams) -> AdvantageOutput(advantages, weights)

(both [B, G] float32; weights are 1 where an estimator has none). The trainer passes each
only the keywords it declares (`registry.call`), so a new estimator may declare fewer;
`requires=` at registration names the entropies it cannot do without. Unknown hparams raise
TypeError rather than being ignored. Shapes and dtypes are checked always; values (finite
rewards, non-negative entropies, +-1 rewards, hyperparameter ranges) only where inputs
are concrete, i.e. when called outside jit/vmap/shard_map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.core import registry

MIN_VALID_PER_GROUP = 2
W_HAT_MAX = 1e12

RENORM_NONE = 0
RENORM_AFTER_CLAMP = 1
RENORM_BEFORE_CLAMP = 2


class AdvantageOutput(NamedTuple):
  """Per-response advantages and the multiplicative weights applied to them."""
  advantages: jax.Array  # float32 [B, G]
  weights: jax.Array  # float32 [B, G]


class EGPOVariant(NamedTuple):
  """One EGPO calibration variant as scalar arrays (stack them to vmap over variants).

  Attributes:
    correct_lo, correct_hi: clamp bounds of w^ for correct responses (explicit values).
    wrong_lo, wrong_hi: clamp bounds of w^ for wrong responses.
    nsr_uniform: bool; if True, all-incorrect groups use weight 1 (Table 2's C4).
    renorm: int32; RENORM_NONE, RENORM_AFTER_CLAMP (C5) or RENORM_BEFORE_CLAMP (C6).
  """
  correct_lo: Any
  correct_hi: Any
  wrong_lo: Any
  wrong_hi: Any
  nsr_uniform: Any
  renorm: Any


# Bound symbols: "1", "min" (lam_min), "max" (lam_max).
_PRESETS = {
    "egpo": ("1", "max", "min", "1", False, RENORM_NONE),
    "c1": ("min", "max", "min", "max", False, RENORM_NONE),
    "c2": ("1", "1", "min", "1", False, RENORM_NONE),
    "c3": ("1", "max", "1", "1", False, RENORM_NONE),
    "c4": ("1", "max", "min", "1", True, RENORM_NONE),
    "c5": ("1", "max", "min", "1", False, RENORM_AFTER_CLAMP),
    "c6": ("1", "max", "min", "1", False, RENORM_BEFORE_CLAMP),
}
_ALIASES = {"lock_one": "c3"}
EGPO_PRESETS = tuple(_PRESETS)
EGPO_VARIANT_NAMES = EGPO_PRESETS + tuple(_ALIASES)

DEFAULT_LAM_MIN = 0.8
DEFAULT_LAM_MAX = 2.0


# ---------------------------------------------------------------- host-side validation


def _concrete(x) -> np.ndarray | None:
  """The value of x as NumPy, or None when it is traced (inside jit/vmap/shard_map)."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_scalar(name: str, value, *, lo=None, hi=None, allowed=None) -> None:
  v = _concrete(value)
  if v is None:
    return
  if v.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
  if not np.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}")
  if allowed is not None and v.item() not in allowed:
    raise ValueError(f"{name} must be one of {sorted(allowed)}, got {v.item()}")
  if lo is not None and v < lo:
    raise ValueError(f"{name} must be >= {lo}, got {v.item()}")
  if hi is not None and v > hi:
    raise ValueError(f"{name} must be <= {hi}, got {v.item()}")


def _prepare(estimator: str, rewards_BxG, correct_BxG, valid_BxG, *,
             ref_name: str = "rewards_BxG", **extras_BxG):
  """Checks shapes/dtypes (always) and values (when concrete); masks invalid entries.

  `rewards_BxG` is the reference [B, G] array, reported as `ref_name`. Returns float32
  rewards, bool correct (False where invalid), bool valid, and the float32 extras, with
  invalid entries zeroed so that NaN there cannot leak into group statistics.
  """
  rewards_BxG = jnp.asarray(rewards_BxG)
  chex.assert_rank(rewards_BxG, 2, custom_message=(
      f"{estimator}: {ref_name} must be [B prompts, G responses]; reshape a flat [B*G] "
      "array with .reshape(B, G)"), exception_type=ValueError)
  b, g = rewards_BxG.shape
  if g < MIN_VALID_PER_GROUP:
    raise ValueError(f"{estimator}: group size G={g} < {MIN_VALID_PER_GROUP}; group "
                     f"advantages need at least 2 responses per prompt ({ref_name} is "
                     "[B, G])")
  if rewards_BxG.dtype == jnp.bool_ or not jnp.issubdtype(rewards_BxG.dtype, jnp.number):
    raise ValueError(f"{estimator}: {ref_name} must be numeric, got {rewards_BxG.dtype}; "
                     "pass float rewards (e.g. jnp.where(correct, 1., -1.)) and the bool "
                     "verdicts as correct_BxG")

  def check_mask(name, m, default):
    if m is None:
      return default
    m = jnp.asarray(m)
    chex.assert_shape(m, (b, g), custom_message=(
        f"{estimator}: {name} must have the shape of {ref_name}"),
                      exception_type=ValueError)
    if m.dtype != jnp.bool_:
      raise ValueError(f"{estimator}: {name} must be bool, got {m.dtype}; pass "
                       f"{name}.astype(bool)")
    return m

  valid_BxG = check_mask("valid_BxG", valid_BxG, jnp.ones((b, g), jnp.bool_))
  correct_BxG = check_mask("correct_BxG", correct_BxG, rewards_BxG > 0)
  rewards_BxG = rewards_BxG.astype(jnp.float32)

  valid_np = _concrete(valid_BxG)
  r_np = _concrete(rewards_BxG)
  if valid_np is not None and r_np is not None and not np.all(np.isfinite(r_np[valid_np])):
    raise ValueError(f"{estimator}: {ref_name} has NaN/inf at valid positions; fix its "
                     "source or mark those responses invalid in valid_BxG")
  out = {}
  for name, x in extras_BxG.items():
    x = jnp.asarray(x)
    chex.assert_shape(x, (b, g), custom_message=(
        f"{estimator}: {name} must have the shape of {ref_name}"),
                      exception_type=ValueError)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{estimator}: {name} must be float, got {x.dtype}")
    x_np = _concrete(x)
    if valid_np is not None and x_np is not None:
      xv = x_np[valid_np]
      if not np.all(np.isfinite(xv)):
        raise ValueError(f"{estimator}: {name} has NaN/inf at valid positions")
      if np.any(xv < 0):
        raise ValueError(f"{estimator}: {name} must be >= 0 (an entropy, e.g. the mean "
                         "of -logp); got a negative value: were log-probs passed instead "
                         "of their negation?")
    out[name] = jnp.where(valid_BxG, x.astype(jnp.float32), 0.0)
  rewards_BxG = jnp.where(valid_BxG, rewards_BxG, 0.0)
  return rewards_BxG, correct_BxG & valid_BxG, valid_BxG, out


def _check_ddof_eps(ddof, std_eps) -> None:
  _check_scalar("ddof", ddof, allowed={0, 1})
  _check_scalar("std_eps", std_eps, lo=0.0)


def _require(estimator: str, name: str, x) -> None:
  if x is None:
    hint = {"entropy_BxG": "the per-response entropy proxy of Eq. 5 "
                           "(egpo_jax.core.entropy.entropy_proxy)",
            "shannon_BxG": "the per-response mean Shannon entropy (egpo_jax.core.entropy."
                           "token_entropy, then masked_sequence_mean)"}[name]
    raise ValueError(f"{estimator} needs {name}: {hint}, reshaped to [B, G]")


# ---------------------------------------------------------------- group statistics


def _group_count(valid_BxG):
  return jnp.sum(valid_BxG, axis=-1, keepdims=True).astype(jnp.float32)


def _group_mean(x_BxG, valid_BxG, n_Bx1):
  return jnp.sum(jnp.where(valid_BxG, x_BxG, 0.0), axis=-1, keepdims=True) / jnp.maximum(
      n_Bx1, 1.0)


def _group_zscore(r_BxG, valid_BxG, ddof, std_eps):
  n_Bx1 = _group_count(valid_BxG)
  centred = jnp.where(valid_BxG, r_BxG - _group_mean(r_BxG, valid_BxG, n_Bx1), 0.0)
  var_Bx1 = jnp.sum(centred**2, axis=-1, keepdims=True) / jnp.maximum(n_Bx1 - ddof, 1.0)
  z = centred / (jnp.sqrt(var_Bx1) + std_eps)
  return jnp.where(valid_BxG & (n_Bx1 >= MIN_VALID_PER_GROUP), z, 0.0)


def _ones_like(x_BxG):
  return jnp.ones(x_BxG.shape, jnp.float32)


# ---------------------------------------------------------------- baselines


@registry.advantage_estimators.register("grpo")
def grpo_advantages(rewards_BxG: jax.Array, *, correct_BxG: jax.Array | None = None,
                    valid_BxG: jax.Array | None = None,
                    entropy_BxG: jax.Array | None = None,
                    shannon_BxG: jax.Array | None = None,
                    ddof: int = 1, std_eps: float = 1e-6) -> AdvantageOutput:
  """GRPO z-score (Eq. 2): (r_i - mean(r)) / (std(r) + std_eps) over valid members.

  Args:
    rewards_BxG: float rewards.
    correct_BxG: unused (accepted for the uniform registry call).
    valid_BxG: bool mask of responses that take part; default all.
    entropy_BxG, shannon_BxG: unused.
    ddof: 1 for the unbiased std (verl), 0 for the population std.
    std_eps: added to the std (verl: 1e-6).

  Returns:
    AdvantageOutput; weights are 1.
  """
  del correct_BxG, entropy_BxG, shannon_BxG
  r, _, valid, _ = _prepare("grpo", rewards_BxG, None, valid_BxG)
  _check_ddof_eps(ddof, std_eps)
  return AdvantageOutput(_group_zscore(r, valid, ddof, std_eps), _ones_like(r))


@registry.advantage_estimators.register("dr_grpo")
def dr_grpo_advantages(rewards_BxG: jax.Array, *, correct_BxG: jax.Array | None = None,
                       valid_BxG: jax.Array | None = None,
                       entropy_BxG: jax.Array | None = None,
                       shannon_BxG: jax.Array | None = None) -> AdvantageOutput:
  """Dr.GRPO: r_i - mean(r), no std division (its length-unbiased loss is in losses.py)."""
  del correct_BxG, entropy_BxG, shannon_BxG
  r, _, valid, _ = _prepare("dr_grpo", rewards_BxG, None, valid_BxG)
  n = _group_count(valid)
  adv = jnp.where(valid & (n >= MIN_VALID_PER_GROUP), r - _group_mean(r, valid, n), 0.0)
  return AdvantageOutput(adv, _ones_like(r))


@registry.advantage_estimators.register("rloo")
def rloo_advantages(rewards_BxG: jax.Array, *, correct_BxG: jax.Array | None = None,
                    valid_BxG: jax.Array | None = None,
                    entropy_BxG: jax.Array | None = None,
                    shannon_BxG: jax.Array | None = None) -> AdvantageOutput:
  """RLOO: r_i minus the mean reward of the OTHER valid members, n/(n-1) (r_i - mean)."""
  del correct_BxG, entropy_BxG, shannon_BxG
  r, _, valid, _ = _prepare("rloo", rewards_BxG, None, valid_BxG)
  n = _group_count(valid)
  scale = n / jnp.maximum(n - 1.0, 1.0)
  adv = jnp.where(valid & (n >= MIN_VALID_PER_GROUP),
                  scale * (r - _group_mean(r, valid, n)), 0.0)
  return AdvantageOutput(adv, _ones_like(r))


@registry.advantage_estimators.register("edge_grpo", requires=("shannon_BxG",))
def edge_grpo_advantages(rewards_BxG: jax.Array, *, correct_BxG: jax.Array | None = None,
                         valid_BxG: jax.Array | None = None,
                         entropy_BxG: jax.Array | None = None,
                         shannon_BxG: jax.Array | None = None,
                         ddof: int = 1, std_eps: float = 1e-6, eps_p: float = 1e-6,
                         clamp: tuple[float, float] | None = None) -> AdvantageOutput:
  """EDGE-GRPO's entropy-driven advantage: A_i * mean(P) / (P_i + eps_p), optionally clamped.

  Args:
    rewards_BxG: float rewards; A_i is their GRPO z-score (`ddof`, `std_eps`).
    correct_BxG, entropy_BxG: unused.
    valid_BxG: bool mask of responses that take part.
    shannon_BxG: required; P_i, mean full-vocabulary Shannon entropy of each response.
    eps_p: added to P_i. A group whose P are all 0 gets factor 0 unless clamped.
    clamp: optional (lo, hi) bounds of the factor (EGPO authors' baseline (0.5, 2.0)).

  Returns:
    AdvantageOutput; weights are the (clamped, stop-gradient) factors, 1 where invalid.
  """
  del correct_BxG, entropy_BxG
  _require("edge_grpo", "shannon_BxG", shannon_BxG)
  r, _, valid, ex = _prepare("edge_grpo", rewards_BxG, None, valid_BxG,
                             shannon_BxG=shannon_BxG)
  _check_ddof_eps(ddof, std_eps)
  _check_scalar("eps_p", eps_p, lo=0.0)
  if clamp is not None:
    if len(clamp) != 2:
      raise ValueError(f"edge_grpo: clamp must be a (lo, hi) pair or None, got {clamp!r}")
    _check_scalar("clamp[0]", clamp[0], lo=0.0)
    _check_scalar("clamp[1]", clamp[1], lo=0.0)
    lo, hi = _concrete(clamp[0]), _concrete(clamp[1])
    if lo is not None and hi is not None and lo > hi:
      raise ValueError(f"edge_grpo: clamp=({lo}, {hi}) has lo > hi")
  p = jax.lax.stop_gradient(ex["shannon_BxG"])
  factor = _group_mean(p, valid, _group_count(valid)) / jnp.maximum(
      p + eps_p, jnp.finfo(jnp.float32).tiny)
  factor = jnp.minimum(factor, W_HAT_MAX)
  if clamp is not None:
    factor = jnp.clip(factor, clamp[0], clamp[1])
  factor = jnp.where(valid, factor, 1.0)
  return AdvantageOutput(_group_zscore(r, valid, ddof, std_eps) * factor, factor)


# ---------------------------------------------------------------- EGPO


def egpo_variant(name: str, *, lam_min: float | jax.Array = DEFAULT_LAM_MIN,
                 lam_max: float | jax.Array = DEFAULT_LAM_MAX) -> EGPOVariant:
  """The preset `name` ("egpo", "c1".."c6", "lock_one"; case-insensitive) as arrays.

  lam_min and lam_max may be traced (e.g. vmapped); their ranges 0 < lam_min <= 1 <=
  lam_max are checked when concrete.
  """
  if not isinstance(name, str):
    raise TypeError(f"variant name must be a string, got {type(name).__name__}")
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in _PRESETS:
    raise ValueError(f"unknown EGPO variant {name!r}; known: {list(EGPO_VARIANT_NAMES)} "
                     "(case-insensitive), or pass an EGPOVariant")
  _check_scalar("lam_min", lam_min, lo=0.0, hi=1.0)
  _check_scalar("lam_max", lam_max, lo=1.0)
  lmin = _concrete(lam_min)
  if lmin is not None and lmin <= 0:
    raise ValueError(f"lam_min must be > 0 (weights are multipliers), got {lmin}")
  sym = {"1": jnp.float32(1.0), "min": jnp.asarray(lam_min, jnp.float32),
         "max": jnp.asarray(lam_max, jnp.float32)}
  clo, chi, wlo, whi, nsr_uniform, renorm = _PRESETS[key]
  return EGPOVariant(sym[clo], sym[chi], sym[wlo], sym[whi], jnp.bool_(nsr_uniform),
                     jnp.int32(renorm))


def stack_variants(variants: Sequence[EGPOVariant]) -> EGPOVariant:
  """Stacks variants along a new leading axis, ready for jax.vmap(..., in_axes=0)."""
  if not variants:
    raise ValueError("stack_variants needs at least one EGPOVariant")
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *variants)


def _resolve_variant(variant, lam_min, lam_max) -> EGPOVariant:
  if isinstance(variant, str):
    return egpo_variant(variant,
                        lam_min=DEFAULT_LAM_MIN if lam_min is None else lam_min,
                        lam_max=DEFAULT_LAM_MAX if lam_max is None else lam_max)
  if not isinstance(variant, EGPOVariant):
    raise TypeError(f"variant must be a name {list(EGPO_VARIANT_NAMES)} or an EGPOVariant, "
                    f"got {type(variant).__name__}")
  if lam_min is not None or lam_max is not None:
    raise ValueError("lam_min/lam_max apply only to a named variant; an EGPOVariant carries "
                     "its own bounds: build it with egpo_variant(name, lam_min=..., "
                     "lam_max=...)")
  v = EGPOVariant(*(jnp.asarray(x) for x in variant))
  for name, x in v._asdict().items():
    if x.ndim != 0:
      raise ValueError(f"EGPOVariant.{name} must be a scalar, got shape {x.shape}; to run "
                       "a stacked variant use jax.vmap over it")
  for name in ("correct_lo", "correct_hi", "wrong_lo", "wrong_hi"):
    _check_scalar(f"EGPOVariant.{name}", getattr(v, name), lo=0.0)
  for sign in ("correct", "wrong"):
    lo, hi = _concrete(getattr(v, f"{sign}_lo")), _concrete(getattr(v, f"{sign}_hi"))
    if lo is not None and hi is not None and lo > hi:
      raise ValueError(f"EGPOVariant: {sign}_lo={lo} > {sign}_hi={hi}")
  _check_scalar("EGPOVariant.renorm", v.renorm,
                allowed={RENORM_NONE, RENORM_AFTER_CLAMP, RENORM_BEFORE_CLAMP})
  return v


def _renorm(w_BxG, valid_BxG, n_Bx1):
  mean_Bx1 = _group_mean(w_BxG, valid_BxG, n_Bx1)
  return jnp.where(mean_Bx1 > 0, w_BxG / jnp.where(mean_Bx1 > 0, mean_Bx1, 1.0), w_BxG)


def _egpo_weights(h_BxG, correct_BxG, valid_BxG, eps_h, v: EGPOVariant):
  h_BxG = jax.lax.stop_gradient(h_BxG)
  n_Bx1 = _group_count(valid_BxG)
  h_bar_Bx1 = _group_mean(h_BxG, valid_BxG, n_Bx1)
  w_hat = h_bar_Bx1 / jnp.maximum(h_BxG + eps_h, jnp.finfo(jnp.float32).tiny)
  w_hat = jnp.minimum(w_hat, W_HAT_MAX)
  w_hat = jnp.where(v.renorm == RENORM_BEFORE_CLAMP, _renorm(w_hat, valid_BxG, n_Bx1),
                    w_hat)
  lo = jnp.where(correct_BxG, v.correct_lo, v.wrong_lo)
  hi = jnp.where(correct_BxG, v.correct_hi, v.wrong_hi)
  w = jnp.clip(w_hat, lo, hi)
  w = jnp.where(v.renorm == RENORM_AFTER_CLAMP, _renorm(w, valid_BxG, n_Bx1), w)
  all_wrong_Bx1 = ~jnp.any(correct_BxG & valid_BxG, axis=-1, keepdims=True)
  w = jnp.where(v.nsr_uniform & all_wrong_Bx1, 1.0, w)
  return jnp.where(valid_BxG, w, 1.0).astype(jnp.float32)


def egpo_weights(entropy_BxG: jax.Array, correct_BxG: jax.Array,
                 valid_BxG: jax.Array | None = None, *,
                 lam_min: float | jax.Array | None = None,
                 lam_max: float | jax.Array | None = None,
                 eps_h: float | jax.Array = 1e-5,
                 variant: str | EGPOVariant = "egpo") -> jax.Array:
  """EGPO calibration weights, Eqs. 6-9 (plus the variant's NSR weight mode).

  Args:
    entropy_BxG: H~_i, the entropy proxy of each response (Eq. 5), >= 0.
    correct_BxG: bool verdicts; choose each response's clamp bounds.
    valid_BxG: bool mask; H_bar and renorm means use valid responses only.
    lam_min, lam_max: bounds of a named variant (default 0.8, 2.0); must be None when
      `variant` is an EGPOVariant, which carries its own bounds.
    eps_h: added to H~_i in Eq. 7 (authors' runs: 1e-5).
    variant: a name (see `EGPO_VARIANT_NAMES`) or an EGPOVariant of scalar arrays.

  Returns:
    weights_BxG, float32, stop-gradient; 1 where invalid. In all-incorrect groups of a
    variant with nsr_uniform they are 1.
  """
  if correct_BxG is None:
    raise ValueError("egpo_weights needs correct_BxG (bool) to pick each response's bounds")
  _, correct, valid, ex = _prepare("egpo_weights", entropy_BxG, correct_BxG, valid_BxG,
                                   ref_name="entropy_BxG", entropy_BxG=entropy_BxG)
  v = _resolve_variant(variant, lam_min, lam_max)
  _check_scalar("eps_h", eps_h, lo=0.0)
  return _egpo_weights(ex["entropy_BxG"], correct, valid, eps_h, v)


@registry.advantage_estimators.register("egpo", requires=("entropy_BxG",))
def egpo_advantages(rewards_BxG: jax.Array, entropy_BxG: jax.Array | None = None, *,
                    correct_BxG: jax.Array | None = None,
                    valid_BxG: jax.Array | None = None,
                    shannon_BxG: jax.Array | None = None,
                    lam_min: float | jax.Array | None = None,
                    lam_max: float | jax.Array | None = None,
                    eps_h: float | jax.Array = 1e-5,
                    variant: str | EGPOVariant = "egpo",
                    nsr: bool | jax.Array = True,
                    nsr_advantage: float | jax.Array = -1.0,
                    calibrate: bool | jax.Array = True,
                    ddof: int = 1, std_eps: float = 1e-6,
                    require_pm1_rewards: bool = False) -> AdvantageOutput:
  """EGPO's calibrated advantage A~ = w * A (Eqs. 6-11) with the group triage of Eq. 10.

  Args:
    rewards_BxG: float rewards; the z-score of mixed groups uses them.
    entropy_BxG: required; H~_i of each response (Eq. 5), >= 0.
    correct_BxG: bool verdicts for the triage and the weight signs; default rewards > 0.
    valid_BxG: bool mask; invalid responses are outside every statistic, get A~ = 0.
    shannon_BxG: unused (accepted for the uniform registry call).
    lam_min, lam_max: bounds for a named variant (default 0.8, 2.0); leave None with an
      EGPOVariant.
    eps_h: Eq. 7's epsilon (authors' runs 1e-5).
    variant: name ("egpo", "c1".."c6", "lock_one"; case-insensitive) or EGPOVariant
      (scalar arrays; vmap over a stacked one).
    nsr: negative sample reinforcement; False gives all-incorrect groups A = 0.
      May be a traced bool.
    nsr_advantage: A_i of all-incorrect groups when nsr (default -1).
    calibrate: False forces the weights to 1 (then nsr=False gives exactly GRPO).
    ddof, std_eps: of the mixed-group z-score (verl: 1, 1e-6).
    require_pm1_rewards: if True (and inputs are concrete), raise unless valid rewards
      are +1 where correct and -1 where not (the paper's Eq. 1).

  Returns:
    AdvantageOutput(advantages=A~, weights=w), both float32 [B, G]; weights are
    stop-gradient and 1 where invalid.
  """
  del shannon_BxG
  _require("egpo", "entropy_BxG", entropy_BxG)
  r, correct, valid, ex = _prepare("egpo", rewards_BxG, correct_BxG, valid_BxG,
                                   entropy_BxG=entropy_BxG)
  _check_ddof_eps(ddof, std_eps)
  _check_scalar("eps_h", eps_h, lo=0.0)
  _check_scalar("nsr_advantage", nsr_advantage)
  if require_pm1_rewards:
    r_np, c_np, v_np = _concrete(r), _concrete(correct), _concrete(valid)
    if r_np is not None and c_np is not None and v_np is not None:
      expected = np.where(c_np, 1.0, -1.0)
      bad = v_np & (r_np != expected)
      if np.any(bad):
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"egpo: require_pm1_rewards=True but rewards_BxG[{i}, {j}]={r_np[i, j]} with "
            f"correct_BxG[{i}, {j}]={bool(c_np[i, j])}; EGPO's Eq. 1 rewards are +1 if "
            "correct else -1. Pass such rewards or require_pm1_rewards=False")
  v = _resolve_variant(variant, lam_min, lam_max)

  n_Bx1 = _group_count(valid)
  n_correct_Bx1 = jnp.sum(correct, axis=-1, keepdims=True).astype(jnp.float32)
  has_group_Bx1 = n_Bx1 >= MIN_VALID_PER_GROUP
  all_correct_Bx1 = has_group_Bx1 & (n_correct_Bx1 == n_Bx1)
  all_wrong_Bx1 = has_group_Bx1 & (n_correct_Bx1 == 0)
  mixed_Bx1 = has_group_Bx1 & ~all_correct_Bx1 & ~all_wrong_Bx1
  a_nsr = jnp.where(nsr, jnp.asarray(nsr_advantage, jnp.float32), 0.0)
  base = jnp.where(mixed_Bx1, _group_zscore(r, valid, ddof, std_eps),
                   jnp.where(all_wrong_Bx1, a_nsr, 0.0))
  base = jnp.where(valid, base, 0.0)
  w = _egpo_weights(ex["entropy_BxG"], correct, valid, eps_h, v)
  w = jnp.where(calibrate, w, 1.0).astype(jnp.float32)
  return AdvantageOutput((w * base).astype(jnp.float32), w)
