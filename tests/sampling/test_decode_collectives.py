"""The continuous engine's decode loop moves no row-scaled data between devices except
the per-layer all-reduces of tensor parallelism (issue 25's decode-collectives rule).

Compiled on 8 fake devices (`continuous._run_jit`, collectives read by
`dry_run.parse_hlo`): with tensor = 2 every collective in the loop body is either an
all-reduce of [local rows, D] (o_proj and down_proj per layer, and the lookup in the
vocabulary-split embedding) or a few scalars per row (state bookkeeping, the sampler's
per-row max / sums / token); with tensor = 1 only the latter. Before
`filters._sample_vocab_split` and `transformer._write_rows`, the body gathered the
[rows, V] logits over `tensor` and every row's new keys and values over the batch axes.
And the tensor-parallel engine draws the tokens of the single-device one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.models import config as model_config
from egpo_jax.models import sharding, transformer
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import dry_run
from tests.sampling.test_sampler import LOGP_ATOL

# V = 288: 9 inverse-CDF blocks of 32, which 2 devices cannot split evenly (GSPMD then
# gathered the logits, as for Qwen's 152,064 = 297 x 512); head_dim 16.
CONFIG = model_config.ModelConfig(vocab_size=288, hidden_size=64, intermediate_size=128,
                                  num_layers=2, num_heads=4, num_kv_heads=2,
                                  max_position_embeddings=256)
SLOTS, G, T, B, P = 16, 4, 8, 6, 16
EOS = (5,)
# A collective of fewer bytes than this per slot (of all SLOTS) is per-row bookkeeping:
# four 4-byte scalars. One row's new keys for one kv head (16 x 4 bytes) or its logits
# (288 x 4) are far more.
SCALAR_BYTES_PER_ROW = 16
LOOP = 1000   # the trip count given to the decode loop (XLA cannot prove it)


def _spec(spec_kwargs, **sampling):
  return continuous.ContinuousSpec(
      sampling=engine.SamplingSpec(group_size=G, max_new_tokens=T, eos_ids=EOS,
                                   return_entropy=True, **sampling),
      slots=SLOTS, **spec_kwargs)


@pytest.fixture(scope="module")
def params():
  # 10x the init scale (as test_continuous): peaked logits, few near-ties.
  base = transformer.init_params(CONFIG, jax.random.key(0))
  return jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, base)


def _prompts():
  rng = np.random.default_rng(2)
  ids = rng.integers(6, CONFIG.vocab_size, (B, P)).astype(np.int32)
  mask = np.ones((B, P), np.int32)
  mask[1, :5] = mask[3, :11] = mask[4, :2] = 0
  return np.where(mask == 1, ids, 0), mask


def _in_loop_collectives(params, mesh_config, spec):
  ids, mask = _prompts()
  caps, order = jnp.full((B * G,), T, jnp.int32), jnp.arange(B * G, dtype=jnp.int32)
  mesh = sharding.make_mesh(mesh_config)
  with jax.set_mesh(mesh):
    sharded = sharding.shard_params(params, mesh)
    table, keys, state = continuous._start_jit(
        sharded, ids, mask, jax.random.key(1), jnp.arange(B), caps, order, config=CONFIG,
        spec=spec, cache_dtype=None)
    hlo = continuous._run_jit.lower(sharded, state.replace(cache=None), state.cache, table,
                                    keys, caps, order, jnp.int32(10), config=CONFIG,
                                    spec=spec).compile().as_text()
  summary = dry_run.parse_hlo(hlo, unknown_trip_counts=[LOOP] * 8)
  return [c for c in summary.collectives if c.executions >= LOOP]


_SPECS = [{}, dict(decode_attention="bounded", attention_block=4)]


# "pallas" (the Pallas interpreter on CPU) compiles as quickly; running it is slow.
@pytest.mark.parametrize("spec_kwargs", _SPECS + [dict(decode_attention="pallas",
                                                       attention_block=4)])
@pytest.mark.parametrize("tensor", [2, 1])
def test_loop_moves_only_per_layer_all_reduces_and_per_row_scalars(params, num_devices,
                                                                   tensor, spec_kwargs):
  mesh_config = (sharding.MeshConfig(data=4, fsdp=1, tensor=2) if tensor == 2
                 else sharding.MeshConfig(data=4, fsdp=2, tensor=1))
  inside = _in_loop_collectives(params, mesh_config, _spec(spec_kwargs))
  assert inside, "no collective found in the decode loop: the test reads nothing"
  local_rows = SLOTS * tensor // num_devices
  activation = local_rows * CONFIG.hidden_size * 4   # [local rows, D] float32
  per_layer = [c for c in inside if c.kind == "all-reduce" and c.bytes == activation]
  rest = [c for c in inside if c not in per_layer]
  big = [(c.kind, c.bytes, c.op_name) for c in rest
         if c.bytes >= SCALAR_BYTES_PER_ROW * SLOTS]
  assert not big, big
  if tensor == 1:
    assert not per_layer, [(c.kind, c.bytes, c.op_name) for c in per_layer]
  else:
    # o_proj and down_proj of each layer, and the embedding lookup (its table is split
    # over the vocabulary, as the head it is tied to or sits beside).
    assert len(per_layer) == 2 * CONFIG.num_layers + 1, [c.op_name for c in per_layer]
    assert sum("_take" in c.op_name for c in per_layer) == 1


def _teacher_forced_margin(params, ids, mask, out, temperature, uniforms_NxT):
  """Per sampled token: distance of its uniform to the nearest float64 CDF boundary of
  the teacher-forced distribution."""
  full = np.concatenate([np.repeat(ids, G, 0), out.completion_ids_NxT], 1)
  full_mask = np.concatenate([np.repeat(mask, G, 0), out.completion_mask_NxT.astype(np.int32)],
                             1)
  logits = jax.jit(functools.partial(transformer.forward, config=CONFIG))(params, full,
                                                                         full_mask)
  z = np.asarray(logits[:, ids.shape[1] - 1:-1], np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
  return np.abs(cdf - uniforms_NxT[..., None]).min(-1)


@pytest.mark.parametrize("spec_kwargs", _SPECS)
def test_tensor_parallel_tokens_equal_single_device(params, num_devices, spec_kwargs):
  """Temperature 0.7 on data 4 x tensor 2, 24 responses of drawn caps through 16 slots:
  the tokens of the single-device engine (the fixture, seed 9 of 1-12, is asserted free
  of near-ties: no uniform within 5e-5 of a teacher-forced CDF boundary), log-probs and
  entropy within LOGP_ATOL."""
  ids, mask = _prompts()
  seed, temperature = 9, 0.7
  caps = np.random.default_rng(0).integers(2, T + 1, B * G)
  run = functools.partial(continuous.generate, rng=jax.random.key(seed), config=CONFIG,
                          spec=_spec(spec_kwargs, temperature=temperature), caps_N=caps)
  want = jax.device_get(run(params, ids, mask))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=1, tensor=2))
  with jax.set_mesh(mesh):
    got = jax.device_get(run(sharding.shard_params(params, mesh), ids, mask))
  keys = engine.response_keys(jax.random.key(seed), jnp.arange(B), G)
  uniforms = np.asarray(engine.step_uniforms(keys, T), np.float64)
  margin = _teacher_forced_margin(params, ids, mask, want, temperature, uniforms)
  assert (margin[want.completion_mask_NxT] > 5e-5).all(), "fixture has a near-tie"
  assert int(want.num_steps) > T   # slots were refilled
  np.testing.assert_array_equal(got.completion_ids_NxT, want.completion_ids_NxT)
  np.testing.assert_array_equal(got.lengths_N, want.lengths_N)
  np.testing.assert_allclose(got.logps_NxT, want.logps_NxT, atol=LOGP_ATOL)
  np.testing.assert_allclose(got.entropy_NxT, want.entropy_NxT, atol=LOGP_ATOL)


@pytest.mark.parametrize("layout", [(4, 1, 2), (2, 2, 2), (8, 1, 1)])
def test_per_row_cache_write_per_device_is_bit_identical(num_devices, layout):
  """`transformer._write_rows` under a mesh (rows over the batch axes, kv heads over
  tensor) writes the same bits as without one: bf16 keys, values and the mask, each row
  at its own slot."""
  rng = np.random.default_rng(1)
  rows, kv, hd, slots = 8, 2, 4, 6
  k = jnp.asarray(rng.normal(size=(rows, kv, hd, slots)), jnp.bfloat16)
  v = jnp.asarray(rng.normal(size=(rows, kv, slots, hd)), jnp.bfloat16)
  mask = jnp.asarray(rng.random((rows, slots)) < 0.5)
  index = jnp.asarray(rng.integers(0, slots, rows), jnp.int32)
  new = jnp.asarray(rng.normal(size=(rows, kv, hd)), jnp.bfloat16)
  write = jax.jit(lambda k, v, mask, index, new: (
      transformer._write_rows(k, index, new, 3), transformer._write_rows(v, index, new, 2),
      transformer._write_rows(mask, index, jnp.ones((rows,), bool), 1)))
  want = jax.device_get(write(k, v, mask, index, new))
  np.testing.assert_array_equal(want[0][np.arange(rows), :, :, index], new)
  np.testing.assert_array_equal(want[1][np.arange(rows), :, index], new)
  assert want[2][np.arange(rows), index].all()
  mesh = sharding.make_mesh(sharding.MeshConfig(*layout))
  with jax.set_mesh(mesh):
    got = jax.device_get(write(k, v, mask, index, new))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))
