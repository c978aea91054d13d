"""The decoder on its own: configs, padding, KV-cache parity, remat, dtypes, vmap."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpo_jax.models import config as config_lib
from egpo_jax.models import sharding
from egpo_jax.models import transformer as tr

TINY = config_lib.get_config("tiny")
TINY_UNTIED = TINY.replace(tie_word_embeddings=False, qkv_bias=False)
B, L = 3, 12

forward = jax.jit(tr.forward, static_argnames=("config", "return_hidden"))


@functools.cache
def _params(config):
  return tr.init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def params():
  return {c: _params(c) for c in (TINY, TINY_UNTIED)}


def _batch(seed=0, pads=(0, 3, 7)):
  ids = np.random.RandomState(seed).randint(3, TINY.vocab_size, (len(pads), L))
  mask = np.arange(L)[None, :] >= np.asarray(pads)[:, None]
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


# Published parameter counts of the paper's backbones (model cards / safetensors index).
@pytest.mark.parametrize("name,count", [
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-math-1.5b", 1_543_714_304),
    ("qwen2.5-math-7b", 7_615_616_512),
    ("Qwen/Qwen2.5-Math-7B", 7_615_616_512),
    ("deepseek-r1-distill-qwen-1.5b", 1_777_088_000),
    ("deepseek-r1-distill-qwen-7b", 7_615_616_512),
])
def test_named_configs_match_published_parameter_counts(name, count):
  config = config_lib.get_config(name)
  assert config.num_params() == count
  abstract = sharding.abstract_params(config)  # traced only, nothing allocated
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == count


def test_peer_benchmark_configs():
  tiny, small = config_lib.get_config("tiny"), config_lib.get_config("small")
  assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads,
          tiny.intermediate_size, tiny.vocab_size, tiny.tie_word_embeddings) == (
              64, 2, 4, 2, 128, 512, True)
  assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads,
          small.intermediate_size, small.vocab_size, small.tie_word_embeddings) == (
              512, 8, 8, 2, 1408, 512, True)
  hash(small.replace(rope_scaling=config_lib.rope_scaling_items({"rope_type": "linear",
                                                                 "factor": 2.0})))


@pytest.mark.parametrize("changes,match", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(dtype="float64"), "dtype 'float64'"),
    (dict(rope_scaling={"rope_type": "linear"}), "hashable tuple"),
    (dict(rope_scaling=(("rope_type", "yarn"),)), "rope_type 'yarn'"),
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(hidden_size=66), "not divisible by num_heads"),
])
def test_config_validation_names_the_field(changes, match):
  with pytest.raises(ValueError, match=match):
    TINY.replace(**changes)


def test_unknown_named_config_lists_known_names():
  with pytest.raises(KeyError, match="known: .*tiny"):
    config_lib.get_config("gpt-5")


def test_param_tree_layout(params):
  p = params[TINY_UNTIED]
  c = TINY_UNTIED
  assert p["layers"]["q_proj"]["kernel"].shape == (c.num_layers, c.hidden_size, c.num_heads,
                                                   c.head_size)
  assert p["layers"]["o_proj"]["kernel"].shape == (c.num_layers, c.num_heads, c.head_size,
                                                   c.hidden_size)
  assert "bias" not in p["layers"]["q_proj"]
  assert tr.output_embedding(p, c).shape == (c.vocab_size, c.hidden_size)
  assert tr.output_embedding(params[TINY], TINY) is params[TINY]["embed"]["embedding"]


def test_forward_shapes_and_hidden_path(params):
  ids, mask = _batch()
  for config in (TINY, TINY_UNTIED):
    logits = forward(params[config], ids, mask, config=config)
    hidden = forward(params[config], ids, mask, config=config, return_hidden=True)
    chex.assert_shape(logits, (3, L, config.vocab_size))
    chex.assert_shape(hidden, (3, L, config.hidden_size))
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()  # pads included: finite garbage, never NaN
    table = tr.output_embedding(params[config], config)
    np.testing.assert_allclose(hidden @ table.T, logits, atol=1e-5, rtol=1e-5)


@given(n=st.integers(1, L), pad_id=st.integers(0, 511), seed=st.integers(0, 2**16))
def test_left_padding_equals_unpadded_prefix(params, n, pad_id, seed):
  """Row [pad * (L - n), s[:n]] gives at its real slots the logits of s at slots [0, n)."""
  s = np.random.RandomState(seed).randint(3, TINY.vocab_size, L)
  padded = np.concatenate([np.full(L - n, pad_id), s[:n]])  # pad ids are masked out
  ids = jnp.asarray(np.stack([padded, s, s]), jnp.int32)  # the shape of _batch: one compile
  mask = jnp.asarray(np.stack([np.arange(L) >= L - n, np.ones(L, bool), np.ones(L, bool)]))
  logits = forward(params[TINY], ids, mask, config=TINY)
  np.testing.assert_allclose(logits[0, L - n:], logits[1, :n], atol=2e-5, rtol=1e-5)


class CacheParityTest(chex.TestCase):
  """Prefill + N one-token decode steps equal the full forward pass, jitted or not."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_prefill_then_decode_equals_forward(self):
    p_len, steps = 7, 5
    ids, mask = _batch(seed=1)
    prefill_fn = self.variant(tr.prefill, static_argnames="config")
    decode_fn = self.variant(tr.decode, static_argnames="config")
    # Eager Linen scans recompile per call, so the eager variant checks fewer steps.
    configs = (TINY, TINY_UNTIED) if self.variant.type == chex.ChexVariantType.WITH_JIT else (TINY,)
    steps = steps if self.variant.type == chex.ChexVariantType.WITH_JIT else 1
    for config in configs:
      params = _params(config)
      full = forward(params, ids, mask, config=config)
      cache = tr.init_cache(config, 3, p_len + steps + 2)
      logits, cache = prefill_fn(params, ids[:, :p_len], mask[:, :p_len], cache, config=config)
      # Row 2's prompt is all padding (its last slot is not a token): only decode counts.
      np.testing.assert_allclose(logits[:2], full[:2, p_len - 1], atol=2e-5, rtol=1e-5)
      np.testing.assert_array_equal(cache.positions_B, mask[:, :p_len].sum(-1))
      for t in range(steps):
        logits, cache = decode_fn(params, ids[:, p_len + t], cache, config=config)
        np.testing.assert_allclose(logits, full[:, p_len + t], atol=2e-5, rtol=1e-5)
      assert int(cache.index) == p_len + steps
      np.testing.assert_array_equal(cache.mask_BxS[:, :p_len + steps], mask[:, :p_len + steps])
      assert not cache.mask_BxS[:, p_len + steps:].any()


