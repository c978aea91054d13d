"""Tests for egpo_jax.sampling.continuous (continuous batching) on a tiny random Qwen2:
bit-identity whatever the slot, neighbours, start step or queue order; exactness against
teacher forcing and the static sampler; caps, stop ids, chunking, FIFO utilisation."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.scenarios.rollout_lengths import draw_caps, fifo_simulation
from egpo_jax import sampling
from egpo_jax.models import sharding, transformer
from egpo_jax.sampling import continuous, engine
from tests.sampling.test_sampler import CONFIG, LOGP_ATOL, _prompts, _while_bodies

T, G = 16, 4
LENGTHS = [3, 9, 14, 6, 1, 12]          # 6 prompts x 4 samples = 24 responses
EOS = (5, 17)
PROMPT_IDS_B = np.arange(200, 206)


@pytest.fixture(scope="module")
def params():
  # 10x the init scale, as in test_sampler: peaked logits, few near-ties.
  base = transformer.init_params(CONFIG, jax.random.key(0))
  return jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, base)


@pytest.fixture(scope="module")
def prompts():
  return _prompts(LENGTHS, seed=3)


def _spec(slots, eos=(), spec_kwargs=None, **kwargs):
  return continuous.ContinuousSpec(
      sampling=engine.SamplingSpec(group_size=G, max_new_tokens=T, eos_ids=eos, **kwargs),
      slots=slots, **(spec_kwargs or {}))


def _run(params, prompts, slots=5, eos=(), seed=1, spec_kwargs=None, **kwargs):
  ids, mask = prompts
  sampling_kwargs = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p")
                     if k in kwargs}
  return jax.device_get(continuous.generate(
      params, ids, mask, jax.random.key(seed), config=CONFIG,
      spec=_spec(slots, eos, spec_kwargs, **sampling_kwargs), prompt_ids_B=PROMPT_IDS_B,
      **kwargs))


CAPS = draw_caps(len(LENGTHS) * G, T, seed=4)


@pytest.fixture(scope="module")
def capped_run(params, prompts):
  return _run(params, prompts, caps_N=CAPS, eos=EOS)


def _fields(out):
  return (out.completion_ids_NxT, out.completion_mask_NxT, out.logps_NxT, out.lengths_N,
          out.truncated_N)


def test_bit_identical_whatever_slot_neighbours_start_and_order(params, prompts, capped_run):
  """Permuted queues put each response in another slot, beside other responses, from
  another step; chunked runs stop and resume the loop; reruns repeat. All bit-equal."""
  n = len(CAPS)
  for seed in (0, 1):
    order = np.random.default_rng(seed).permutation(n)
    out = _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=order)
    assert not np.array_equal(out.finish_step_N, capped_run.finish_step_N)
    for got, want in zip(_fields(out), _fields(capped_run)):
      np.testing.assert_array_equal(got, want)
  reported = []
  chunked = _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=order, chunk_steps=3,
                 on_finished=lambda r, ids, lens: reported.append((r, ids, lens)))
  rerun = _run(params, prompts, caps_N=CAPS, eos=EOS)
  for other in (chunked, rerun):
    for got, want in zip(_fields(other), _fields(capped_run)):
      np.testing.assert_array_equal(got, want)
  # Every response reported once, with its final tokens and length, over several chunks.
  resp = np.concatenate([r for r, _, _ in reported])
  assert sorted(resp.tolist()) == list(range(n)) and len(reported) > 2
  for r, ids, lens in reported:
    np.testing.assert_array_equal(lens, capped_run.lengths_N[r])
    np.testing.assert_array_equal(ids, capped_run.completion_ids_NxT[r])


def test_caps_and_stop_ids(capped_run):
  out = capped_run
  ids = out.completion_ids_NxT
  is_stop = np.isin(ids, EOS) & out.completion_mask_NxT
  stopped = is_stop.any(1)
  # A response ends at its first stop token, else at its cap (then truncated).
  assert stopped.any() and (~stopped).any()
  first = np.argmax(is_stop, axis=1) + 1
  np.testing.assert_array_equal(out.lengths_N, np.where(stopped, np.minimum(first, CAPS),
                                                        CAPS))
  np.testing.assert_array_equal(out.truncated_N, ~stopped)
  assert (out.lengths_N <= CAPS).all()
  masked = ~out.completion_mask_NxT
  assert (ids[masked] == 0).all() and (out.logps_NxT[masked] == 0).all()


def _teacher_forced_logits(params, ids, mask, out):
  prompt_ids = np.repeat(ids, G, axis=0)
  prompt_mask = np.repeat(mask, G, axis=0)
  full = np.concatenate([prompt_ids, out.completion_ids_NxT], axis=1)
  full_mask = np.concatenate([prompt_mask, out.completion_mask_NxT.astype(np.int32)], 1)
  logits = jax.jit(functools.partial(transformer.forward, config=CONFIG))(
      params, full, full_mask)
  return np.asarray(logits[:, ids.shape[1] - 1:-1], np.float64)


def test_tokens_are_inverse_cdf_choices_of_teacher_forced_probs(params, prompts, capped_run):
  """Each token is the first whose teacher-forced CDF exceeds its uniform, except where
  the uniform lies within 1e-4 of a CDF boundary; log-probs match within LOGP_ATOL."""
  ids, mask = prompts
  out = capped_run
  logits = _teacher_forced_logits(params, ids, mask, out)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  cdf = np.cumsum(probs, -1)
  keys = engine.response_keys(jax.random.key(1), jnp.asarray(PROMPT_IDS_B), G)
  u = np.asarray(engine.step_uniforms(keys, T), np.float64)
  valid = out.completion_mask_NxT
  choice = (cdf <= u[..., None]).sum(-1)
  margin = np.abs(cdf - u[..., None]).min(-1)
  checked = valid & (margin > 1e-4)
  assert checked.sum() > 0.9 * valid.sum()
  np.testing.assert_array_equal(out.completion_ids_NxT[checked], choice[checked])
  logp = np.log(np.take_along_axis(probs, out.completion_ids_NxT[..., None], -1))[..., 0]
  np.testing.assert_allclose(out.logps_NxT[valid], logp[valid], atol=LOGP_ATOL)


def test_equals_static_sampler_without_near_ties(params, prompts):
  """No caps below T, EOS on, temperature 0.9: the static sampler's tokens and log-probs.

  The fixture (seed 3, found by trying seeds 1-11) has no uniform within 5e-5 of a
  teacher-forced CDF boundary; both samplers decode with the KV cache in float32 and
  differ by ~1e-6 in probability, so no token can flip."""
  ids, mask = prompts
  kw = dict(temperature=0.9)
  seed = 3
  ours = _run(params, prompts, slots=7, eos=EOS, seed=seed, **kw)
  static = jax.device_get(sampling.generate(
      params, ids, mask, jax.random.key(seed), config=CONFIG, group_size=G,
      max_new_tokens=T, eos_ids=EOS, prompt_ids_B=PROMPT_IDS_B, **kw))
  logits = _teacher_forced_logits(params, ids, mask, static) / 0.9
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
  keys = engine.response_keys(jax.random.key(seed), jnp.asarray(PROMPT_IDS_B), G)
  u = np.asarray(engine.step_uniforms(keys, T), np.float64)
  margin = np.abs(cdf - u[..., None]).min(-1)
  assert (margin[static.completion_mask_NxT] > 5e-5).all(), "fixture has a near-tie"
  np.testing.assert_array_equal(ours.completion_ids_NxT, static.completion_ids_NxT)
  np.testing.assert_array_equal(ours.completion_mask_NxT, static.completion_mask_NxT)
  np.testing.assert_array_equal(ours.truncated_N, static.truncated_N)
  np.testing.assert_allclose(ours.logps_NxT, static.logps_NxT, atol=LOGP_ATOL)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_steps_and_utilisation_equal_fifo_simulation(params, prompts, slots):
  """Without stop tokens responses end at their caps: the engine runs exactly the FIFO
  simulation's steps and slot-steps (no step lost to a refill)."""
  out = _run(params, prompts, slots=slots, caps_N=CAPS)
  steps, util = fifo_simulation(CAPS, slots)
  assert int(out.num_steps) == steps
  assert int(out.busy_slot_steps) == CAPS.sum()
  assert float(out.busy_slot_steps) / (slots * int(out.num_steps)) == pytest.approx(util)


