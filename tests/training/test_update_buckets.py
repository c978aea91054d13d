"""The length-bucketed update (`update.bucketed_update`) against the padded `update`:
same loss, gradients and parameters (float rounding only), fewer computed slots, and a
compilation count fixed by the buckets, not by the length histogram."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egpo_jax.models import transformer
from egpo_jax.models.config import get_config
from egpo_jax.training import update
from egpo_jax.types import RolloutBatch, TrainState

CFG = get_config("tiny")
# SGD maps gradients linearly to parameters: gradient differences show undimmed.
SGD = optax.sgd(0.5)
T = 32


def _batch(lengths, p=6, seed=0):
  n = len(lengths)
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  mask = jnp.arange(T)[None] < jnp.asarray(lengths)[:, None]
  pads = jax.random.randint(k[4], (n,), 0, 3)
  pmask = jnp.arange(p)[None] >= pads[:, None]
  return RolloutBatch(
      prompt_ids_NxP=jnp.where(pmask, jax.random.randint(k[1], (n, p), 3, 300), 0),
      prompt_mask_NxP=pmask,
      completion_ids_NxT=jnp.where(mask, jax.random.randint(k[2], (n, T), 3, 300), 0),
      completion_mask_NxT=mask,
      old_logps_NxT=-jax.random.uniform(k[3], (n, T), minval=4.0, maxval=8.0) * mask,
      adv_N=jax.random.normal(k[0], (n,)),
      ref_logps_NxT=jnp.zeros((n, T)), is_weights_NxT=jnp.ones((n, T)))


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.PRNGKey(0))


def test_length_buckets_hand_computed():
  assert update.length_buckets(512, 8) == (64, 128, 192, 256, 320, 384, 448, 512)
  assert update.length_buckets(10, 4) == (3, 5, 8, 10)
  assert update.length_buckets(3, 8) == (1, 2, 3)
  with pytest.raises(ValueError, match="update.length_buckets"):
    update.length_buckets(512, 0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_bucketed_equals_padded_update(params, aggregation):
  """Two minibatches x two micro-batches, two epochs: the bucketed run sees the same rows
  in the same micro-batches as the padded one; params after each of two updates agree."""
  lengths = [3, 30, 5, 7, 2, 9, 12, 4, 1, 6, 8, 2, 5, 3, 10, 4]
  batch = _batch(lengths)
  settings = update.UpdateSettings(minibatches=2, micro_batches=2, ppo_epochs=2,
                                    aggregation=aggregation, share_prompts=False)
  state = TrainState.create(params, SGD.init(params))
  padded = jax.jit(functools.partial(update.update, optimizer=SGD, model_config=CFG,
                                     settings=settings))
  s_pad, m_pad = padded(state, batch, jax.random.PRNGKey(3))
  s_b, m_b = update.bucketed_update(state, batch, jax.random.PRNGKey(3), optimizer=SGD,
                                    model_config=CFG, settings=settings,
                                    length_buckets_count=4)
  for key in ("loss", "pg_loss", "ratio_mean", "grad_norm"):
    np.testing.assert_allclose(m_b[key], m_pad[key], rtol=1e-5, atol=1e-6, err_msg=key)
  chex.assert_trees_all_close(s_b.params, s_pad.params, atol=1e-5, rtol=1e-4)
  # The second update (ratios away from 1, clipping active) starts from the padded run's
  # params on both sides: started from each its own, the first update's rounding (~1e-6)
  # came back amplified to ~1e-3 under XLA:CPU's LLVM -O0 (a discontinuity, such as a
  # token's ratio crossing the clip), which says nothing of bucketing.
  s_b, _ = update.bucketed_update(s_pad, batch, jax.random.PRNGKey(4), optimizer=SGD,
                                  model_config=CFG, settings=settings,
                                  length_buckets_count=4)
  s_pad, _ = padded(s_pad, batch, jax.random.PRNGKey(4))
  chex.assert_trees_all_close(s_b.params, s_pad.params, atol=5e-5, rtol=1e-4)
  assert not np.allclose(jax.tree.leaves(s_b.params)[0], jax.tree.leaves(params)[0])
  # Only one response is long: most micro-batches were cut well below T.
  assert m_b["padding_fraction"] < m_pad["padding_fraction"] - 0.2


def test_gradients_equal_one_micro_batch(params):
  """The accumulated (loss, grads) of the trimmed micro-batches equal those of the padded
  rows, on a single minibatch (SGD step = -lr * grad, so params carry the gradient)."""
  lengths = [1, 2, 3, 4, 17, 5, 6, 7]
  batch = _batch(lengths, seed=5)
  settings = update.UpdateSettings(micro_batches=4, share_prompts=False)
  state = TrainState.create(params, SGD.init(params))
  s_pad, _ = update.update(state, batch, jax.random.PRNGKey(0), optimizer=SGD,
                           model_config=CFG, settings=settings)
  s_b, m_b = update.bucketed_update(state, batch, jax.random.PRNGKey(0), optimizer=SGD,
                                    model_config=CFG, settings=settings,
                                    length_buckets_count=8)
  grad = lambda s: jax.tree.map(lambda a, b: (a - b) / -0.5, s.params, params)
  chex.assert_trees_all_close(grad(s_b), grad(s_pad), atol=1e-6, rtol=1e-4)
  # Sorted longest first, 2 rows per micro-batch: buckets 20, 8, 4, 4 (of 4, 8, ..., 32).
  assert m_b["padding_fraction"] == pytest.approx(1 - sum(lengths) / (2 * (20 + 8 + 4 + 4)))


def test_compilations_fixed_by_buckets(params):
  """Three length histograms: the gradient is traced once per bucket shape met, never per
  histogram; a histogram of buckets already met compiles nothing new."""
  settings = update.UpdateSettings(micro_batches=2, share_prompts=False)
  state = TrainState.create(params, SGD.init(params))
  run = lambda lengths: update.bucketed_update(
      state, _batch(lengths), jax.random.PRNGKey(0), optimizer=SGD, model_config=CFG,
      settings=settings, length_buckets_count=2)
  grads = lambda: {k: v for k, v in update.bucket_compilation_counts().items()
                   if k.startswith("grad")}
  start = grads()
  run([30, 2, 3, 4])            # buckets 32 and 16
  before = grads()
  run([1, 25, 9, 2])            # the same two buckets, another histogram
  run([31, 20, 17, 30])         # only the 32 bucket
  assert grads() == before
  # Prompts of <= 6 tokens keep their 6 columns (below the 16-token bucket).
  new = {k for k in before if before[k] != start.get(k, 0)}
  assert new <= {"grad[R=2,P=6,T=16]", "grad[R=2,P=6,T=32]"}
  assert {"grad[R=2,P=6,T=16]", "grad[R=2,P=6,T=32]"} <= set(before)
