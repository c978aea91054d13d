"""Chunked vs unchunked per-token log-probs under the policy loss, forward + backward.

Memory rows: XLA's temporary buffers (`memory_analysis().temp_size_in_bytes`) of the
jitted loss and its gradient w.r.t. hidden states and output embedding at Qwen2.5-1.5B
size (V = 151,936, D = 1,536, N x T = 2 x 4,096), from abstract shapes: compiled, never
run. Timed rows: a size that runs on CPU, with the largest difference to the unchunked
reference in the loss and in the gradients.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from egpo_jax.core.logprobs import token_logprobs, token_logprobs_unchunked
from egpo_jax.core.losses import policy_loss

NOTES = """
The chunked path recomputes each chunk's logits in the backward pass (4 matmuls of
N*T x D x V instead of 3), so it is expected to be somewhat slower where the full logits
fit; its temporary memory does not grow with N*T. Memory figures are for the CPU
backend's buffer assignment; on CPU a bfloat16 matmul is upcast, which adds about one
float32 V x D buffer to the bfloat16 chunked figure.
"""


def _loss_and_grad(logprob_fn):
  def loss(hidden, emb, targets, old, adv, mask):
    return policy_loss(logprob_fn(hidden, emb, targets), old, adv, mask)[0]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _variants(chunk_sizes):
  fns = {"unchunked": _loss_and_grad(token_logprobs_unchunked)}
  for c in chunk_sizes:
    fns[f"chunked c={c}"] = _loss_and_grad(
        lambda h, e, t, c=c: token_logprobs(h, e, t, chunk_size=c))
  return fns


def _memory_rows(n, t, v, d, dtype, chunk_sizes) -> list[harness.Row]:
  s = jax.ShapeDtypeStruct
  args = (s((n, t, d), dtype), s((v, d), dtype), s((n, t), jnp.int32),
          s((n, t), jnp.float32), s((n,), jnp.float32), s((n, t), jnp.float32))
  rows, base = [], None
  for name, fn in _variants(chunk_sizes).items():
    start = time.perf_counter()
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    compile_s = time.perf_counter() - start
    base = base or temp
    rows.append(harness.Row(
        name=f"memory {jnp.dtype(dtype).name} N*T={n * t} V={v} D={d}: {name}",
        seconds=None,
        extra={"temp GB": round(temp / 1e9, 3), "unchunked temp / temp": round(base / temp, 1),
               "compile s": round(compile_s, 2)}))
  return rows


def _timed_rows(n, t, v, d, chunk_sizes, repeats) -> list[harness.Row]:
  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(v, d)) / np.sqrt(d), jnp.float32),
          jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32),
          jnp.asarray(rng.uniform(-12, -8, (n, t)), jnp.float32),
          jnp.asarray(rng.normal(size=n), jnp.float32),
          jnp.ones((n, t), jnp.float32))
  fns = {f"time {k}": f for k, f in _variants(chunk_sizes).items()}
  results = {k: jax.block_until_ready(f(*args)) for k, f in fns.items()}
  ref_loss, ref_grads = results["time unchunked"]
  row_kwargs = {}
  for name, (loss, grads) in results.items():
    grad_diff = max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads))
    row_kwargs[name] = dict(baseline="time unchunked", extra={
        "size": f"N*T={n * t} V={v} D={d}",
        "max |d loss|": float(abs(loss - ref_loss)), "max |d grad|": grad_diff})
  return harness.alternate_rows({k: (lambda f=f: f(*args)) for k, f in fns.items()},
                                warmup=1, repeats=repeats, row_kwargs=row_kwargs)


def run(quick: bool) -> list[harness.Row]:
  rows = []
  mem_n = 1 if quick else 2
  for dtype in ((jnp.float32,) if quick else (jnp.float32, jnp.bfloat16)):
    rows += _memory_rows(mem_n, 4096, 151_936, 1536, dtype, chunk_sizes=(512, 1024, 2048))
  if quick:
    rows += _timed_rows(1, 512, 8192, 256, chunk_sizes=(128, 512), repeats=3)
  else:
    rows += _timed_rows(2, 1024, 32_000, 512, chunk_sizes=(256, 1024), repeats=3)
  return rows