def test_cache_layout_and_bad_prompt_length(params):
  cache = tr.init_cache(TINY, 2, 5)
  chex.assert_shape(cache.k, (TINY.num_layers, 2, 5, TINY.num_kv_heads, TINY.head_size))
  assert cache.k.dtype == jnp.float32 and cache.mask_BxS.dtype == jnp.bool_
  ids = jnp.ones((2, 6), jnp.int32)
  with pytest.raises(ValueError, match="exceeds the cache.s 5 slots"):
    tr.prefill(params[TINY], ids, ids > 0, cache, config=TINY)
  with pytest.raises(ValueError, match="batch_size=0"):
    tr.init_cache(TINY, 0, 4)


def test_decode_writes_only_the_new_slot_and_ignores_masked_slots(params):
  """Decode touches slot `index` of each layer only; unmasked garbage never leaks in."""
  rng = np.random.RandomState(5)
  cache = tr.init_cache(TINY, 2, 6)
  shape = cache.k.shape
  garbage = cache.replace(k=jnp.asarray(rng.normal(size=shape) * 1e3, jnp.float32),
                          v=jnp.asarray(rng.normal(size=shape) * 1e3, jnp.float32),
                          mask_BxS=cache.mask_BxS.at[:, :2].set(True),
                          positions_B=jnp.array([2, 2], jnp.int32),
                          index=jnp.asarray(2, jnp.int32))
  clean = garbage.replace(k=garbage.k.at[:, :, 2:].set(0), v=garbage.v.at[:, :, 2:].set(0))
  decode = jax.jit(tr.decode, static_argnames="config")
  tokens = jnp.array([7, 9], jnp.int32)
  logits, out = decode(params[TINY], tokens, garbage, config=TINY)
  clean_logits, clean_out = decode(params[TINY], tokens, clean, config=TINY)
  np.testing.assert_array_equal(logits, clean_logits)
  np.testing.assert_array_equal(out.k[:, :, 2], clean_out.k[:, :, 2])
  for new, old in ((out.k, garbage.k), (out.v, garbage.v)):
    np.testing.assert_array_equal(np.delete(np.asarray(new), 2, axis=2),
                                  np.delete(np.asarray(old), 2, axis=2))
  assert int(out.index) == 3 and out.mask_BxS[:, :3].all() and not out.mask_BxS[:, 3:].any()


