"""The clipped policy-gradient loss of docs/METHOD.md and its parts, as pure functions.

    rho_t = exp(logp_t - logp_old_t)                                   (per token)
    J_t   = min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)      (Eqs. 3-4, 12)
    J_t   = max(J_t, c A)  where A < 0, with dual clip c > 1 (Ye et al. 2020)
    loss  = -aggregate(w_t J_t) + kl_coef * aggregate(KL_t)

A is one advantage per response (adv_N, e.g. EGPO's calibrated A~ of Eq. 11), broadcast
over its tokens; w_t are optional truncated importance-sampling weights for the
sampler/trainer mismatch. eps_low != eps_high is DAPO's clip-higher. The dual clip
bounds the loss of a negative-advantage token whose ratio has exploded: beyond rho > c
the objective is the constant c A and that token's gradient is zero.

Aggregation modes (names as in verl), over the valid tokens of mask_NxT:
    token-mean               sum(x m) / num_tokens                  (DAPO, the paper)
    seq-mean-token-mean      sum_i [sum_t(x m) / sum_t m] / num_seqs   (GRPO)
    seq-mean-token-sum       sum_i sum_t(x m) / num_seqs
    seq-mean-token-sum-norm  sum_i sum_t(x m) / (num_seqs * max_len)  (Dr.GRPO)
num_tokens defaults to the valid tokens of this batch and num_seqs to its sequences with
at least one valid token. When a batch is split by responses into micro-batches or
across devices, pass the GLOBAL counts: the per-part losses then add up (sum, or psum) to the loss of the
whole batch, gradients included. Dr.GRPO's mode is the mean over sequences of the token
sum divided by a constant max_len, as in the Dr.GRPO reference code; verl's mode of that
name omits the division by num_seqs.

Overflow. exp(log-ratio) overflows float32 beyond ~88.7, and 0 * inf is NaN in the
backward pass even at a padded token, so a single garbage log-prob (e.g. -inf from a
sampler that gave a token zero probability) would NaN the whole update. `policy_loss`
therefore sets the log-ratio of padded tokens to 0 BEFORE `exp` (`jnp.where`, whose
unselected branch gets an exactly-zero gradient) and clamps the log-ratio of valid tokens
to +-LOG_RATIO_CLAMP = 20 as verl does (exp(20) ~ 4.9e8 is finite, and the clamp's
gradient beyond it is zero). Below the clamp the loss and its gradient are bit-identical
to the unclamped formula.

Also here: Schulman's KL estimators k1/k2/k3, DAPO's overlong length penalty (arXiv
2503.14476, Eq. 13) and its dynamic-sampling group filter.

Values that are Python numbers or strings are checked on the host and raise errors that
name the field; array hyperparameters (for vmap over variants) are used as given.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from egpo_jax.core import registry

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# |log rho_t| is clamped to this before exp (verl's value): see "Overflow" above.
LOG_RATIO_CLAMP = 20.0

Scalar = float | jax.Array


def _check_choice(name: str, value: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_number(name: str, value, *, low: float, strict: bool = False,
                  allow_none: bool = False):
  """Checks a Python-number hyperparameter; arrays pass unchecked (traced values)."""
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} is required here; pass a number")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  bad = value <= low if strict else value < low
  if bad:
    raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")


def _check_token_arrays(mask_NxT, *arrays_NxT):
  chex.assert_rank(mask_NxT, 2)
  chex.assert_shape(list(arrays_NxT), mask_NxT.shape)


def _as_weights(mask_NxT: jax.Array) -> jax.Array:
  return mask_NxT.astype(jnp.float32)


def aggregate(values_NxT: jax.Array, mask_NxT: jax.Array, agg: str = "token-mean", *,
              num_tokens: Scalar | None = None, num_seqs: Scalar | None = None,
              max_len: Scalar | None = None) -> jax.Array:
  """Reduces per-token values over the valid tokens to a float32 scalar (see module doc).

  Args:
    values_NxT: per-token values (a loss, a KL, a metric).
    mask_NxT: 1/True on valid response tokens.
    agg: one of AGG_MODES.
    num_tokens: for "token-mean", the global count of valid tokens when this batch is
      one part of a bigger one; default sum(mask_NxT).
    num_seqs: for the seq-mean modes, the global count of sequences; default the rows
      of this batch with at least one valid token.
    max_len: for "seq-mean-token-sum-norm", the constant length normaliser (e.g. the
      maximum response length), required there.
  """
  _check_choice("agg", agg, AGG_MODES)
  _check_token_arrays(mask_NxT, values_NxT)
  _check_number("num_tokens", num_tokens, low=0, strict=True, allow_none=True)
  _check_number("num_seqs", num_seqs, low=0, strict=True, allow_none=True)
  m_NxT = _as_weights(mask_NxT)
  # where, not multiply: garbage at padded positions (even inf) must not leak.
  x_NxT = jnp.where(m_NxT > 0, values_NxT.astype(jnp.float32) * m_NxT, 0.0)
  if agg == "token-mean":
    if num_tokens is None:
      num_tokens = jnp.maximum(jnp.sum(m_NxT), 1.0)
    return jnp.sum(x_NxT) / num_tokens
  tokens_N = jnp.sum(m_NxT, axis=-1)
  if num_seqs is None:
    num_seqs = jnp.maximum(jnp.sum(tokens_N > 0), 1).astype(jnp.float32)
  seq_N = jnp.sum(x_NxT, axis=-1)
  if agg == "seq-mean-token-mean":
    seq_N = seq_N / jnp.maximum(tokens_N, 1.0)
  elif agg == "seq-mean-token-sum-norm":
    _check_number("max_len", max_len, low=0, strict=True)
    seq_N = seq_N / max_len
  return jnp.sum(seq_N) / num_seqs


def clipped_surrogate(logps_NxT: jax.Array, old_logps_NxT: jax.Array, adv_N: jax.Array, *,
                      eps_low: Scalar = 0.2, eps_high: Scalar = 0.2,
                      dual_clip: Scalar | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token clipped objective J_t (to MAXIMISE; Eqs. 3-4, 12) and the ratio rho_t.

  J_t = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and with dual_clip = c > 1,
  J_t = max(J_t, c A) for A < 0 (standard dual-clip PPO). log rho_t is clamped to
  +-LOG_RATIO_CLAMP before exp so that rho_t stays finite (zero gradient beyond it).
  Returns (objective_NxT, ratio_NxT), float32.
  """
  chex.assert_rank([logps_NxT, adv_N], [2, 1])
  chex.assert_equal_shape([logps_NxT, old_logps_NxT])
  chex.assert_shape(adv_N, logps_NxT.shape[:1])
  _check_number("eps_low", eps_low, low=0)
  _check_number("eps_high", eps_high, low=0)
  _check_number("dual_clip", dual_clip, low=1, strict=True, allow_none=True)
  log_ratio_NxT = logps_NxT.astype(jnp.float32) - old_logps_NxT.astype(jnp.float32)
  ratio_NxT = jnp.exp(jnp.clip(log_ratio_NxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
  a_Nx1 = adv_N.astype(jnp.float32)[:, None]
  clipped_NxT = jnp.clip(ratio_NxT, 1.0 - eps_low, 1.0 + eps_high)
  objective_NxT = jnp.minimum(ratio_NxT * a_Nx1, clipped_NxT * a_Nx1)
  if dual_clip is not None:
    objective_NxT = jnp.where(a_Nx1 < 0, jnp.maximum(objective_NxT, dual_clip * a_Nx1),
                              objective_NxT)
  return objective_NxT, ratio_NxT


def kl_penalty(logps_NxT: jax.Array, ref_logps_NxT: jax.Array,
               estimator: str = "k3") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

  With log r = ref_logp - logp:  k1 = -log r,  k2 = (log r)^2 / 2,  k3 = r - 1 - log r.
  k1 is unbiased but can be negative; k3 is unbiased and >= 0; k2 is biased, >= 0.
  """
  _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
  chex.assert_rank(logps_NxT, 2)
  chex.assert_equal_shape([logps_NxT, ref_logps_NxT])
  log_r_NxT = ref_logps_NxT.astype(jnp.float32) - logps_NxT.astype(jnp.float32)
  if estimator == "k1":
    return -log_r_NxT
  if estimator == "k2":
    return 0.5 * jnp.square(log_r_NxT)
  return jnp.expm1(log_r_NxT) - log_r_NxT


def truncated_is_weights(old_logps_NxT: jax.Array, sampler_logps_NxT: jax.Array,
                         cap: Scalar = 2.0) -> jax.Array:
  """Truncated importance weights min(pi_old_trainer / pi_sampler, C), stop-gradient.

  They correct for the mismatch between the sampler's log-probs and the trainer's
  recomputation of the same (old) policy; multiply the per-token loss by them.
  """
  chex.assert_rank(old_logps_NxT, 2)
  chex.assert_equal_shape([old_logps_NxT, sampler_logps_NxT])
  _check_number("is_cap", cap, low=0, strict=True)
  log_w_NxT = old_logps_NxT.astype(jnp.float32) - sampler_logps_NxT.astype(jnp.float32)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w_NxT), cap))


def _clip_metrics(ratio_NxT, adv_N, mask_NxT, num_tokens, eps_low, eps_high, dual_clip):
  """Fractions of valid tokens where each clip is active (its gradient is zero)."""
  a_Nx1 = adv_N[:, None]
  low_NxT = (a_Nx1 < 0) & (ratio_NxT < 1.0 - eps_low)
  high_NxT = (a_Nx1 > 0) & (ratio_NxT > 1.0 + eps_high)
  mean = functools.partial(aggregate, mask_NxT=mask_NxT, num_tokens=num_tokens)
  out = {"clipfrac_low": mean(low_NxT), "clipfrac_high": mean(high_NxT)}
  if dual_clip is not None:
    out["clipfrac_dual"] = mean((a_Nx1 < 0) & (ratio_NxT > dual_clip))
  return out


@registry.policy_losses.register("ppo_clip")
def policy_loss(logps_NxT: jax.Array, old_logps_NxT: jax.Array, adv_N: jax.Array,
                mask_NxT: jax.Array, *, eps_low: Scalar = 0.2, eps_high: Scalar = 0.2,
                dual_clip: Scalar | None = None, agg: str = "token-mean",
                num_tokens: Scalar | None = None, num_seqs: Scalar | None = None,
                max_len: Scalar | None = None, ref_logps_NxT: jax.Array | None = None,
                kl_coef: Scalar = 0.0, kl_estimator: str = "k3",
                is_weights_NxT: jax.Array | None = None,
                entropy_NxT: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped policy-gradient loss (the negative of Eq. 12's objective) and metrics.

  Args:
    logps_NxT: log-probs of the sampled tokens under the current policy (differentiated).
    old_logps_NxT: the same under the policy that sampled them (constant).
    adv_N: one advantage per response (constant), broadcast over its tokens.
    mask_NxT: valid response tokens (DAPO's overlong filter removes truncated
      responses from it: `IterationSettings.mask_truncated`).
    eps_low, eps_high: ratio clip range [1 - eps_low, 1 + eps_high].
    dual_clip: c > 1 enables dual clip for negative advantages; None disables it.
    agg, num_tokens, num_seqs, max_len: see `aggregate`; pass global counts when the
      batch is split (micro-batches, devices) and sum the returned losses.
    ref_logps_NxT: reference-policy log-probs, for the KL term and the "kl_ref" metric.
    kl_coef: weight of the KL term (same aggregation as the policy term).
    kl_estimator: "k1", "k2" or "k3".
    is_weights_NxT: optional truncated importance-sampling weights
      (`truncated_is_weights`), multiplying the per-token policy loss.
    entropy_NxT: optional per-token entropy, only for the "entropy" metric.

  Returns:
    (loss, aux): float32 scalar loss and a dict of float32 scalars: pg_loss,
    clipfrac_low, clipfrac_high (+ clipfrac_dual), ratio_mean, kl_old_new_k3, and kl_ref,
    kl_loss, is_weight_mean, entropy when their inputs are given. kl_old_new_k3 is
    KL(pi_old || pi_new), the policy's drift, estimated on the tokens pi_old sampled
    (`kl_penalty(p, q)` estimates KL(p || q) from tokens of p; here p = pi_old): k3 =
    rho - 1 - log rho with rho = pi_new / pi_old. It was logged as "approx_kl" in the
    opposite direction, KL(pi_new || pi_old), which those tokens do not sample.
    Token metrics are sums over valid tokens divided by num_tokens (default: this
    batch's count), so with the global count they too add up across parts of a batch.
    Padded tokens get a log-ratio of 0 before exp and valid ones a clamped one (module
    doc, "Overflow"): any value at padding, inf included, leaves loss and gradient finite.
  """
  _check_token_arrays(mask_NxT, logps_NxT, old_logps_NxT)
  chex.assert_shape(adv_N, mask_NxT.shape[:1])
  _check_number("kl_coef", kl_coef, low=0)
  _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
  if ref_logps_NxT is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
    raise ValueError("kl_coef is non-zero but ref_logps_NxT is None: pass the reference "
                     "policy's log-probs or set kl_coef=0")
  # Masked before exp (module doc, "Overflow"): padding holds 0 - 0, whatever it held.
  valid_NxT = _as_weights(mask_NxT) > 0
  logps_NxT = jnp.where(valid_NxT, logps_NxT.astype(jnp.float32), 0.0)
  old_logps_NxT = jnp.where(valid_NxT, jax.lax.stop_gradient(old_logps_NxT).astype(jnp.float32),
                            0.0)
  if ref_logps_NxT is not None:
    ref_logps_NxT = jnp.where(valid_NxT, ref_logps_NxT.astype(jnp.float32), 0.0)
  adv_N = jax.lax.stop_gradient(adv_N.astype(jnp.float32))
  agg_fn = functools.partial(aggregate, mask_NxT=mask_NxT, agg=agg, num_tokens=num_tokens,
                             num_seqs=num_seqs, max_len=max_len)
  token_mean = functools.partial(aggregate, mask_NxT=mask_NxT, num_tokens=num_tokens)

  objective_NxT, ratio_NxT = clipped_surrogate(
      logps_NxT, old_logps_NxT, adv_N, eps_low=eps_low, eps_high=eps_high,
      dual_clip=dual_clip)
  pg_NxT = -objective_NxT
  aux = {}
  if is_weights_NxT is not None:
    chex.assert_shape(is_weights_NxT, mask_NxT.shape)
    is_weights_NxT = jax.lax.stop_gradient(is_weights_NxT.astype(jnp.float32))
    pg_NxT = pg_NxT * is_weights_NxT
    aux["is_weight_mean"] = token_mean(is_weights_NxT)
  loss = aux["pg_loss"] = agg_fn(pg_NxT)
  if ref_logps_NxT is not None:
    kl_ref = aux["kl_ref"] = agg_fn(
        kl_penalty(logps_NxT, jax.lax.stop_gradient(ref_logps_NxT), kl_estimator))
    aux["kl_loss"] = kl_coef * kl_ref
    loss = loss + aux["kl_loss"]
  ratio_sg_NxT = jax.lax.stop_gradient(ratio_NxT)
  aux.update(_clip_metrics(ratio_sg_NxT, adv_N, mask_NxT, num_tokens, eps_low, eps_high,
                           dual_clip))
  aux["ratio_mean"] = token_mean(ratio_sg_NxT)
  # From the clamped ratio: exp of an unclamped log-ratio could overflow here too.
  log_ratio_NxT = jnp.clip(jax.lax.stop_gradient(logps_NxT) - old_logps_NxT,
                           -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  aux["kl_old_new_k3"] = token_mean(kl_penalty(jnp.zeros_like(log_ratio_NxT), log_ratio_NxT,
                                               "k3"))
  if entropy_NxT is not None:
    chex.assert_shape(entropy_NxT, mask_NxT.shape)
    aux["entropy"] = token_mean(jax.lax.stop_gradient(entropy_NxT))
  return loss, aux


def overlong_penalty(lengths_N: jax.Array, *, max_len: Scalar | jax.Array,
                     cache_len: Scalar) -> jax.Array:
  """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), a reward to add.

  With L_i = max_len (response i's maximum length) and C_i = min(cache_len, L_i):

    R_length(y_i) = 0                                if |y_i| <= L_i - C_i
                  = ((L_i - C_i) - |y_i|) / C_i      if L_i - C_i < |y_i| <= L_i
                  = -1                               if L_i < |y_i|

  max_len: a scalar (every response's L_max: the batch's max_new_tokens T) or [N], each
  response's own cap (per-record caps, `task.max_new_tokens_field`), so that a response
  capped at 600 tokens is measured against 600, not T. A scalar buffer wider than the
  scalar max_len is refused (a config error); a cap narrower than the buffer shrinks the
  buffer to the cap (C_i = L_i: the punishment then grows from length 0 to -1 at the cap).
  Returns float32 [N].
  """
  chex.assert_rank(lengths_N, 1)
  _check_number("max_len", max_len, low=0, strict=True)
  _check_number("cache_len", cache_len, low=0, strict=True)
  if (isinstance(max_len, (int, float)) and isinstance(cache_len, (int, float))
      and cache_len > max_len):
    raise ValueError(f"cache_len={cache_len} exceeds max_len={max_len}; the buffer must "
                     "fit inside the maximum length")
  if jnp.ndim(max_len):
    chex.assert_equal_shape([lengths_N, max_len])
  max_len = jnp.asarray(max_len, jnp.float32)
  cache = jnp.minimum(jnp.asarray(cache_len, jnp.float32), max_len)
  excess_N = lengths_N.astype(jnp.float32) - (max_len - cache)
  return jnp.clip(-excess_N / cache, -1.0, 0.0)


def dynamic_sampling_filter(correct_BxG: jax.Array, valid_BxG: jax.Array) -> jax.Array:
  """DAPO dynamic sampling: keeps groups with 0 < #correct < #valid responses.

  Counts only valid responses. Returns the new valid_BxG (bool), all False in dropped
  groups (all correct, all wrong, or fewer than two valid responses); a group is kept
  where `.any(axis=-1)`.
  """
  chex.assert_rank(correct_BxG, 2)
  chex.assert_equal_shape([correct_BxG, valid_BxG])
  valid_BxG = valid_BxG.astype(bool)
  num_correct_B = jnp.sum(correct_BxG.astype(bool) & valid_BxG, axis=-1)
  keep_B = (num_correct_B > 0) & (num_correct_B < jnp.sum(valid_BxG, axis=-1))
  return valid_BxG & keep_B[:, None]


@functools.partial(jax.jit, static_argnames=("k",))
def select_groups(keep_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the first k kept groups, for fixed-size batches after filtering.

  Returns (idx_K int32, found_K bool): found_K is False where fewer than k groups were
  kept; those slots point at group 0 and must be masked out (or topped up by another
  round of sampling). Gather with `jax.tree.map(lambda x: x[idx_K], batch)`.
  """
  chex.assert_rank(keep_B, 1)
  if not isinstance(k, int) or k <= 0:
    raise ValueError(f"k must be a positive int, got {k!r}")
  keep_B = keep_B.astype(bool)
  (idx_K,) = jnp.nonzero(keep_B, size=k, fill_value=0)
  found_K = jnp.arange(k) < jnp.sum(keep_B)
  return idx_K.astype(jnp.int32), found_K
