"""Compile-only memory check of the chunked log-probs at Qwen2.5 size (nothing allocated).

The policy loss and its gradient w.r.t. hidden states and the output embedding, for
N = 2 responses of T = 4,096 tokens, V = 151,936, D = 1,536: XLA's buffer assignment
(`memory_analysis().temp_size_in_bytes`) of the chunked path against full logits; and
that the chunks stay sharded when the rows are (data parallel under jit).
"""

import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from egpo_jax.core.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs, token_logprobs_unchunked
from egpo_jax.core.losses import policy_loss

N, T, V, D = 2, 4096, 151_936, 1536
GB = 1e9


def _compile(logprob_fn, dtype, with_grad):
  def loss(hidden, emb, targets, old, adv, mask):
    return policy_loss(logprob_fn(hidden, emb, targets), old, adv, mask)[0]

  fn = jax.value_and_grad(loss, argnums=(0, 1)) if with_grad else loss
  s = jax.ShapeDtypeStruct
  args = (s((N, T, D), dtype), s((V, D), dtype), s((N, T), jnp.int32),
          s((N, T), jnp.float32), s((N,), jnp.float32), s((N, T), jnp.float32))
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_grad", [True, False])
def test_chunked_needs_4x_less_temporary_memory(dtype, with_grad):
  chunked, t_chunked = _compile(token_logprobs, dtype, with_grad)
  full, t_full = _compile(token_logprobs_unchunked, dtype, with_grad)
  logits_bytes = N * T * V * 4
  print(f"{jnp.dtype(dtype).name} grad={with_grad}: chunked {chunked / GB:.2f} GB "
        f"({t_chunked:.1f} s to compile), unchunked {full / GB:.2f} GB ({t_full:.1f} s), "
        f"ratio {full / chunked:.1f}")
  assert full >= logits_bytes, "the reference should hold the full float32 logits"
  assert 4 * chunked <= full, (chunked, full)
  # Bounded by chunk buffers plus a float32 V x D gradient accumulator, not by N*T:
  # a few chunk_size x V float32 arrays and the accumulator.
  bound = 4 * DEFAULT_CHUNK_SIZE * V * 4 + (V * D * 4 if with_grad else 0)
  assert chunked <= bound, (chunked, bound)
  # Generous: about 1 s each on an idle core; the CI machine is shared.
  assert t_chunked < 60 and t_full < 60


def test_data_parallel_chunks_stay_sharded(num_devices):
  """Rows sharded over 8 devices under jit: each device computes 1/8 of every chunk.

  Chunks are strided over the rows, so a chunk spans all devices; contiguous chunks
  would put each chunk on one device and make the others gather and recompute it.
  """
  n, t, v, d = num_devices, 512, 4000, 64
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def loss(hidden, emb, targets):
    return jnp.sum(token_logprobs(hidden, emb, targets, chunk_size=512))

  s = jax.ShapeDtypeStruct
  args = (s((n, t, d), jnp.float32), s((v, d), jnp.float32), s((n, t), jnp.int32))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
  sharded = jax.jit(grad_fn, in_shardings=(rows, replicated, rows)).lower(*args).compile()
  single = jax.jit(grad_fn).lower(*args).compile()
  per_device = sharded.memory_analysis().temp_size_in_bytes
  whole = single.memory_analysis().temp_size_in_bytes
  assert 3 * per_device <= whole, (per_device, whole)
  assert "all-gather" not in sharded.as_text()