def test_decode_updates_the_donated_cache_in_place(params):
  """No full-cache copy or zero-fill in the compiled step (a layer scan carrying the
  stacked cache copied all of it every token)."""
  cache = jax.eval_shape(lambda: tr.init_cache(TINY, 2, 64))
  step = jax.jit(functools.partial(tr.decode, config=TINY), donate_argnums=2)
  hlo = step.lower(params[TINY], jax.ShapeDtypeStruct((2,), jnp.int32),
                   cache).compile().as_text()
  full = re.escape("f32[%s]" % ",".join(map(str, cache.k.shape)))
  ops = re.findall(r"= " + full + r"\{[^}]*\} (\S+?)\(", hlo)
  assert "dynamic-update-slice" in ops or "fusion" in ops, ops
  assert not {"copy", "broadcast", "while"} & set(ops), ops


def test_remat_gives_identical_gradients(params):
  ids, mask = _batch(seed=2)
  remat = TINY.replace(remat=True)

  def loss(p, config):
    return jnp.mean(tr.forward(p, ids, mask, config=config) * mask[..., None])

  # The flag really wraps the layer in jax.checkpoint (else equal gradients prove nothing).
  assert "remat" in str(jax.make_jaxpr(functools.partial(loss, config=remat))(params[TINY]))
  assert "remat" not in str(jax.make_jaxpr(functools.partial(loss, config=TINY))(params[TINY]))
  both = jax.jit(lambda p: (jax.grad(loss)(p, TINY), jax.grad(loss)(p, remat)))  # one compile
  g0, g1 = both(params[TINY])
  chex.assert_trees_all_close(g0, g1, atol=1e-6, rtol=1e-5)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0))


def test_bfloat16_compute_float32_logits(params):
  ids, mask = _batch(seed=3)
  config16 = TINY.replace(dtype="bfloat16")
  ref = forward(params[TINY], ids, mask, config=TINY)
  out = forward(params[TINY], ids, mask, config=config16)
  assert out.dtype == jnp.float32
  real = np.asarray(mask)
  assert np.abs(np.asarray(out - ref))[real].max() < 0.05 * np.abs(np.asarray(ref))[real].max()
  hidden = jax.eval_shape(functools.partial(tr.forward, config=config16, return_hidden=True),
                          params[TINY], ids, mask)
  assert hidden.dtype == jnp.bfloat16
  cache = tr.init_cache(config16, 3, 16)
  assert cache.k.dtype == jnp.bfloat16


def test_bfloat16_params(params):
  config = TINY.replace(param_dtype="bfloat16", dtype="bfloat16")
  p = jax.eval_shape(functools.partial(tr.init_params, config), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}


def test_vmap_over_seeds_equals_separate_calls(params):
  """The trainer vmaps whole runs over seeds: params with a leading seed axis."""
  ids, mask = _batch(seed=4)
  p1 = tr.init_params(TINY, jax.random.key(1))
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params[TINY], p1)
  out = jax.jit(jax.vmap(lambda p: tr.forward(p, ids, mask, config=TINY)))(stacked)
  np.testing.assert_allclose(out[0], forward(params[TINY], ids, mask, config=TINY), atol=1e-5)
  np.testing.assert_allclose(out[1], forward(p1, ids, mask, config=TINY), atol=1e-5)


def test_bad_input_types(params):
  ids, mask = _batch()
  with pytest.raises(AssertionError):
    tr.forward(params[TINY], ids.astype(jnp.float32), mask, config=TINY)
  with pytest.raises(AssertionError):
    tr.forward(params[TINY], ids, mask[:, :-1], config=TINY)
  with pytest.raises(TypeError, match="mask must be bool or int"):
    tr.forward(params[TINY], ids, mask.astype(jnp.float32), config=TINY)


def test_rope_inv_freq_scalings():
  base = tr.rope_inv_freq(TINY)
  np.testing.assert_allclose(base, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
  linear = TINY.replace(rope_scaling=config_lib.rope_scaling_items(
      {"rope_type": "linear", "factor": 4.0}))
  np.testing.assert_allclose(tr.rope_inv_freq(linear), base / 4, rtol=1e-6)
  llama3 = TINY.replace(rope_scaling=config_lib.rope_scaling_items(
      {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
  scaled = tr.rope_inv_freq(llama3)
  wavelen = 2 * np.pi / base
  high = wavelen < 64 / 4   # short wavelengths are kept
  low = wavelen > 64 / 1    # long ones are divided by the factor
  np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
  mid = ~high & ~low
  assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)