def test_fifo_simulation_hand_computed():
  # Two slots: caps 3, 1, 1, 2 -> slot A: 3; slot B: 1, 1 (steps 1-2), then 2 (3-4).
  assert fifo_simulation(np.array([3, 1, 1, 2]), 2) == (4, 7 / 8)
  assert fifo_simulation(np.array([5, 5]), 4) == (5, 10 / 20)


def test_pure_rollout_under_jit_equals_generate(params, prompts, capped_run):
  ids, mask = prompts
  bucket = engine.bucket_length(ids.shape[1])
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  fn = jax.jit(functools.partial(continuous.rollout, config=CONFIG, spec=_spec(5, EOS)))
  out = jax.device_get(fn(params, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1),
                          jnp.asarray(PROMPT_IDS_B), jnp.asarray(CAPS),
                          jnp.arange(len(CAPS))))
  for got, want in zip(_fields(out), _fields(capped_run)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec_kwargs", [
    {}, dict(decode_attention="bounded", attention_block=4, table_entries=2)])
def test_sharded_mesh_matches_single_device(params, prompts, num_devices, spec_kwargs):
  ids, mask = prompts
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2, tensor=1))
  with jax.set_mesh(mesh):
    sharded = sharding.shard_params(params, mesh)
    out = continuous.generate(sharded, np.asarray(ids), np.asarray(mask), jax.random.key(1),
                              config=CONFIG, spec=_spec(8, EOS, spec_kwargs), caps_N=CAPS,
                              prompt_ids_B=PROMPT_IDS_B)
  assert out.logps_NxT.sharding.shard_shape(out.logps_NxT.shape)[0] < len(CAPS)
  out = jax.device_get(out)
  want = _run(params, prompts, slots=8, caps_N=CAPS, eos=EOS, spec_kwargs=spec_kwargs)
  np.testing.assert_array_equal(out.completion_ids_NxT, want.completion_ids_NxT)
  np.testing.assert_array_equal(out.lengths_N, want.lengths_N)
  np.testing.assert_allclose(out.logps_NxT, want.logps_NxT, atol=LOGP_ATOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(caps_N=np.zeros(24, np.int32)), "caps_N"),
    (dict(caps_N=np.full(24, T + 1)), "caps_N"),
    (dict(order_N=np.zeros(24, np.int32)), "order_N"),
])
def test_bad_arguments_raise(params, prompts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _run(params, prompts, **kwargs)


def test_bad_spec_raises():
  with pytest.raises(ValueError, match="slots"):
    _spec(0)


@pytest.mark.parametrize("spec_kwargs", [
    {}, dict(decode_attention="bounded", attention_block=4), dict(table_entries=2),
    dict(decode_attention="bounded", attention_block=4, table_entries=2)])
def test_decode_loop_copies_no_cache(params, prompts, spec_kwargs):
  """The compiled loop body writes each layer's cache in place: no copy of a [S, kv heads,
  head_dim, own] or [S, kv heads, own, head_dim] buffer, own = T - 1 (16 for bounded
  attention's whole blocks; a refill that wrote the prompt into the slots made XLA copy
  every layer's cache at every step), nor of a 2-entry prompt table's layers (written in
  place by the in-loop prefill)."""
  ids, mask = prompts
  spec, slots = _spec(5, EOS, spec_kwargs), 5
  own = spec.own_slots
  bucket = engine.bucket_length(ids.shape[1])
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  caps, order = jnp.asarray(CAPS), jnp.arange(len(CAPS))
  table, keys, state = continuous._start_jit(
      params, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1),
      jnp.asarray(PROMPT_IDS_B), caps, order, config=CONFIG, spec=spec, cache_dtype=None)
  entries = spec.table_entries
  prompts_arg = (jnp.asarray(np.pad(ids, pad)), jnp.asarray(np.pad(mask, pad)))
  hlo = continuous._run_jit.lower(params, state.replace(cache=None), state.cache, table,
                                  keys, caps, order, jnp.int32(10), config=CONFIG,
                                  spec=spec, prompts=prompts_arg if entries else None
                                  ).compile().as_text()
  kv, hd = CONFIG.num_kv_heads, CONFIG.head_size
  shapes = (f"f32[{slots},{kv},{hd},{own}]", f"f32[{slots},{kv},{own},{hd}]")
  if entries:
    assert state.table.mask_BxP.shape == (entries, bucket)
    shapes += (f"f32[{entries},{kv},{hd},{bucket}]", f"f32[{entries},{kv},{bucket},{hd}]")
  bodies = _while_bodies(hlo)
  assert any(shapes[0] in b for b in bodies)     # the cache is carried by a loop
  copies = [line for b in bodies for line in b.splitlines()
            if " copy(" in line and any(s in line for s in shapes)]
  assert not copies, copies[:2]


