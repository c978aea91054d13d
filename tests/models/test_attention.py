"""Attention implementations against the reference (`_attend`, the textbook dense
softmax), values and gradients: blockwise on random shapes, padding, grouped-query heads
and the shared-prompt layout; the sequence-length path of "cudnn" through
jax.nn.dot_product_attention's XLA implementation; splash in the Pallas interpreter; the
start-up check; remat policies.

Rows with no valid key (left-pad queries) hold garbage that differs between
implementations (reference: the uniform average; blockwise: 0); they are compared for
finiteness only, and the gradient checks weight them 0, as a masked loss does.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egpo_jax.models import attention
from egpo_jax.models import transformer as tr
from egpo_jax.models.config import ModelConfig

# (B, T, S, H, G, head_dim, block): causal (S = T) and shared-prompt (S > T) layouts,
# one kv head per query head, grouped heads, multi-query; T and S not multiples of the
# block; one block covering everything.
SHAPES = [(2, 7, 7, 4, 2, 8, 3), (3, 5, 11, 4, 2, 8, 4), (2, 16, 16, 6, 2, 16, 16),
          (2, 9, 9, 4, 4, 8, 2), (1, 12, 20, 6, 1, 8, 5)]


def _inputs(shape, seed, pads, dtype=jnp.float32):
  b, t, s, h, g, hd, _ = shape
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, hd), dtype)
  k = jax.random.normal(ks[1], (b, s, g, hd), dtype)
  v = jax.random.normal(ks[2], (b, s, g, hd), dtype)
  mask = jnp.arange(s)[None] >= jnp.asarray(pads)[:, None]
  valid_BxT = attention.causal_allowed(mask, t).any(-1)   # the query row sees some key
  w = jax.random.normal(ks[3], (b, t, h, hd)) * valid_BxT[..., None, None]
  return q, k, v, mask, w, valid_BxT


def _reference(q, k, v, mask):
  return attention._attend(q, k, v, attention.causal_allowed(mask, q.shape[1]))


def _value_and_grads(fn, q, k, v, mask, w):
  return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w), (0, 1, 2))(q, k, v)


def _outputs(fn, q, k, v, mask, w):
  return (fn(q, k, v, mask), _reference(q, k, v, mask), _value_and_grads(fn, q, k, v, mask, w),
          _value_and_grads(_reference, q, k, v, mask, w))


@functools.partial(jax.jit, static_argnums=0)
def _blockwise_outputs(block, q, k, v, mask, w):
  """`_outputs` of blockwise in one compile per shape and block (pads are data)."""
  return _outputs(functools.partial(attention.attend_blockwise, block=block), q, k, v, mask, w)


def _assert_matches_reference(fn, q, k, v, mask, w, valid_BxT, tol=2e-5, outputs=None):
  out, ref, got, want = outputs or _outputs(fn, q, k, v, mask, w)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(jnp.where(valid_BxT[..., None, None], out, 0),
                             jnp.where(valid_BxT[..., None, None], ref, 0), atol=tol, rtol=tol)
  chex.assert_trees_all_close(got, want, atol=tol, rtol=tol)


@settings(max_examples=15, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
       pad_fracs=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_blockwise_equals_reference(shape, seed, pad_fracs):
  b, s, block = shape[0], shape[2], shape[6]
  # Left pads per row, from none to the whole row (a row with no valid key at all).
  pads = [int(round(f * s)) for f in pad_fracs[:b]]
  q, k, v, mask, w, valid = _inputs(shape, seed, pads)
  _assert_matches_reference(None, q, k, v, mask, w, valid,
                            outputs=_blockwise_outputs(block, q, k, v, mask, w))


class BlockwiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_gradients_and_rows_without_keys(self):
    shape = SHAPES[1]
    q, k, v, mask, w, valid = _inputs(shape, 0, [0, 4, 11])   # row 2: only pads
    fn = self.variant(functools.partial(attention.attend_blockwise, block=4))
    _assert_matches_reference(fn, q, k, v, mask, w, valid)
    out = fn(q, k, v, mask)
    # A query row that sees no valid key gives 0, and passes no gradient.
    np.testing.assert_array_equal(out[2], 0.0)
    dq = jax.grad(lambda q: jnp.sum(fn(q, k, v, mask)))(q)
    np.testing.assert_array_equal(dq[2], 0.0)

  def test_saves_no_score_sized_array(self):
    # The point: residuals are q, k, v, mask, the output and a per-row log-sum-exp, none
    # of them [T, S]-sized; the forward's largest temporary is one block of scores.
    b, t, h, g, hd = 1, 64, 4, 2, 8
    q = jnp.ones((b, t, h, hd))
    k = v = jnp.ones((b, t, g, hd))
    mask = jnp.ones((b, t), bool)
    _, res = jax.jit(attention._attend_blockwise_fwd, static_argnums=4)(q, k, v, mask, 16)
    sizes = sorted(x.size for x in jax.tree.leaves(res))
    assert sizes == sorted([q.size, k.size, v.size, mask.size, q.size, b * t * h])

  def test_bfloat16_close_to_float32_reference(self):
    shape = SHAPES[2]
    q, k, v, mask, _, valid = _inputs(shape, 1, [0, 5])
    out = attention.attend_blockwise(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 4)
    assert out.dtype == jnp.bfloat16
    ref = _reference(q, k, v, mask)
    err = jnp.where(valid[..., None, None], jnp.abs(out.astype(jnp.float32) - ref), 0)
    assert float(err.max()) < 5e-2


def test_blockwise_visits_only_the_blocks_causality_leaves():
  # T = S = 8 in blocks of 2: query block i reads key blocks 0..i; key block j is read by
  # query blocks j..3. After a 4-slot prompt (S = 12, T = 8) query block i reads 0..i+2.
  _, _, nq, nk, kv_blocks, q_first = attention._block_plan(8, 8, 2)
  assert (nq, nk) == (4, 4)
  np.testing.assert_array_equal(kv_blocks, [1, 2, 3, 4])
  np.testing.assert_array_equal(q_first, [0, 1, 2, 3])
  _, _, nq, nk, kv_blocks, q_first = attention._block_plan(8, 12, 2)
  np.testing.assert_array_equal(kv_blocks, [3, 4, 5, 6])
  np.testing.assert_array_equal(q_first, [0, 0, 0, 1, 2, 3])


@pytest.mark.parametrize("pads,one_run", [([0, 3, 8], True), ([0, 0, 0], True),
                                          (None, False)])
def test_sequence_length_path_equals_reference(pads, one_run):
  # "cudnn"'s padding as sequence lengths, checked through the same call with the XLA
  # implementation: left-padded rows rotated to right padding and back; a mask with a
  # hole cannot be lengths and runs blockwise instead.
  shape = (3, 9, 9, 4, 2, 8, 4)
  q, k, v, mask, w, valid = _inputs(shape, 2, pads or [0, 2, 4])
  if not one_run:
    mask = mask.at[1, 5].set(False)      # a hole in row 1
    valid = attention.causal_allowed(mask, 9).any(-1)
    w = w * valid[..., None, None]
  fn = functools.partial(attention.attend_seq_lengths, implementation="xla")
  _assert_matches_reference(fn, q, k, v, mask, w, valid,
                            outputs=jax.jit(functools.partial(_outputs, fn))(q, k, v, mask, w))


def test_splash_in_interpret_mode_equals_reference():
  # A left-padded causal pass (T = 100: padded to 128) and the shared-prompt layout
  # (T = 50 queries after 80 prompt slots, S = 130: padded to 256), one jit.
  cases = [_inputs((2, 100, 100, 4, 2, 8, 0), 3, [0, 30]),
           _inputs((2, 50, 130, 4, 2, 8, 0), 4, [0, 70])]
  splash = functools.partial(attention.attend_splash, interpret=True)

  @jax.jit
  def both():
    return [(splash(q, k, v, m), _value_and_grads(splash, q, k, v, m, w),
             _value_and_grads(_reference, q, k, v, m, w)) for q, k, v, m, w, _ in cases]

  for (q, k, v, mask, _, valid), (out, got, want) in zip(cases, both()):
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(jnp.where(valid[..., None, None], out, 0),
                               jnp.where(valid[..., None, None], _reference(q, k, v, mask), 0),
                               atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_decoding_uses_the_single_query_path_under_every_cpu_implementation():
  b, s, h, g, hd = 2, 6, 4, 2, 8
  ks = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(ks[0], (b, h, hd))
  k_BxGxKxS = jax.random.normal(ks[1], (b, g, hd, s))
  v_BxGxSxK = jax.random.normal(ks[2], (b, g, s, hd))
  mask = jnp.arange(s)[None] >= jnp.array([0, 2])[:, None]
  outs = [attention.attend(q, k_BxGxKxS, v_BxGxSxK, mask, implementation=name)
          for name in ("reference", "blockwise")]
  want = attention._attend_one(q, k_BxGxKxS, v_BxGxSxK, mask)
  for out in outs:
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name,needs", [("cudnn", "a GPU"), ("splash", "a TPU")])
def test_unrunnable_implementation_fails_in_one_line(name, needs):
  config = tr.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                          num_heads=4, num_kv_heads=2, attention=name)
  params = tr.init_params(config.replace(attention="blockwise"), jax.random.key(0))
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError) as err:
    tr.forward(params, ids, jnp.ones((1, 4), bool), config=config)
  msg = str(err.value)
  assert "\n" not in msg and f"ModelConfig.attention={name!r} needs {needs}" in msg
  assert "use one of ('reference', 'blockwise')" in msg
  # cuDNN also refuses float32 compute on a GPU, and a too-wide head.
  with pytest.raises(ValueError, match="bfloat16/float16"):
    attention.check_implementation("cudnn", dtype=jnp.float32, head_dim=64, backend="gpu")
  with pytest.raises(ValueError, match="head_dim 256"):
    attention.check_implementation("cudnn", dtype=jnp.bfloat16, head_dim=256, backend="gpu")
  attention.check_implementation("cudnn", dtype=jnp.bfloat16, head_dim=128, backend="gpu")
  attention.check_implementation("splash", dtype=jnp.bfloat16, head_dim=128, backend="tpu")


def test_config_names_fields_and_maps_the_deprecated_remat_bool():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
              num_heads=4, num_kv_heads=2)
  assert ModelConfig(**base, remat=True).remat == "full"
  assert ModelConfig(**base, remat=False).remat == "none"
  assert ModelConfig(**base).attention == "blockwise"
  with pytest.raises(ValueError, match=r"ModelConfig.attention='flash' .*'blockwise'"):
    ModelConfig(**base, attention="flash")
  with pytest.raises(ValueError, match=r"ModelConfig.remat='some' .*'dots_saveable'"):
    ModelConfig(**base, remat="some")


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_no_batch_saveable"])
def test_remat_policies_give_the_gradients_of_no_remat(policy):
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2)
  params = tr.init_params(config, jax.random.key(6))
  ids = jax.random.randint(jax.random.key(7), (2, 10), 0, 64)
  mask = jnp.arange(10)[None] >= jnp.array([0, 3])[:, None]

  def loss(p, config):
    return jnp.sum(jnp.where(mask[..., None], tr.forward(p, ids, mask, config=config), 0) ** 2)

  remat = config.replace(remat=policy)
  assert "remat" in str(jax.make_jaxpr(functools.partial(loss, config=remat))(params))
  got, want = jax.jit(lambda p: (jax.grad(loss)(p, remat), jax.grad(loss)(p, config)))(params)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)
