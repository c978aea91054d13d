"""Attention implementations (egpo_jax/models/attention.py), one decoder layer's attention
forward + backward (value and gradients w.r.t. q, k, v) at Qwen2.5-Math-1.5B's heads
(12 query heads, 2 kv heads, head_dim 128), causal, left-padded rows.

Memory rows: XLA's temporary buffers (`memory_analysis().temp_size_in_bytes`) per row at
L = 4,096, compiled from abstract shapes, never run; "cudnn" and "splash" compile only on
their backends (GPU / TPU) and are listed as such elsewhere. Timed rows: the same
function on a size that runs on a CPU, blockwise against the reference, alternated in one
process, with the largest difference to the reference (query rows with a valid key).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from egpo_jax.models import attention

HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128

NOTES = """
The reference materialises float32 scores [rows, kv heads, (H / kv) x T, S] (805 MB per row
at L = 4,096) and, in its recomputing backward, the probabilities and their gradient beside
them; blockwise holds one [rows, kv heads, (H / kv) x 256, 256] block of each at a time plus
the float32 accumulators of dQ, so its temporaries grow with L, not L^2. On a CPU it is also
faster at L = 1,024: it visits only the key blocks at or before each query block (10 of 16
block pairs at 4 blocks), where the reference computes and masks the whole square.
"""


def _loss_and_grads(implementation, block=None):
  def loss(q, k, v, mask, w):
    if implementation == "blockwise" and block is not None:
      out = attention.attend_blockwise(q, k, v, mask, block)
    else:
      out = attention.attend(q, k, v, mask, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) * w)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _implementations():
  backend = jax.default_backend()
  names = ["reference", "blockwise"]
  if backend == "gpu":
    names.append("cudnn")
  if backend == "tpu":
    names.append("splash")
  return names


def _memory_rows(rows, length, dtype) -> list[harness.Row]:
  s = jax.ShapeDtypeStruct
  args = (s((rows, length, HEADS, HEAD_DIM), dtype), s((rows, length, KV_HEADS, HEAD_DIM), dtype),
          s((rows, length, KV_HEADS, HEAD_DIM), dtype), s((rows, length), jnp.bool_),
          s((rows, length, HEADS, HEAD_DIM), jnp.float32))
  out, base = [], None
  for name in _implementations():
    if name == "cudnn" and jnp.dtype(dtype) == jnp.float32:
      continue
    start = time.perf_counter()
    temp = _loss_and_grads(name).lower(*args).compile().memory_analysis().temp_size_in_bytes
    base = base or temp
    out.append(harness.Row(
        name=f"memory {jnp.dtype(dtype).name} rows={rows} L={length}: {name}", seconds=None,
        extra={"temp GB": round(temp / 1e9, 4), "reference / this": round(base / temp, 1),
               "compile s": round(time.perf_counter() - start, 2)}))
  return out


def _timed_rows(rows, length, repeats, blocks) -> list[harness.Row]:
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (rows, length, HEADS, HEAD_DIM))
  k = jax.random.normal(ks[1], (rows, length, KV_HEADS, HEAD_DIM))
  v = jax.random.normal(ks[2], (rows, length, KV_HEADS, HEAD_DIM))
  pads = np.linspace(0, length // 4, rows).astype(int)
  mask = jnp.arange(length)[None] >= jnp.asarray(pads)[:, None]
  valid = attention.causal_allowed(mask, length).any(-1)[..., None, None]
  w = jax.random.normal(ks[3], q.shape) * valid
  fns = {"time reference": _loss_and_grads("reference")}
  for block in blocks:
    fns[f"time blockwise block={block}"] = _loss_and_grads("blockwise", block)
  results = {name: jax.block_until_ready(fn(q, k, v, mask, w)) for name, fn in fns.items()}
  (_, ref_grads) = results["time reference"]
  row_kwargs = {}
  for name, (_, grads) in results.items():
    row_kwargs[name] = dict(baseline="time reference", extra={
        "size": f"rows={rows} L={length}",
        "max |d grad|": max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads))})
  return harness.alternate_rows(
      {name: functools.partial(fn, q, k, v, mask, w) for name, fn in fns.items()},
      warmup=1, repeats=repeats, row_kwargs=row_kwargs)


def run(quick: bool) -> list[harness.Row]:
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    rows += _memory_rows(1, 4096, dtype)
  if quick:
    rows += _timed_rows(1, 512, 3, blocks=(attention.BLOCK_SIZE,))
  else:
    rows += _timed_rows(2, 1024, 5, blocks=(128, 256, 512))
  return rows
