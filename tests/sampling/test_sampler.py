"""Tests for egpo_jax.sampling.engine on a tiny random Qwen2: exactness, EOS, invariances."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from egpo_jax import sampling
from egpo_jax.models import config as model_config
from egpo_jax.models import sharding
from egpo_jax.models import transformer

CONFIG = model_config.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_layers=2, num_heads=4, num_kv_heads=2,
                                  max_position_embeddings=256)
T = 16
SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9)
# Log-probs from the KV cache vs a teacher-forced full pass, both float32: the two sum in
# different orders (observed max 4e-5 on an AMD EPYC, 2.1e-4 on an Intel Xeon, whose XLA:CPU
# kernels block differently, on the model below). A wrong position, token or temperature
# is off by 1e-2 or more.
LOGP_ATOL = 1e-3


@pytest.fixture(scope="module")
def params():
  # Weights 10x the init scale, so logits are peaked (mean entropy ~3.3 nats, not
  # log V = 4.2) and greedy decoding has no near-ties that float reordering could flip.
  base = transformer.init_params(CONFIG, jax.random.key(0))
  return jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, base)


def _prompts(lengths, seed=0, width=None):
  """Left-padded random prompts of the given lengths (tokens >= 3, so never pad/EOS)."""
  width = width or max(lengths)
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    ids[i, width - n:] = rng.integers(3, CONFIG.vocab_size, n)
    mask[i, width - n:] = 1
  return ids, mask


def _generate(params, ids, mask, *, group_size, seed=1, **kwargs):
  kwargs.setdefault("eos_ids", ())
  return jax.device_get(sampling.generate(
      params, ids, mask, jax.random.key(seed), config=CONFIG, group_size=group_size,
      max_new_tokens=T, **kwargs))


_forward = jax.jit(functools.partial(transformer.forward, config=CONFIG))


def _teacher_forced(params, ids, mask, out, group_size, temperature):
  """log softmax(logits / T) at the completion tokens from one full forward pass."""
  prompt_ids = np.repeat(ids, group_size, axis=0)
  prompt_mask = np.repeat(mask, group_size, axis=0)
  full = np.concatenate([prompt_ids, out.completion_ids_NxT], axis=1)
  full_mask = np.concatenate([prompt_mask, out.completion_mask_NxT.astype(np.int32)], 1)
  logits = _forward(params, full, full_mask)
  logits = logits[:, ids.shape[1] - 1:-1] / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.asarray(out.completion_ids_NxT)[..., None], -1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return np.asarray(picked[..., 0]), np.asarray(entropy)


# EOS = 4 of the 64 tokens: some rows stop within T = 16 tokens and others do not.
EOS = (5, 17, 33, 48)
# Shapes shared by the tests (each distinct shape or setting is one compilation).
LENGTHS = [3, 9, 14, 6, 1, 12, 8, 5]
PROMPT_IDS_B = np.arange(100, 108)


@pytest.fixture(scope="module")
def prompts():
  return _prompts(LENGTHS, seed=5)


@pytest.fixture(scope="module")
def sampled_run(params, prompts):
  """8 prompts x 8 samples = 64 rows, sampled with top-k and top-p, EOS on."""
  ids, mask = prompts
  return _generate(params, ids, mask, group_size=8, prompt_ids_B=PROMPT_IDS_B, eos_ids=EOS,
                   return_entropy=True, **SAMPLED)


@pytest.fixture(scope="module")
def greedy_run(params, prompts):
  ids, mask = prompts
  return _generate(params, ids, mask, group_size=1, greedy=True)


def test_logps_equal_teacher_forced_forward(params, prompts, sampled_run):
  ids, mask = prompts
  out = sampled_run
  ref_logps, ref_entropy = _teacher_forced(params, ids, mask, out, 8, SAMPLED["temperature"])
  m = out.completion_mask_NxT
  np.testing.assert_allclose(out.logps_NxT[m], ref_logps[m], atol=LOGP_ATOL, rtol=0)
  np.testing.assert_allclose(out.entropy_NxT[m], ref_entropy[m], atol=LOGP_ATOL, rtol=0)
  assert (out.logps_NxT[~m] == 0).all() and (out.entropy_NxT[~m] == 0).all()
  # The model is peaked but not degenerate: the comparison is not of zeros.
  assert out.logps_NxT[m].min() < -0.5


def test_greedy_logps_use_temperature_one(params, prompts, greedy_run):
  ids, mask = prompts
  ref, _ = _teacher_forced(params, ids, mask, greedy_run, 1, 1.0)
  np.testing.assert_allclose(greedy_run.logps_NxT, ref, atol=LOGP_ATOL, rtol=0)
  # temperature=0 and greedy=True with any temperature are the same greedy decoding.
  zero = _generate(params, ids, mask, group_size=1, temperature=0.0, top_p=0.5)
  np.testing.assert_array_equal(zero.completion_ids_NxT, greedy_run.completion_ids_NxT)
  np.testing.assert_array_equal(zero.logps_NxT, greedy_run.logps_NxT)


def test_eos_masking_padding_and_truncation(sampled_run):
  out = sampled_run
  ids, m = out.completion_ids_NxT, out.completion_mask_NxT
  is_eos = np.isin(ids, EOS) & m
  assert out.truncated_N.any() and (~out.truncated_N).any(), "want both kinds of rows"
  for n in range(ids.shape[0]):
    length = int(out.lengths_N[n])
    np.testing.assert_array_equal(m[n], np.arange(T) < length)
    assert (ids[n, length:] == 0).all(), "tokens after EOS must be pad"
    eos_at = np.flatnonzero(is_eos[n])
    if out.truncated_N[n]:
      assert length == T and eos_at.size == 0
    else:
      assert eos_at.tolist() == [length - 1], "mask ends at, and includes, the first EOS"
  assert int(out.num_steps) == int(out.lengths_N.max())


def test_stops_early_when_every_row_is_done(params, prompts, greedy_run):
  ids, mask = prompts
  free = greedy_run
  assert int(free.num_steps) == T and free.truncated_N.all()
  # Make each row's 3rd greedy token an EOS: every row now stops by step 3.
  eos = tuple(sorted(set(free.completion_ids_NxT[:, 2].tolist())))
  out = _generate(params, ids, mask, group_size=1, greedy=True, eos_ids=eos)
  first = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in free.completion_ids_NxT]
  np.testing.assert_array_equal(out.lengths_N, np.array(first) + 1)
  assert int(out.num_steps) == max(first) + 1 <= 3
  assert not out.truncated_N.any()
  for n, length in enumerate(out.lengths_N):
    np.testing.assert_array_equal(out.completion_ids_NxT[n, :length],
                                  free.completion_ids_NxT[n, :length])


def test_greedy_left_padding_matches_each_prompt_alone(params, prompts, greedy_run):
  ids, mask = prompts
  assert len(set(greedy_run.completion_ids_NxT[:, 0].tolist())) > 1  # prompts matter
  before = sampling.compilation_counts()
  for i, n in enumerate(LENGTHS):
    alone = _generate(params, ids[i:i + 1, -n:], mask[i:i + 1, -n:], group_size=1,
                      greedy=True)
    np.testing.assert_array_equal(greedy_run.completion_ids_NxT[i],
                                  alone.completion_ids_NxT[0])
    np.testing.assert_allclose(greedy_run.logps_NxT[i], alone.logps_NxT[0], atol=LOGP_ATOL)
  # Eight prompt lengths (1..14), one length bucket: one new prefill and decode program.
  after = sampling.compilation_counts()
  assert after["prefill"] - before["prefill"] == 1
  assert after["decode"] - before["decode"] == 1


def test_sampled_response_same_in_batch_of_one_and_of_64(params, prompts, sampled_run):
  ids, mask = prompts
  big = sampled_run
  assert big.completion_ids_NxT.shape == (64, T)
  for b in (0, 4, 7):
    n = LENGTHS[b]
    one = _generate(params, ids[b:b + 1, -n:], mask[b:b + 1, -n:], group_size=1,
                    prompt_ids_B=PROMPT_IDS_B[b:b + 1], eos_ids=EOS, return_entropy=True,
                    **SAMPLED)
    np.testing.assert_array_equal(big.completion_ids_NxT[b * 8], one.completion_ids_NxT[0])
    np.testing.assert_allclose(big.logps_NxT[b * 8], one.logps_NxT[0], atol=LOGP_ATOL)
  # Samples g > 0 use fold_in(fold_in(rng, prompt id), g), rows b * G + g.
  keys = sampling.response_keys(jax.random.key(1), jnp.asarray(PROMPT_IDS_B), 8)
  for b, g in [(0, 0), (5, 3), (7, 7)]:
    want = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), PROMPT_IDS_B[b]), g)
    np.testing.assert_array_equal(jax.random.key_data(keys[b * 8 + g]),
                                  jax.random.key_data(want))
  # Different samples of one prompt differ (the keys are not all alike).
  assert len({tuple(r) for r in big.completion_ids_NxT[:8]}) > 1


def test_sharded_data_fsdp_mesh_matches_single_device(params, prompts, sampled_run,
                                                     greedy_run, num_devices):
  ids, mask = prompts
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2, tensor=1))
  with jax.set_mesh(mesh):
    sharded_params = sharding.shard_params(params, mesh)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, sharding.batch_spec(x.shape, mesh)))
    greedy = sampling.generate(sharded_params, put(ids), put(mask), jax.random.key(1),
                               config=CONFIG, group_size=1, max_new_tokens=T, eos_ids=(),
                               greedy=True)
    sampled = sampling.generate(sharded_params, put(ids), put(mask), jax.random.key(1),
                                config=CONFIG, group_size=8, max_new_tokens=T, eos_ids=EOS,
                                prompt_ids_B=PROMPT_IDS_B, return_entropy=True, **SAMPLED)
    # The prompt's cache slots once per group, the 8 prompts split over the devices.
    shared = sampling.generate(sharded_params, put(ids), put(mask), jax.random.key(1),
                               config=CONFIG, group_size=8, max_new_tokens=T, eos_ids=EOS,
                               prompt_ids_B=PROMPT_IDS_B, return_entropy=True,
                               shared_prompt_min_len=0, **SAMPLED)
  # Rows are really split over the 8 devices.
  assert sampled.logps_NxT.sharding.shard_shape((64, T)) == (8, T)
  for got, want in [(greedy, greedy_run), (sampled, sampled_run), (shared, sampled_run)]:
    got = jax.device_get(got)
    np.testing.assert_array_equal(got.completion_ids_NxT, want.completion_ids_NxT)
    np.testing.assert_array_equal(got.completion_mask_NxT, want.completion_mask_NxT)
    np.testing.assert_allclose(got.logps_NxT, want.logps_NxT, atol=LOGP_ATOL)


def test_bucket_length():
  assert [sampling.bucket_length(n) for n in (1, 3, 16, 17, 33)] == [16, 16, 16, 32, 64]
  assert sampling.bucket_length(5, minimum=4) == 8
  assert sampling.bucket_length(64, minimum=8) == 64


def test_pure_rollout_under_jit_equals_generate(params, prompts, sampled_run):
  ids, mask = prompts
  out = sampled_run
  width = sampling.bucket_length(ids.shape[1])
  pad = ((0, 0), (width - ids.shape[1], 0))
  spec = sampling.SamplingSpec(group_size=8, max_new_tokens=T, eos_ids=EOS,
                               return_entropy=True, **SAMPLED)
  fn = jax.jit(functools.partial(sampling.rollout, config=CONFIG, spec=spec))
  pure = fn(params, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1), PROMPT_IDS_B)
  np.testing.assert_array_equal(pure.completion_ids_NxT, out.completion_ids_NxT)
  np.testing.assert_array_equal(pure.completion_mask_NxT, out.completion_mask_NxT)
  np.testing.assert_allclose(pure.logps_NxT, out.logps_NxT, atol=1e-6)


def test_cache_plan():
  assert sampling.cache_plan(16, 64, 4) == (37, 58, 79)   # 63 steps: 3 phases of >= 16
  assert sampling.cache_plan(16, 64, 1) == (79,)
  assert sampling.cache_plan(8, 40, 4) == (28, 47)
  assert sampling.cache_plan(16, 16, 4) == (31,)           # too short to split
  assert sampling.cache_plan(16, 1, 4) == (16,)            # no decode step at all
  assert sampling.cache_plan(100, 1001, 4) == (350, 600, 850, 1100)


def test_phased_decode_equals_one_loop_on_the_whole_cache(params, prompts):
  """Decoding in phases on a growing cache gives one loop's tokens and log-probs, with rows
  ending in either phase, and both match a teacher-forced forward pass."""
  ids, mask = prompts
  t = 40   # 39 decode steps: phases of 20 and 19 (cache_plan)
  run = lambda phases: jax.device_get(sampling.generate(
      params, ids, mask, jax.random.key(3), config=CONFIG, group_size=8, max_new_tokens=t,
      eos_ids=EOS, prompt_ids_B=PROMPT_IDS_B, cache_phases=phases, **SAMPLED))
  before = sampling.compilation_counts()
  phased, whole = run(4), run(1)
  assert sampling.compilation_counts()["decode"] - before["decode"] == 2
  lengths = phased.lengths_N
  assert (lengths <= 20).any() and ((lengths > 21) & ~phased.truncated_N).any()
  assert phased.truncated_N.any() and int(phased.num_steps) == t
  for name in ("completion_ids_NxT", "completion_mask_NxT", "lengths_N", "truncated_N"):
    np.testing.assert_array_equal(getattr(phased, name), getattr(whole, name))
  np.testing.assert_allclose(phased.logps_NxT, whole.logps_NxT, atol=1e-6, rtol=0)
  want, _ = _teacher_forced(params, np.asarray(ids), np.asarray(mask), phased, 8,
                            SAMPLED["temperature"])
  np.testing.assert_allclose(phased.logps_NxT, want * phased.completion_mask_NxT,
                             atol=LOGP_ATOL)
  # The prompt's slots once per group (shared_prompt_min_len=0) through the same phases:
  # the same responses.
  shared = jax.device_get(sampling.generate(
      params, ids, mask, jax.random.key(3), config=CONFIG, group_size=8, max_new_tokens=t,
      eos_ids=EOS, prompt_ids_B=PROMPT_IDS_B, shared_prompt_min_len=0, **SAMPLED))
  for name in ("completion_ids_NxT", "completion_mask_NxT", "lengths_N", "truncated_N"):
    np.testing.assert_array_equal(getattr(shared, name), getattr(phased, name))
  np.testing.assert_allclose(shared.logps_NxT, phased.logps_NxT, atol=LOGP_ATOL, rtol=0)


def test_grow_cache_adds_empty_slots_in_both_layouts():
  cache = transformer.init_cache(CONFIG, 2, 10, slots=4)
  assert (cache.max_len, cache.capacity, cache.k.shape[2]) == (4, 10, 4)
  cache = cache.replace(mask_BxS=jnp.ones((2, 4), bool), k=cache.k + 1.0)
  grown = transformer.grow_cache(cache, 7)
  assert grown.k.shape[2] == 7 and grown.mask_BxS.shape == (2, 7)
  np.testing.assert_array_equal(grown.k[:, :, :4], cache.k)
  assert not grown.k[:, :, 4:].any() and not grown.mask_BxS[:, 4:].any()
  laid = transformer.grow_cache(transformer.decode_layout(cache), 10)
  assert laid.k[0].shape[-1] == 10 and laid.v[0].shape[2] == 10
  np.testing.assert_array_equal(laid.k[0][..., :4], np.transpose(cache.k[0], (0, 2, 3, 1)))
  assert transformer.grow_cache(cache, 4) is cache
  for slots in (3, 11):
    with pytest.raises(ValueError, match="grow_cache: slots"):
      transformer.grow_cache(cache, slots)
  with pytest.raises(ValueError, match="slots"):
    transformer.init_cache(CONFIG, 2, 10, slots=11)


def test_shared_prefix_decodes_like_the_prompt_cache_repeated_per_row(params):
  """share_prefix holds each prompt's slots once per group; decoding on it gives the
  logits of the cache with the prompt repeated G times (left pads of different lengths,
  a grow between steps), and its slot bookkeeping is the repeated cache's."""
  ids, mask = _prompts([5, 8, 2], seed=3)
  group, steps = 2, 6
  cache = transformer.init_cache(CONFIG, 3, 8 + steps, slots=8)
  _, cache = transformer.prefill(params, jnp.asarray(ids), jnp.asarray(mask), cache,
                                 config=CONFIG)
  repeated = transformer.decode_layout(transformer.grow_cache(cache.replace(
      k=jnp.repeat(cache.k, group, axis=1), v=jnp.repeat(cache.v, group, axis=1),
      mask_BxS=jnp.repeat(cache.mask_BxS, group, axis=0),
      positions_B=jnp.repeat(cache.positions_B, group, axis=0)), 8 + 3))
  shared = transformer.share_prefix(cache, group, 8 + 3)
  assert shared.prefix_len == 8 and shared.max_len == repeated.max_len == 11
  assert shared.k[0].shape == (6, CONFIG.num_kv_heads, CONFIG.head_size, 3)
  assert shared.prefix_k[0].shape == (3, CONFIG.num_kv_heads, CONFIG.head_size, 8)
  decode = jax.jit(functools.partial(transformer.decode, transformer.decode_params(params),
                                     config=CONFIG))
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, 64, (steps, 6)), jnp.int32)
  for t in range(steps):
    if t == 3:
      repeated, shared = (transformer.grow_cache(c, 8 + steps) for c in (repeated, shared))
    want, repeated = decode(tokens[t], repeated)
    got, shared = decode(tokens[t], shared)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(shared.mask, repeated.mask)
    assert int(shared.index) == int(repeated.index) == 8 + t + 1
  np.testing.assert_array_equal(shared.positions_B, repeated.positions_B)
  with pytest.raises(ValueError, match="already has a shared prefix"):
    transformer.share_prefix(shared, group, 8 + steps)
  with pytest.raises(ValueError, match="slots=20"):
    transformer.share_prefix(cache, group, 20)
  with pytest.raises(ValueError, match="decode_layout"):
    transformer.decode(params, tokens[0], shared.replace(k=jnp.stack(shared.k)),
                       config=CONFIG)


