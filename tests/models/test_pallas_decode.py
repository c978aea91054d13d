"""The Pallas decode-attention kernel (`attention.attend_one_pallas`,
`rollout.decode_attention="pallas"`), run by the Pallas interpreter on CPU: parity with the
dense single-query path `_attend_one` and the plain-JAX bounded read `_attend_one_paged`
(prefix or none, grouped queries, float32 and bfloat16, rows reading no block, one block or
all), in both of its grid layouts (the GPU one, which the CPU runs by default, and the TPU
one with prefetched block counts); the backends' tiling rules; and the continuous engine
giving "bounded"'s tokens. Speed is not checked here: interpreted, the kernel is slow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egpo_jax.models import attention
from tests.sampling.test_continuous import CAPS, EOS, _run, params, prompts  # noqa: F401

# b rows, g kv heads, r = H / G query heads per kv head, s own slots in blocks of `block`;
# a prefix of p slots shared by groups of b / bp rows.
B, G, R, HD, S, BLOCK, BP, P = 6, 2, 3, 16, 32, 8, 3, 5
# Own slots per row: none (reads the prefix alone), one block, a partial block, all.
LENS = np.array([0, 8, 3, 32, 17, 1])


def _inputs(dtype=jnp.float32, seed=0, lens=LENS, s=S):
  rs = np.random.RandomState(seed)
  f = lambda *shape: jnp.asarray(rs.randn(*shape), dtype)   # noqa: E731
  mask = jnp.asarray(np.arange(s)[None] < np.asarray(lens)[:, None])
  prefix_mask = jnp.asarray(rs.rand(BP, P) > 0.3).at[:, -1].set(True)
  prefix = (f(BP, G, HD, P), f(BP, G, P, HD), prefix_mask)
  return f(B, G * R, HD), f(B, G, HD, s), f(B, G, s, HD), mask, prefix


def _pallas(backend, block=BLOCK):
  return jax.jit(functools.partial(attention.attend_one_pallas, block=block, backend=backend,
                                   interpret=True))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_pallas_equals_dense_and_paged(dtype, tol, with_prefix):
  q, k, v, mask, prefix = _inputs(dtype)
  lens = LENS
  if not with_prefix:     # every row then needs a valid own key: drop the empty row
    q, k, v, mask, lens, prefix = q[1:], k[1:], v[1:], mask[1:], LENS[1:], None
  rs = jnp.asarray(lens, jnp.int32)
  dense = jax.jit(attention._attend_one)(q, k, v, mask, prefix)
  paged = jax.jit(attention._attend_one_paged, static_argnums=6)(q, k, v, mask, prefix, rs,
                                                                 BLOCK)
  got = _pallas("cpu")(q, k, v, mask, prefix, rs)
  assert got.dtype == dtype and got.shape == q.shape
  f32 = lambda x: np.asarray(x, np.float32)   # noqa: E731
  np.testing.assert_allclose(f32(got), f32(dense), atol=tol, rtol=tol)
  # The plain-JAX bounded read, to rounding (float32; bfloat16 rounds the probabilities
  # before the values' product, at other maxima here: the dense tolerance).
  np.testing.assert_allclose(f32(got), f32(paged), atol=tol, rtol=tol)


def test_pallas_without_jit_and_through_attend():
  """Un-jitted, and as `attend(..., read_kernel="pallas")` (what decode calls)."""
  q, k, v, mask, prefix = _inputs()
  rs = jnp.asarray(LENS, jnp.int32)
  want = jax.jit(attention._attend_one_paged, static_argnums=6)(q, k, v, mask, prefix, rs,
                                                                BLOCK)
  got = attention.attend_one_pallas(q, k, v, mask, prefix, rs, BLOCK, interpret=True)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  got = attention.attend(q, k, v, mask, prefix=prefix, read_slots_B=rs, read_block=BLOCK,
                         read_kernel="pallas")
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="read_kernel"):
    attention.attend(q, k, v, mask, prefix=prefix, read_slots_B=rs, read_kernel="triton")


TPU_LENS = np.array([0, 128, 5, 256, 129, 1])


@pytest.mark.parametrize("backend, s, block, lens, dtype, tol", [
    ("cpu", S, BLOCK, LENS, jnp.float32, 1e-6),
    ("tpu", 256, 128, TPU_LENS, jnp.float32, 1e-6),
    ("tpu", 256, 128, TPU_LENS, jnp.bfloat16, 2e-2)])
def test_pallas_row_reads_only_its_blocks(backend, s, block, lens, dtype, tol):
  """A row's output is bit-identical whatever the other rows read and any extra (masked)
  blocks it reads itself; reading too few blocks drops keys (the bound is really used), in
  both grid layouts (TPU: at a Mosaic-tileable block); the dense path's values."""
  q, k, v, mask, prefix = _inputs(dtype, s=s, lens=lens)
  fn = _pallas(backend, block=block)
  base = fn(q, k, v, mask, prefix, jnp.asarray(lens))
  more = fn(q, k, v, mask, prefix, jnp.asarray(np.where(lens, s, 0)))
  np.testing.assert_array_equal(more, base)
  np.testing.assert_allclose(np.asarray(base, np.float32),
                             np.asarray(jax.jit(attention._attend_one)(q, k, v, mask, prefix),
                                        np.float32),
                             atol=tol, rtol=tol)
  short = fn(q, k, v, mask, prefix, jnp.asarray(np.minimum(lens, block)))
  assert not np.allclose(short[3], base[3]) and np.array_equal(short[1], base[1])
  # Values past a row's blocks are never read: NaN there (a read would multiply it by a
  # zero probability, giving NaN) leaves every output as it was.
  unread = np.arange(s)[None] >= (-(-lens // block) * block)[:, None]
  poisoned = jnp.where(jnp.asarray(unread)[:, None, :, None], jnp.nan, v)
  np.testing.assert_array_equal(fn(q, k, poisoned, mask, prefix, jnp.asarray(lens)), base)


@settings(max_examples=8, deadline=None)
@given(lens=st.lists(st.integers(1, S), min_size=B, max_size=B), seed=st.integers(0, 99))
def test_pallas_equals_dense_any_lengths(lens, seed):
  """Any own lengths (each row's keys its first lens[b] slots), with a prefix."""
  lens = np.asarray(lens)
  q, k, v, mask, prefix = _inputs(seed=seed, lens=lens)
  got = _PALLAS_CPU(q, k, v, mask, prefix, jnp.asarray(lens, jnp.int32))
  np.testing.assert_allclose(got, attention._attend_one(q, k, v, mask, prefix),
                             atol=1e-5, rtol=1e-5)


_PALLAS_CPU = _pallas("cpu")    # one compilation for every hypothesis example


def test_tiling_rules_name_read_block():
  rows = functools.partial(attention.pallas_query_rows, slots=512, head_dim=128, group=7)
  assert rows(backend="tpu", block=128) == 8 and rows(backend="tpu", block=512) == 8
  assert rows(backend="gpu", block=64) == 16 and rows(backend="cpu", block=5) == 7
  assert attention.pallas_query_rows(backend="gpu", block=16, slots=64, head_dim=64,
                                     group=20) == 32
  for backend, block in (("tpu", 64), ("gpu", 24), ("gpu", 8)):
    with pytest.raises(ValueError, match=r"rollout\.read_block"):
      rows(backend=backend, block=block)
  with pytest.raises(ValueError, match="head_dim=80"):
    attention.pallas_query_rows(backend="gpu", block=64, slots=512, head_dim=80, group=7)


def test_pallas_per_device_under_a_mesh(num_devices):
  """`_paged_per_device` runs the kernel per device (rows over the batch axes)."""
  from egpo_jax.models import sharding
  b, s = 8, 16
  rs = np.random.RandomState(1)
  f = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32)   # noqa: E731
  lens = jnp.asarray([0, 3, 16, 9, 1, 4, 12, 7])
  mask = jnp.asarray(np.arange(s)[None] < np.asarray(lens)[:, None])
  prefix = (f(b, G, HD, P), f(b, G, P, HD), jnp.ones((b, P), bool))
  q, k, v = f(b, G * R, HD), f(b, G, HD, s), f(b, G, s, HD)
  want = attention._attend_one(q, k, v, mask, prefix)
  mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))
  fn = jax.jit(lambda *a: attention.attend(*a[:4], prefix=a[5], read_slots_B=a[4],
                                           read_block=4, read_kernel="pallas"))
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(   # noqa: E731
      mesh, sharding.batch_spec(x.shape, mesh)))
  with jax.set_mesh(mesh):
    got = fn(*jax.tree.map(put, (q, k, v, mask, lens, prefix)))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_continuous_pallas_gives_bounded_tokens(params, prompts):  # noqa: F811
  """The continuous engine with decode_attention="pallas" (T - 1 = 15 own slots in blocks
  of 4) samples "bounded"'s tokens and lengths, log-probs to float rounding (the kernel
  folds blocks in online, "bounded" merges a table of them)."""
  runs = [_run(params, prompts, caps_N=CAPS, eos=EOS,
               spec_kwargs=dict(decode_attention=name, attention_block=4))
          for name in ("bounded", "pallas")]
  bounded, pallas = runs
  np.testing.assert_array_equal(pallas.completion_ids_NxT, bounded.completion_ids_NxT)
  np.testing.assert_array_equal(pallas.completion_mask_NxT, bounded.completion_mask_NxT)
  np.testing.assert_array_equal(pallas.lengths_N, bounded.lengths_N)
  np.testing.assert_allclose(pallas.logps_NxT, bounded.logps_NxT, atol=1e-5)
