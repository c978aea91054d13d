"""Supervised warm-up: next-token cross-entropy on worked solutions, so a tiny model
starts RL with non-trivial accuracy (RL needs mixed groups to learn from)."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from egpo_jax.core import logprobs as logprobs_lib
from egpo_jax.models import transformer
from egpo_jax.models.config import ModelConfig
from egpo_jax.training.optimizer import apply_gradients
from egpo_jax.types import TrainState


def sft_loss(params, tokens_BxL: jax.Array, attn_mask_BxL: jax.Array, loss_mask_BxL: jax.Array,
             *, model_config: ModelConfig, chunk_size: int = 1024) -> jax.Array:
  """Mean negative log-likelihood of the tokens where loss_mask is set (targets shifted)."""
  chex.assert_equal_shape([tokens_BxL, attn_mask_BxL, loss_mask_BxL])
  hidden = transformer.forward(params, tokens_BxL, attn_mask_BxL.astype(bool),
                               config=model_config, return_hidden=True)
  logps = logprobs_lib.token_logprobs(hidden[:, :-1], transformer.output_embedding(
      params, model_config), tokens_BxL[:, 1:], chunk_size=chunk_size)
  m = loss_mask_BxL[:, 1:].astype(jnp.float32)
  return -(logps * m).sum() / jnp.maximum(m.sum(), 1.0)


def run_warmup(state: TrainState, keys_S: jax.Array, *,
               batch_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
               optimizer: optax.GradientTransformation, model_config: ModelConfig
               ) -> tuple[TrainState, jax.Array]:
  """One supervised step per key of `keys_S` (S steps) as one `lax.scan`; returns the
  state and the S losses. Running the keys of `jax.random.split(rng, n)` in consecutive
  slices is the same computation as one call on all of them (the trainer does that to
  stop between slices).

  batch_fn(rng) -> (tokens_BxL, attn_mask_BxL, loss_mask_BxL) must be jnp (it runs in jit).
  """
  chex.assert_rank(keys_S, 2)
  grad_fn = jax.value_and_grad(sft_loss)

  def step(state, key):
    tokens, attn, loss_mask = batch_fn(key)
    loss, grads = grad_fn(state.params, tokens, attn, loss_mask, model_config=model_config)
    state, _ = apply_gradients(state, grads, loss, optimizer)
    return state, loss

  return jax.lax.scan(step, state, keys_S)