def _while_bodies(hlo: str) -> list[str]:
  """The text of every while-loop body computation of a compiled HLO module."""
  bodies = []
  for name in set(re.findall(r"body=%([\w.\-]+)", hlo)):
    start = hlo.index(f"\n%{name} (")
    bodies.append(hlo[start:hlo.index("\n}\n", start)])
  return bodies


def test_decode_loop_copies_no_weights_or_cache_and_its_layouts_are_exact(params):
  """Layer weights enter the decode loop unstacked and the cache in decode_layout (both
  converted once, before it): slices of the stacked weights, or the stacked cache's
  keys/values in attention's order, are copied on every step on CPU."""
  # Sizes that no activation shares: a [24, 48] (fused q/k/v), [24, 80] (fused gate/up) or
  # [40, 24] (down) array is a layer kernel.
  config = model_config.ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=40,
                                    num_layers=2, num_heads=4, num_kv_heads=2,
                                    max_position_embeddings=64)
  abstract = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  ids = jax.ShapeDtypeStruct((3, 16), jnp.int32)
  for shared_from in (64, 0):   # the 16-token prompt repeated per row, then shared
    spec = sampling.SamplingSpec(group_size=2, max_new_tokens=4, eos_ids=(), top_k=5,
                                 shared_prompt_min_len=shared_from)
    state = jax.eval_shape(
        functools.partial(sampling.start_rollout, config=config, spec=spec),
        abstract, ids, ids, jax.random.key(0), jax.ShapeDtypeStruct((3,), jnp.int32))
    hlo = jax.jit(functools.partial(sampling.continue_rollout, config=config, spec=spec)
                  ).lower(abstract, state).compile().as_text()
    (body,) = _while_bodies(hlo)
    made = re.findall(r"= f32\[(?:24,48|24,80|40,24)\]\{[^}]*\} (\S+?)\(", body)
    assert re.search(r"f32\[24,80\]", body) and re.search(r"f32\[24,48\]", body)
    assert set(made) <= {"get-tuple-element", "parameter"}, made
    # A layer's cache [N=6, G=2, S, head_dim=6] (S = 16+4-1 slots, or the 4-1 after a
    # shared prompt) is only written in place; a shared prompt's [B=3, G=2, 16, 6] only
    # read.
    slots = 3 if shared_from == 0 else 19
    assert state.cache.k[0].shape == (6, 2, 6, slots)
    assert state.cache.v[0].shape == (6, 2, slots, 6)
    made = re.findall(rf"%(\S+) = f32\[(?:6,2,{slots},6|6,2,6,{slots})\]\{{", body)
    assert made and all(n.startswith("get-tuple-element") or "dynamic-update-slice" in n
                        for n in made), made
    if shared_from == 0:
      assert state.cache.prefix_k[0].shape == (3, 2, 6, 16)
      assert state.cache.prefix_v[0].shape == (3, 2, 16, 6)
      made = re.findall(r"%(\S+) = f32\[(?:3,2,16,6|3,2,6,16)\]\{", body)
      assert made and all(n.startswith("get-tuple-element") for n in made), made
    else:
      assert state.cache.prefix_k is None
  # decode on unstacked layers and a per-layer cache computes what the stacked one does.
  cache = transformer.init_cache(CONFIG, 2, 6)
  logits, cache = transformer.prefill(params, jnp.array([[3, 4, 5], [6, 7, 8]]),
                                      jnp.ones((2, 3), jnp.int32), cache, config=CONFIG)
  tokens = jnp.array([9, 10], jnp.int32)
  stacked = transformer.decode(params, tokens, cache, config=CONFIG)
  unstacked_params = transformer.decode_params(params)
  assert len(unstacked_params["layers"]) == CONFIG.num_layers
  assert transformer.decode_params(unstacked_params) is unstacked_params
  unstacked = transformer.decode(unstacked_params, tokens, cache, config=CONFIG)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(unstacked)):
    np.testing.assert_array_equal(a, b)
  # Fusing q/k/v and gate/up changes only the matmul blocking.
  separate = transformer.decode(transformer.decode_params(params, fuse=False), tokens, cache,
                                config=CONFIG)
  # (On an Intel Xeon logits ~1 differed by up to 1.5e-5, keys ~23 by 5.5e-5.)
  for a, b in zip(jax.tree.leaves(separate), jax.tree.leaves(stacked)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  laid = transformer.decode_layout(cache)
  assert transformer.decode_layout(laid) is laid and laid.max_len == cache.max_len
  logits, out = transformer.decode(unstacked_params, tokens, laid, config=CONFIG)
  np.testing.assert_allclose(logits, stacked[0], atol=1e-5, rtol=0)
  for i in range(CONFIG.num_layers):
    np.testing.assert_array_equal(out.k[i], np.transpose(stacked[1].k[i], (0, 2, 3, 1)))
    np.testing.assert_array_equal(out.v[i], np.swapaxes(stacked[1].v[i], 1, 2))
  np.testing.assert_array_equal(out.mask_BxS, stacked[1].mask_BxS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=0), "group_size"),
    (dict(shared_prompt_min_len=-1), "shared_prompt_min_len"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_ids=(64,)), "eos_ids"),
    (dict(pad_id=-1), "pad_id"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=65), "top_k"),
    (dict(prompt_ids_B=[1, 2, 3]), "prompt_ids_B"),
    (dict(max_new_tokens=252), "max_position_embeddings"),
])
def test_bad_arguments_raise(params, kwargs, match):
  ids, mask = _prompts([3, 5])
  args = dict(group_size=2, max_new_tokens=4, eos_ids=(2,))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sampling.generate(params, ids, mask, jax.random.key(0), config=CONFIG, **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=0), "group_size"),
    (dict(eos_ids=(-1,)), "eos_ids"),
    (dict(top_k=-2), "top_k"),
    (dict(temperature=-0.5), "temperature"),
    (dict(shared_prompt_min_len=1.5), "shared_prompt_min_len"),
])
def test_bad_sampling_spec_raises(kwargs, match):
  args = dict(group_size=2, max_new_tokens=4, eos_ids=(2,))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sampling.SamplingSpec(**args)


