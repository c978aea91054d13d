"""The SFT warm-up (config section `warmup`): supervised next-token cross-entropy on the
synthetic task's worked solutions before RL, so a tiny model starts RL with non-trivial
accuracy (RL needs mixed groups to learn from).

Not to be confused with the learning-rate warm-up of the RL optimizer
(`optim.warmup_steps`) nor with compiling before timing (a benchmark's "compile" run).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from egpo_jax.core import logprobs as logprobs_lib
from egpo_jax.models import transformer
from egpo_jax.data import synthetic
from egpo_jax.models.config import ModelConfig
from egpo_jax.training import preemption
from egpo_jax.training.optimizer import apply_gradients, make_optimizer
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


SFT_STEPS_PER_CALL = 50   # SFT warm-up steps per jitted call; signals are honoured between


def sft_warm_up(state: TrainState, rng: jax.Array, exp, c: ml_collections.ConfigDict, *,
                steps_per_call: int = SFT_STEPS_PER_CALL) -> tuple[TrainState, dict[str, Any]]:
  """The SFT warm-up of config `c.warmup` on the synthetic task; returns the state (its
  optimizer state is the warm-up's own: the caller starts RL with a fresh one) and
  {"steps", "first_loss", "final_loss", "seconds"}.

  `exp` is the job's `experiment.Experiment` (its model config). Runs as jitted chunks of
  `steps_per_call` steps (bitwise the same as one scan); a SIGTERM or SIGINT stops it at
  the next chunk boundary (`preemption.raise_in_warmup`: nothing saved, the next run
  redoes the warm-up exactly).
  """
  total = int(c.warmup.steps)
  opt = make_optimizer(lr=c.warmup.lr, schedule="cosine", warmup_steps=min(50, total),
                       total_steps=total, grad_clip=1.0)
  state = TrainState.create(state.params, opt.init(state.params))
  batch_fn = functools.partial(synthetic.sft_batch, batch_size=c.warmup.batch_size,
                               difficulty=c.task.difficulty, prompt_len=c.task.max_prompt_len,
                               response_len=c.rollout.max_new_tokens)
  run = jax.jit(functools.partial(run_warmup, batch_fn=batch_fn, optimizer=opt,
                                  model_config=exp.model_config))
  keys = jax.random.split(rng, total)
  t0 = time.perf_counter()
  losses = []
  for start in range(0, total, steps_per_call):
    done = min(start + steps_per_call, total)
    state, chunk = run(state, keys[start:done])
    losses.append(np.asarray(chunk))
    if done < total and preemption.stop_requested(done, warmup=True):
      preemption.raise_in_warmup(done, total)
  losses = np.concatenate(losses)
  return state, {"steps": total, "first_loss": float(losses[0]),
                 "final_loss": float(losses[-10:].mean()),
                 "seconds": time.perf_counter() - t0}
