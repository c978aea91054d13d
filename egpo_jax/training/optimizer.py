"""The optax chain from the config, and an update that skips non-finite steps.

Params are float32 master weights (the compute dtype is the model's `dtype`); the AdamW
moments may be stored in bfloat16 (`moment_dtype`), halving their memory. A bfloat16
moment cannot hold an exponential average with b2 = 0.999 by rounding to nearest:
0.999 x nu rounds back to nu (bfloat16 keeps 8 significant bits), so nu would stop
decaying. `scale_by_adam_lowp` therefore computes in float32 and stores each moment with
stochastic rounding (unbiased: E[stored] = the float32 value), from bits derived from
the step count, so the optimizer stays a deterministic function of its state.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from egpo_jax.types import TrainState

SCHEDULES = ("constant", "cosine")   # the learning-rate schedules after the linear warm-up


def learning_rate_schedule(*, lr: float, schedule: str, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  if schedule == "constant":
    main = optax.constant_schedule(lr)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps))
  else:
    raise ValueError(f"optim.schedule={schedule!r}: use one of {SCHEDULES}")
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main],
                              [warmup_steps])


MOMENT_DTYPES = ("float32", "bfloat16")   # storage of AdamW's first and second moments


class ScaleByAdamLowpState(NamedTuple):
  """Adam's step count and moments (stored in a narrow dtype; same layout as optax's)."""
  count: jax.Array
  mu: Any
  nu: Any


def _stochastic_round(x_f32: jax.Array, key: jax.Array, dtype) -> jax.Array:
  """float32 -> bfloat16, rounding up with probability (x - round_down(x)) / ulp: add
  16 random low bits to the float32 bit pattern, then truncate them."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  noise = jax.random.bits(key, x_f32.shape, jnp.uint32) >> 16
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x_f32), rounded, x_f32).astype(dtype)


def scale_by_adam_lowp(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       moment_dtype=jnp.bfloat16, seed: int = 0
                       ) -> optax.GradientTransformation:
  """optax.scale_by_adam (Kingma & Ba, bias-corrected) with both moments stored in
  `moment_dtype` by stochastic rounding (module docstring); arithmetic in float32."""
  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return ScaleByAdamLowpState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1 - b1) * g, updates,
                      state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g),
                      updates, state.nu)
    c = count.astype(jnp.float32)
    out = jax.tree.map(lambda m, v: (m / (1 - b1 ** c)) / (jnp.sqrt(v / (1 - b2 ** c)) + eps),
                       mu, nu)
    leaves, treedef = jax.tree.flatten(mu)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), count), 2 * len(leaves))
    store = lambda tree, ks: jax.tree.unflatten(treedef, [
        _stochastic_round(x, k, moment_dtype) for x, k in zip(jax.tree.leaves(tree), ks)])
    return out, ScaleByAdamLowpState(count, store(mu, keys[:len(leaves)]),
                                     store(nu, keys[len(leaves):]))

  return optax.GradientTransformation(init, update)


def adamw_lowp(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, *, moment_dtype=jnp.bfloat16
               ) -> optax.GradientTransformation:
  """optax.adamw (decoupled weight decay) with `scale_by_adam_lowp`'s narrow moments."""
  return optax.chain(scale_by_adam_lowp(b1, b2, eps, moment_dtype=moment_dtype),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


def make_optimizer(*, lr: float, schedule: str = "constant", warmup_steps: int = 0,
                   total_steps: int = 1, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, grad_clip: float = 1.0,
                   moment_dtype: str = "float32") -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with a (warm-up +) constant or cosine schedule.

  moment_dtype: "float32" (optax.adamw) or "bfloat16" (`adamw_lowp`: half the moments'
  memory; the params stay float32).
  """
  if moment_dtype not in MOMENT_DTYPES:
    raise ValueError(f"optim.moment_dtype={moment_dtype!r}: use one of {MOMENT_DTYPES}")
  sched = learning_rate_schedule(lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                                 total_steps=total_steps)
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if moment_dtype == "float32":
    adamw = optax.adamw
  else:
    adamw = functools.partial(adamw_lowp, moment_dtype=jnp.dtype(moment_dtype))
  parts.append(optax.inject_hyperparams(adamw)(learning_rate=sched, b1=b1, b2=b2,
                                                weight_decay=weight_decay))
  return optax.chain(*parts)


def current_lr(opt_state: Any) -> jax.Array:
  """The learning rate the injected AdamW used last (0 before the first step)."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.InjectHyperparamsState)):
    if isinstance(s, optax.InjectHyperparamsState):
      return jnp.asarray(s.hyperparams["learning_rate"], jnp.float32)
  return jnp.zeros((), jnp.float32)


def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimizer step, skipped (params and optimizer state unchanged) when the loss or
  any gradient is non-finite; the skip is counted in the state."""
  finite = jnp.logical_and(jnp.isfinite(loss), all_finite(grads))
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt = optimizer.update(safe_grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state), nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  return new_state, {"grad_norm": optax.tree.norm(safe_grads),
                     "skipped_nonfinite": (~finite).astype(jnp.float32),
                     "learning_rate": current_lr(new_opt)}
