"""The training attention: heads-first layout and the recomputing custom VJP.

The reference is the textbook formulation (scores in [B, G, R, T, S] layout, plain
autodiff), so the layout change and the custom backward are checked against maths that
does not share their code, including at left-pad query rows that see no valid key.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.models import attention
from egpo_jax.models import transformer as tr
from egpo_jax.models.config import ModelConfig

B, T, H, G, K = 3, 7, 4, 2, 8


def _reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, allowed_BxTxS):
  b, t, h, hd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, hd)
  scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK) / math.sqrt(hd)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK).reshape(b, t, h, hd)


def _inputs(seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, G, K))
  v = jax.random.normal(ks[2], (B, T, G, K))
  w = jax.random.normal(ks[3], (B, T, H, K))
  # Row 0 unpadded, row 1 left-padded by 3, row 2 by T - 1 (one real token).
  mask = jnp.arange(T)[None] >= jnp.array([0, 3, T - 1])[:, None]
  return q, k, v, w, mask


def _allowed(mask):
  return jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]


class AttentionBackwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_and_gradients_match_where_reference(self):
    q, k, v, w, mask = _inputs(0)
    allowed = _allowed(mask)

    @self.variant
    def both(q, k, v):
      mine = lambda q, k, v: jnp.sum(attention._attend_recompute(q, k, v, mask) * w)
      ref = lambda q, k, v: jnp.sum(_reference(q, k, v, allowed) * w)
      return (jax.value_and_grad(mine, (0, 1, 2))(q, k, v),
              jax.value_and_grad(ref, (0, 1, 2))(q, k, v))

    (val, grads), (ref_val, ref_grads) = both(q, k, v)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)

  def test_fully_masked_query_rows_give_the_uniform_average(self):
    # Row 2's first T - 1 query positions are pads: no allowed key, so the softmax is
    # uniform over all keys instead of NaN.
    q, k, v, _, mask = _inputs(1)
    out = attention._attend(q, k, v, _allowed(mask))
    assert bool(jnp.isfinite(out).all())
    mean_v = jnp.repeat(v[2].mean(0), H // G, axis=0)
    np.testing.assert_allclose(out[2, 0], mean_v, atol=1e-5)

  def test_backward_keeps_only_the_inputs(self):
    # The point of the custom VJP: no float32 [B, heads, T, S] scores or probabilities
    # are saved between the forward and backward passes, only q, k, v and the [B, S]
    # key mask.
    q, k, v, _, mask = _inputs(2)
    _, residuals = jax.jit(attention._attend_recompute_fwd)(q, k, v, mask)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(residuals)] == [
        (x.shape, x.dtype) for x in (q, k, v, mask)]


def test_forward_gradient_matches_reference_attention(monkeypatch):
  # The whole decoder (flattened projections, scanned layers, custom-VJP attention)
  # against the same decoder with the reference attention and plain autodiff. (Under
  # remat=True the layer is the same; test_model_core checks remat's gradients.)
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=H, num_kv_heads=G)
  params = tr.init_params(config, jax.random.key(3))
  ids = jax.random.randint(jax.random.key(4), (B, T), 0, 64)
  mask = jnp.arange(T)[None] >= jnp.array([0, 2, 5])[:, None]

  def loss(p):
    logits = tr.forward(p, ids, mask, config=config)
    return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2)

  mine = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(attention, "_attend_recompute", lambda q, k, v, kv_mask: _reference(
      q, k, v, attention.causal_allowed(kv_mask, q.shape[1])))
  ref = jax.jit(jax.value_and_grad(loss))(params)
  chex.assert_trees_all_close(mine, ref, atol=2e-5, rtol=2e-5)


def test_response_hidden_runs_each_prompt_once_and_equals_forward():
  # G completions per left-padded prompt: the prefill + "extend" path against the full
  # forward over each row's prompt + completion, values and parameter gradients.
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=H, num_kv_heads=G)
  params = tr.init_params(config, jax.random.key(0))
  b, g, p, t = 3, 4, 6, 5
  prompts = jax.random.randint(jax.random.key(1), (b, p), 1, 64)
  prompt_mask = jnp.arange(p)[None] >= jnp.array([0, 2, 5])[:, None]
  ids = jax.random.randint(jax.random.key(2), (b * g, t), 1, 64)
  mask = jnp.arange(t)[None] < jax.random.randint(jax.random.key(3), (b * g, 1), 1, t + 1)
  w = jax.random.normal(jax.random.key(4), (b * g, t, config.hidden_size)) * mask[..., None]

  def full(params):
    whole = jnp.concatenate([jnp.repeat(prompts, g, 0), ids], 1)
    whole_mask = jnp.concatenate([jnp.repeat(prompt_mask, g, 0), mask], 1)
    return tr.forward(params, whole, whole_mask, config=config,
                      return_hidden=True)[:, p - 1:p - 1 + t]

  def shared(params):
    return tr.response_hidden(params, prompts, prompt_mask, ids, mask, config=config)

  @jax.jit
  def values_and_grads(params):
    return [jax.value_and_grad(lambda q, f=f: jnp.sum(f(q) * w))(params)
            for f in (full, shared)] + [(full(params), shared(params))]

  (_, g_full), (_, g_shared), (h_full, h_shared) = values_and_grads(params)
  np.testing.assert_allclose(h_shared, h_full, atol=2e-6, rtol=0)
  chex.assert_trees_all_close(g_shared, g_full, atol=1e-4, rtol=1e-5)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_full))
  with np.testing.assert_raises_regex(ValueError, "not G per each of 3 prompts"):
    tr.response_hidden(params, prompts, prompt_mask, ids[:-1], mask[:-1], config=config)