def test_sampling_spec_is_hashable_with_list_eos():
  spec = sampling.SamplingSpec(group_size=2, max_new_tokens=4, eos_ids=[2, 7])
  assert spec.eos_ids == (2, 7) and hash(spec) == hash(
      sampling.SamplingSpec(group_size=2, max_new_tokens=4, eos_ids=(2, 7)))


def test_bad_prompts_raise(params):
  ids, mask = _prompts([3, 5])
  with pytest.raises(ValueError, match="LEFT-padded"):
    sampling.generate(params, ids, mask[:, ::-1], jax.random.key(0), config=CONFIG,
                      group_size=1, max_new_tokens=4, eos_ids=2)
  with pytest.raises(ValueError, match="no prompt token"):
    sampling.generate(params, ids, mask * np.array([[0], [1]]), jax.random.key(0),
                      config=CONFIG, group_size=1, max_new_tokens=4, eos_ids=2)
  with pytest.raises(ValueError, match="integer token ids"):
    sampling.generate(params, ids.astype(np.float32), mask, jax.random.key(0),
                      config=CONFIG, group_size=1, max_new_tokens=4, eos_ids=2)


# A trip count no real loop here has: collectives inside the decode loops count this often.
_IN_LOOP = 10 ** 6


@pytest.mark.parametrize("layout", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_decode_loop_moves_no_weights_and_only_tensor_all_reduces(layout, num_devices):
  """Issue 25: the weights are gathered before the token loops, never inside them; with
  tensor = 1 the loop body has no collective at all; with tensor = 2 only the two
  per-layer all-reduces of [local rows, D] over `tensor` (attention out, MLP down)."""
  from egpo_jax.training import dry_run
  mesh = sharding.make_mesh(sharding.MeshConfig(*layout))
  batch, group, prompt_len = 8, 4, 16
  spec = sampling.SamplingSpec(group_size=group, max_new_tokens=40, eos_ids=EOS,
                               cache_phases=2, **SAMPLED)
  params = sharding.abstract_params(CONFIG, mesh)
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, sharding.batch_spec(shape, mesh)))
  with jax.set_mesh(mesh):
    hlo = jax.jit(functools.partial(sampling.rollout, config=CONFIG, spec=spec)).lower(
        params, rows((batch, prompt_len), jnp.int32), rows((batch, prompt_len), jnp.int32),
        jax.random.key(0), rows((batch,), jnp.int32)).compile().as_text()
  summary = dry_run.parse_hlo(hlo, [_IN_LOOP] * 4)
  assert len(summary.unknown_loops) == 2   # two decode phases
  in_loop = [c for c in summary.collectives if c.executions >= _IN_LOOP]
  data, fsdp, tensor = layout
  if tensor == 1:
    assert in_loop == [], in_loop
  else:
    local_rows = batch * group // (data * fsdp)
    # Two per layer per loop, each [local rows, D] float32, within groups of `tensor`.
    assert len(in_loop) == 2 * CONFIG.num_layers * 2, in_loop
    for c in in_loop:
      assert (c.kind, c.group_size) == ("all-reduce", tensor), c
      assert c.bytes == local_rows * CONFIG.hidden_size * 4, c
  # Outside the loops: prefill's gathers plus one gather of the decode weights, for both
  # phases together (not one per phase or step): at most two gathered copies of the
  # params (float32 here, as CONFIG computes).
  gathered = sum(c.total_bytes for c in summary.collectives
                 if c.kind == "all-gather" and c.executions < _IN_LOOP)
  assert gathered <= 2 * 4 * CONFIG.num_params()