@pytest.mark.parametrize("spec_kwargs", [{}, dict(decode_attention="bounded", attention_block=4)])
def test_bf16_loop_holds_no_float32_cache_or_table_and_gathers_once(params, prompts,
                                                                    num_devices, spec_kwargs):
  """bf16 on a data 4 x fsdp 2 mesh: the slots' cache and the prompt table are carried as
  uint16 bits (`continuous._bits`), so the compiled chunk has no float32 (nor uint16 copy)
  array of a whole layer's cache or table (XLA:CPU had upcast each layer's whole cache
  for the per-slot write); the table comes whole from the prefill, so the chunk gathers
  no table entry, and the FSDP-split weights are gathered before the loop, not in it."""
  cfg = dataclasses.replace(CONFIG, dtype="bfloat16")
  ids, mask = prompts
  spec, slots = _spec(8, EOS, spec_kwargs), 8
  bucket = engine.bucket_length(ids.shape[1])
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  caps, order = jnp.asarray(CAPS), jnp.arange(len(CAPS))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2, tensor=1))
  with jax.set_mesh(mesh):
    sharded = sharding.shard_params(params, mesh)
    table, keys, state = continuous._start_jit(
        sharded, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1),
        jnp.asarray(PROMPT_IDS_B), caps, order, config=cfg, spec=spec, cache_dtype=None)
    assert state.cache.k[0].dtype == table.k[0].dtype == jnp.uint16
    assert table.dtype == jnp.bfloat16
    assert table.k[0].sharding.shard_shape(table.k[0].shape) == table.k[0].shape   # whole
    hlo = continuous._run_jit.lower(sharded, state.replace(cache=None), state.cache, table,
                                    keys, caps, order, jnp.int32(10), config=cfg, spec=spec
                                    ).compile().as_text()
  kv, hd, own, b = cfg.num_kv_heads, cfg.head_size, spec.own_slots, len(LENGTHS)
  cache = (rf"\[\d+,{kv},{hd},{own}\]", rf"\[\d+,{kv},{own},{hd}\]")   # a layer's, per device
  # The whole table's layer in float32 (each slot's gathered entry is read in f32 by the
  # CPU's dots, one layer at a time: [1, ...] here).
  widened = re.findall(rf"f32\[{b},{kv},({hd},{bucket}|{bucket},{hd})\]", hlo)
  assert not widened, widened[:2]
  bodies = _while_bodies(hlo)
  # The per-slot write: in place on the carried bits, no float32 scatter or uint16 copy.
  writes = [line for b_ in bodies for line in b_.splitlines() for c in cache
            if re.search(r"(f32|u16)" + c + r"[^=]*= .*(scatter|copy|bitcast-convert)\(",
                         line) and not line.lstrip().startswith(("ROOT", "%fused"))]
  assert not [w for w in writes if "f32" in w.split("=")[0] or "copy(" in w], writes[:2]
  # Per step only the logits and each slot's new key / value (its scatter's update, [S,
  # kv heads, head_dim]) are gathered: no weight, no table entry.
  gathered = [(m.group(1), [int(d) for d in m.group(2).split(",")]) for b_ in bodies
              for m in re.finditer(r"= (f32|bf16|u16)\[([\d,]+)\][^ ]* all-gather", b_)]
  gathers = [g for g in gathered if np.prod(g[1]) > slots * kv * hd
             and g[1][-1] != cfg.vocab_size]
  assert not gathers, gathers[:2]
