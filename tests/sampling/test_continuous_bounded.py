"""Bounded decode attention (`ContinuousSpec.decode_attention="bounded"`,
`attention._attend_one_paged`): each slot reads only its used blocks of own cache slots.
Checked against the dense single-query path, for independence from the other rows, and in
the continuous engine for bit-identity under permuted queues and chunking, against the
"full" engine and against teacher forcing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.scenarios.rollout_lengths import fifo_simulation
from egpo_jax.models import attention
from tests.sampling.test_continuous import (CAPS, EOS, G, PROMPT_IDS_B, T, _fields, _run,
                                            _teacher_forced_logits, params, prompts)
from tests.sampling.test_sampler import LOGP_ATOL

BOUNDED = dict(decode_attention="bounded", attention_block=4)   # T - 1 = 15 -> 4 blocks


def _inputs(seed=0, b=5, g=2, r=3, hd=8, s=24, p=7):
  rs = np.random.RandomState(seed)
  f = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32)
  lens = np.array([0, 3, 24, 9, 1])[:b]
  mask = jnp.asarray(np.arange(s)[None] < lens[:, None])
  prefix_mask = jnp.asarray(rs.rand(b, p) > 0.3).at[:, -1].set(True)
  return (f(b, g * r, hd), f(b, g, hd, s), f(b, g, s, hd), mask,
          (f(b, g, hd, p), f(b, g, p, hd), prefix_mask), lens)


@pytest.mark.parametrize("jit", [False, True])
def test_paged_attention_equals_dense(jit):
  q, k, v, mask, prefix, lens = _inputs()
  paged = functools.partial(attention.attend, read_block=4)
  paged = jax.jit(paged) if jit else paged
  want = attention.attend(q, k, v, mask, prefix=prefix)
  got = paged(q, k, v, mask, prefix=prefix, read_slots_B=jnp.asarray(lens))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  # Without a prefix (every row then needs a valid own key: drop the empty row).
  got = paged(q[1:], k[1:], v[1:], mask[1:], read_slots_B=jnp.asarray(lens[1:]))
  want = attention.attend(q[1:], k[1:], v[1:], mask[1:])
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_paged_attention_row_ignores_other_rows_and_extra_blocks():
  """A row's output is bit-identical whatever the other rows read, its place among them,
  and any extra (masked) blocks it reads itself; a 2-row block layout is checked by hand."""
  q, k, v, mask, prefix, lens = _inputs()
  fn = jax.jit(functools.partial(attention.attend, read_block=4))
  base = fn(q, k, v, mask, prefix=prefix, read_slots_B=jnp.asarray(lens))
  more = fn(q, k, v, mask, prefix=prefix, read_slots_B=jnp.asarray(lens + [4, 0, 0, 0, 8]))
  np.testing.assert_array_equal(more, base)
  perm = np.array([3, 1, 4, 0, 2])
  permuted = fn(q[perm], k[perm], v[perm], mask[perm],
                prefix=jax.tree.map(lambda x: x[perm], prefix),
                read_slots_B=jnp.asarray(lens[perm]))
  np.testing.assert_array_equal(permuted, base[perm])
  # Reading too few blocks drops keys: the result changes (the bound is really used).
  short = fn(q, k, v, mask, prefix=prefix, read_slots_B=jnp.asarray(np.minimum(lens, 4)))
  assert not np.allclose(short[2], base[2]) and np.array_equal(short[1], base[1])


def test_paged_attention_bad_block_raises():
  q, k, v, mask, prefix, lens = _inputs()
  with pytest.raises(ValueError, match="read_block"):
    attention.attend(q, k, v, mask, prefix=prefix, read_slots_B=jnp.asarray(lens),
                     read_block=5)


@pytest.fixture(scope="module")
def bounded_run(params, prompts):
  return _run(params, prompts, caps_N=CAPS, eos=EOS, spec_kwargs=BOUNDED)


def test_bounded_bit_identical_whatever_slot_neighbours_start_and_order(
    params, prompts, bounded_run):
  n = len(CAPS)
  order = np.random.default_rng(0).permutation(n)
  permuted = _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=order, spec_kwargs=BOUNDED)
  assert not np.array_equal(permuted.finish_step_N, bounded_run.finish_step_N)
  chunked = _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=order[::-1].copy(),
                 chunk_steps=3, on_finished=lambda *a: None, spec_kwargs=BOUNDED)
  for other in (permuted, chunked):
    for got, want in zip(_fields(other), _fields(bounded_run)):
      np.testing.assert_array_equal(got, want)


def test_bounded_equals_teacher_forcing_and_full(params, prompts, bounded_run):
  """Log-probs within LOGP_ATOL of teacher forcing; with no near-tie (the seed-3,
  temperature-0.9 fixture of test_continuous) the same tokens as the "full" engine."""
  ids, mask = prompts
  out = bounded_run
  logits = _teacher_forced_logits(params, ids, mask, out)
  logp = jax.nn.log_softmax(logits, -1)
  want = np.take_along_axis(np.asarray(logp), out.completion_ids_NxT[..., None], -1)[..., 0]
  valid = out.completion_mask_NxT
  np.testing.assert_allclose(out.logps_NxT[valid], want[valid], atol=LOGP_ATOL)
  kw = dict(slots=7, eos=EOS, seed=3, temperature=0.9)
  full = _run(params, prompts, **kw)
  bounded = _run(params, prompts, spec_kwargs=BOUNDED, **kw)
  np.testing.assert_array_equal(bounded.completion_ids_NxT, full.completion_ids_NxT)
  np.testing.assert_array_equal(bounded.lengths_N, full.lengths_N)
  np.testing.assert_allclose(bounded.logps_NxT, full.logps_NxT, atol=LOGP_ATOL)


def test_bounded_steps_equal_fifo_simulation(bounded_run, params, prompts):
  out = _run(params, prompts, slots=3, caps_N=CAPS, spec_kwargs=BOUNDED)
  assert (int(out.num_steps), int(out.busy_slot_steps)) == (fifo_simulation(CAPS, 3)[0],
                                                            CAPS.sum())


def test_one_block_reads_as_full(params, prompts):
  """T - 1 = 15 own slots in one 64-slot block: nothing to skip, the "full" path runs."""
  full = _run(params, prompts, caps_N=CAPS, eos=EOS)
  one = _run(params, prompts, caps_N=CAPS, eos=EOS,
             spec_kwargs=dict(decode_attention="bounded"))
  for got, want in zip(_fields(one), _fields(full)):
    np.testing.assert_array_equal(got, want)


def _paged_case(seed):
  """8 rows of 0-16 used slots (of 16) after a 5-slot prefix, 2 kv heads of 2 queries:
  (q, k, v, mask, lens, prefix) and the dense path's output."""
  rs = np.random.RandomState(seed)
  b, g, r, hd, s, p = 8, 2, 2, 8, 16, 5
  f = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32)   # noqa: E731
  lens = jnp.asarray([0, 3, 16, 9, 1, 4, 12, 7])
  mask = jnp.asarray(np.arange(s)[None] < np.asarray(lens)[:, None])
  prefix = (f(b, g, hd, p), f(b, g, p, hd), jnp.ones((b, p), bool))
  q, k, v = f(b, g * r, hd), f(b, g, hd, s), f(b, g, s, hd)
  return (q, k, v, mask, lens, prefix), attention.attend(q, k, v, mask, prefix=prefix)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_paged_attention_per_device_under_a_mesh(num_devices, mesh_shape):
  """Under a mesh each device visits only its own rows' blocks (`_paged_per_device`):
  equal to the dense path, and the compiled program moves no key or value block. Traced
  globally, the pair list's gathers became an all-reduce of the gathered blocks (the used
  cache over the network every step)."""
  from egpo_jax.models import sharding
  from egpo_jax.training import dry_run
  (q, k, v, mask, lens, prefix), want = _paged_case(1)
  g, hd = k.shape[1], k.shape[2]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  paged = jax.jit(lambda *a: attention.attend(*a[:4], prefix=a[5], read_slots_B=a[4],
                                              read_block=4))
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(   # noqa: E731
      mesh, sharding.batch_spec(x.shape, mesh)))
  with jax.set_mesh(mesh):
    args = jax.tree.map(put, (q, k, v, mask, lens, prefix))
    got = paged(*args)
    hlo = paged.lower(*args).compile().as_text()
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  block_bytes = g * hd * 4 * 4    # one row's key block
  moved = [c for c in dry_run.parse_hlo(hlo).collectives if c.bytes >= block_bytes]
  assert not moved, moved[:3]


def test_paged_attention_inside_a_callers_shard_map(num_devices):
  """Inside a caller's `jax.shard_map` (rows already per device: manual mesh axes) the
  paged read runs on the blocks it is given (`sharding.per_device_mesh` is None there)
  and equals the dense path. The caller turns off check_vma, as the project's own
  per-device wrappers do: the read's loop carries start unvarying."""
  from egpo_jax.models import sharding
  args, want = _paged_case(2)
  mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
  specs = jax.tree.map(lambda x: sharding.batch_spec(x.shape, mesh), args)
  local = lambda *a: attention.attend(*a[:4], prefix=a[5], read_slots_B=a[4],  # noqa: E731
                                      read_block=4)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=specs[0],
                                check_vma=False))(*args)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
