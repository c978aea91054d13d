"""The optax chain from the config, and an update that skips non-finite steps."""

from __future__ import annotations

from typing import Any

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


def make_optimizer(*, lr: float, schedule: str = "constant", warmup_steps: int = 0,
                   total_steps: int = 1, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, grad_clip: float = 1.0) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with a (warm-up +) constant or cosine schedule."""
  sched = learning_rate_schedule(lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                                 total_steps=total_steps)
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.inject_hyperparams(optax.adamw)(learning_rate=sched, b1=b1, b2=b2,
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
