"""Chunked per-token log-probs and entropies against the direct computation.

Tolerances: float32 inputs agree with the unchunked reference to atol 2e-5 (values) and
rtol 1e-4 / atol 1e-5 (gradients); both sum a few dozen float32 terms per output in a
different order. bfloat16 inputs compare against the float32 reference on the same
bfloat16-rounded values, with bfloat16-sized tolerances on the gradients.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core.logprobs import token_logprobs, token_logprobs_unchunked

N, T, D, V = 3, 7, 16, 50  # N*T = 21: not a multiple of the chunk sizes below.


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return dict(
      hidden=f32(rng.normal(size=(N, T, D))),
      emb=f32(0.5 * rng.normal(size=(V, D))),
      bias=f32(rng.normal(size=V)),
      targets=jnp.asarray(rng.integers(0, V, (N, T)), jnp.int32),
      w_logp=f32(rng.normal(size=(N, T))),
      w_ent=f32(rng.normal(size=(N, T))),
      # Masked positions: the last two tokens of row 0 and all of row 2 after t=3.
      mask=jnp.ones((N, T)).at[0, 5:].set(0).at[2, 3:].set(0),
  )


def _objective(fn, targets, w_logp, w_ent, mask, with_bias):
  """A masked scalar of log-probs and entropies, differentiable in all float inputs."""

  def f(hidden, emb, bias, temperature):
    logps, ent = fn(hidden, emb, targets, temperature=temperature, return_entropy=True,
                    bias_V=bias if with_bias else None)
    return jnp.sum(mask * (w_logp * logps + w_ent * ent))

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.fixture(scope="module")
def compiled(data):
  """Compiled objectives by (chunk_size or None for the reference, with_bias), shared."""
  cache = {}

  def get(chunk_size, with_bias):
    if (chunk_size, with_bias) not in cache:
      fn = (token_logprobs_unchunked if chunk_size is None else
            functools.partial(token_logprobs, chunk_size=chunk_size))
      cache[chunk_size, with_bias] = _objective(
          fn, data["targets"], data["w_logp"], data["w_ent"], data["mask"], with_bias)
    return cache[chunk_size, with_bias]

  return get


# 4: several chunks, the last one padded; 21 = N*T: one exact chunk; 64 > N*T.
@pytest.mark.parametrize("chunk_size, with_bias", [(4, False), (4, True), (21, True),
                                                   (64, False)])
def test_values_and_gradients_match_unchunked(data, compiled, chunk_size, with_bias):
  for temperature in (1.0, 0.6):
    temp = jnp.float32(temperature)
    args = (data["hidden"], data["emb"], data["bias"], temp)
    value, grads = compiled(chunk_size, with_bias)(*args)
    ref_value, ref_grads = compiled(None, with_bias)(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=2e-5)
    names = ("hidden", "embedding", "bias", "temperature")
    for name, g, r in zip(names, grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
      assert g.dtype == r.dtype, name
    if not with_bias:
      assert not np.any(grads[2]), "bias is unused here, its gradient must be zero"


def test_masked_positions_get_zero_hidden_gradient(data, compiled):
  _, (g_hidden, *_) = compiled(4, True)(data["hidden"], data["emb"], data["bias"],
                                        jnp.float32(1.0))
  masked = np.asarray(data["mask"]) == 0
  assert np.all(np.asarray(g_hidden)[masked] == 0)
  assert np.all(np.abs(np.asarray(g_hidden)[~masked]).sum(-1) > 0)


def test_hand_computed_case():
  # hidden = 1, embedding column [1, 2, 3]: logits [1, 2, 3]; temperature 2, bias 1.
  hidden = jnp.ones((1, 2, 1))
  emb = jnp.array([[1.0], [2.0], [3.0]])
  bias = jnp.array([0.0, 0.0, 1.0])
  targets = jnp.array([[1, 2]])
  logps, ent = token_logprobs(hidden, emb, targets, temperature=2.0, bias_V=bias,
                              chunk_size=1, return_entropy=True)
  s = np.array([1.0, 2.0, 4.0]) / 2.0
  logp_all = s - np.log(np.sum(np.exp(s)))
  np.testing.assert_allclose(logps, [[logp_all[1], logp_all[2]]], rtol=1e-6)
  expected_ent = -np.sum(np.exp(logp_all) * logp_all)
  np.testing.assert_allclose(ent, [[expected_ent, expected_ent]], rtol=1e-6)


def test_entropy_bounds_and_logprobs_normalised(data):
  @jax.jit
  def run(hidden, emb, targets):
    logps, ent = token_logprobs(hidden, emb, targets, return_entropy=True, chunk_size=8)
    # The probabilities of all V targets at one position sum to one.
    hidden_row = jnp.broadcast_to(hidden[0, :1], (1, V, D))
    every_target = token_logprobs(hidden_row, emb, jnp.arange(V)[None, :], chunk_size=16)
    return logps, ent, jnp.sum(jnp.exp(every_target))

  logps, ent, total = run(data["hidden"], data["emb"], data["targets"])
  assert logps.dtype == ent.dtype == jnp.float32
  assert np.all(np.asarray(logps) <= 0)
  assert np.all(np.asarray(ent) >= 0) and np.all(np.asarray(ent) <= np.log(V) + 1e-5)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_bfloat16_inputs_keep_their_dtype_and_match(data):
  hidden = data["hidden"].astype(jnp.bfloat16)
  emb = data["emb"].astype(jnp.bfloat16)
  targets, w = data["targets"], data["w_logp"]

  def f(fn, h, e, **kw):
    return jnp.sum(w * fn(h, e, targets, **kw))

  value, (g_h, g_e) = jax.jit(jax.value_and_grad(
      functools.partial(f, token_logprobs, chunk_size=8), argnums=(0, 1)))(hidden, emb)
  assert g_h.dtype == g_e.dtype == jnp.bfloat16
  ref_value, (r_h, r_e) = jax.jit(jax.value_and_grad(
      functools.partial(f, token_logprobs_unchunked), argnums=(0, 1)))(
          hidden.astype(jnp.float32), emb.astype(jnp.float32))
  # Same bf16-rounded inputs, float32 accumulation: values agree to float32 rounding of
  # the bf16 products; gradients are rounded to bf16 (8 bits of mantissa).
  np.testing.assert_allclose(value, ref_value, rtol=1e-4)
  scale_h = np.abs(np.asarray(r_h)).max()
  scale_e = np.abs(np.asarray(r_e)).max()
  np.testing.assert_allclose(np.asarray(g_h, np.float32), r_h, atol=2e-2 * scale_h)
  np.testing.assert_allclose(np.asarray(g_e, np.float32), r_e, atol=2e-2 * scale_e)


class PublicFunctionVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_logprobs_jit_and_eager_agree(self):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    fn = self.variant(lambda h, e, t: token_logprobs(
        h, e, t, temperature=0.8, chunk_size=3, return_entropy=True))
    logps, ent = fn(hidden, emb, targets)
    ref_logps, ref_ent = token_logprobs_unchunked(hidden, emb, targets, temperature=0.8,
                                                  return_entropy=True)
    chex.assert_shape([logps, ent], (2, 5))
    np.testing.assert_allclose(logps, ref_logps, atol=2e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=2e-5)


def test_vmap_over_a_leading_axis(data):
  @jax.jit
  def run(hidden_2xNxTxD):
    chunked = jax.vmap(lambda h: token_logprobs(h, data["emb"], data["targets"],
                                                chunk_size=8))(hidden_2xNxTxD)
    ref = jax.vmap(lambda h: token_logprobs_unchunked(h, data["emb"], data["targets"]))(
        hidden_2xNxTxD)
    return chunked, ref

  chunked, ref = run(jnp.stack([data["hidden"], -data["hidden"]]))
  np.testing.assert_allclose(chunked, ref, atol=2e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=jnp.zeros((3, 6), jnp.int32)), "targets_NxT has shape"),
    (dict(targets=jnp.zeros((3, 7), jnp.float32)), "integer token ids"),
    (dict(emb=jnp.zeros((50, 15))), "embedding_VxD has width"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
])
def test_bad_input_names_the_field(data, kwargs, match):
  args = dict(hidden=data["hidden"], emb=data["emb"], targets=data["targets"])
  args.update({k: v for k, v in kwargs.items() if k in args})
  extra = {k: v for k, v in kwargs.items() if k not in args}
  with pytest.raises((ValueError, TypeError), match=match):
    token_logprobs(args["hidden"], args["emb"], args["targets"], **extra)


@pytest.mark.parametrize("layout", [(1, 8, 1), (2, 2, 2)])
def test_sharded_rows_match_one_device(layout, num_devices):
  """Under a mesh the head runs vocabulary-parallel over all 8 devices (each chunk's
  positions gathered, the log-sum-exp reduced across the vocabulary slices, the head's
  gradient kept per slice): same values and gradients as one device. 32 positions in 4
  chunks of 8, the rows split over data x fsdp."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from egpo_jax.core import logprobs as logprobs_lib
  from egpo_jax.models import sharding

  n, t = 8, 4
  rng = np.random.default_rng(1)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  hidden, emb, bias = (f32(rng.normal(size=(n, t, D))), f32(0.5 * rng.normal(size=(V, D))),
                       f32(rng.normal(size=V)))
  targets = jnp.asarray(rng.integers(0, V, (n, t)), jnp.int32)
  w_logp, w_ent = f32(rng.normal(size=(n, t))), f32(rng.normal(size=(n, t)))
  fn = _objective(functools.partial(token_logprobs, chunk_size=8), targets, w_logp, w_ent,
                  jnp.ones((n, t)), True)
  args = (hidden, emb, bias, jnp.float32(0.7))
  ref_value, ref_grads = fn(*args)

  devices = jax.devices()[:int(np.prod(layout))]
  mesh = sharding.make_mesh(sharding.MeshConfig(*layout), devices=devices)
  rows = NamedSharding(mesh, P(sharding.BATCH))
  with jax.set_mesh(mesh):
    assert logprobs_lib._vocab_parallel()
    fn = _objective(functools.partial(token_logprobs, chunk_size=8),
                    jax.device_put(targets, rows), jax.device_put(w_logp, rows),
                    jax.device_put(w_ent, rows), jnp.ones((n, t)), True)
    value, grads = fn(jax.device_put(hidden, rows), *args[1:])
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=2e-5)
  for name, g, r in zip(("hidden", "embedding", "bias", "temperature"), grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
