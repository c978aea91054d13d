"""Attention implementations (egpo_jax/models/attention.py), one decoder layer's attention
forward + backward (value and gradients w.r.t. q, k, v) at Qwen2.5-Math-1.5B's heads
(12 query heads, 2 kv heads, head_dim 128), causal, left-padded rows.

Memory rows: XLA's temporary buffers (`memory_analysis().temp_size_in_bytes`) per row at
L = 4,096, compiled from abstract shapes, never run; "cudnn" and "splash" compile only on
their backends (GPU / TPU) and are listed as such elsewhere. Timed rows: the same
function on a size that runs on a CPU, blockwise against the reference, alternated in one
process, with the largest difference to the reference (query rows with a valid key).
Without --quick, "A/B" rows time the rollout and grpo_iteration scenarios' workloads (tiny
and small; grpo_iteration's small at its --quick size, rollout 16 new tokens) under each
implementation, all alternated round-robin in this process.
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

The paper configs' dry run (`python -m experiments.main
--config=experiments/configs/paper.py:egpo,<backbone> --dry_run --dry_run_devices=N
--config.ppo.micro_batches=M`, 2026-12-07, this machine): the update's per-device peak GB,
its collectives over the FSDP floor, and "activations 16/8" = (peak - train state) on 16
devices over the same on 8 (target <= 0.6). Reference rows: the paper_scale section (05:35
UTC, micro-batches 64). Fit targets: 1.5B x16 <= 14 GB, 7B x8 <= 70 GB, 7B x16 <= 28 GB.

| backbone | attention | micro-batches (rows each) | update GB x8 | update GB x16 | coll./floor x8, x16 | activations 16/8 |
|---|---|---|---|---|---|---|
| 1.5B | reference | 64 (16) | 13.78 | 8.12 | 0.92, 0.91 | 0.607 (missed) |
| 1.5B | blockwise | 64 (16) | 10.62 | 6.59 | 0.92, 0.91 | 0.654 (missed) |
| 1.5B | blockwise | 32 (32) | 13.80 | 8.21 | 0.92, 0.92 | 0.614 (missed) |
| 1.5B | blockwise | **16 (64): paper.py** | 20.58 | 11.54 | 0.94, 0.93 | **0.569 (met)** |
| 7B | reference | 64 (16) | 43.18 | 25.02 | 0.88, 0.88 | 0.608 (missed) |
| 7B | blockwise | **32 (32): paper.py** | 44.53 | 25.34 | 0.88, 0.88 | **0.593 (met)** |
| 7B | blockwise | 16 (64) | 59.22 | 32.88 (over 28) | 0.89, 0.89 | 0.568 |

At the old micro-batch blockwise lowers every update peak (1.5B: -3.2 GB on 8, -1.5 GB on
16) but raises the 16/8 ratio: the attention temporaries it removes were activations that
split with the devices, and what is left is dominated by per-device terms that do not
(the ~0.9 GB float32 [V, D] head-gradient partial sum). With more rows per pass the
row-proportional part grows again and the ratio falls below 0.6; the paper configs take the
largest micro-batch that keeps every fit target: 4x fewer passes for 1.5B, 2x for 7B (64
rows would put 7B x16 at 32.9 GB). Rollout peaks are unchanged (decoding keeps its
single-query path); old_logps peaks grow with the rows per pass (1.5B x16 2.7 GB, 7B x16
7.1 GB).
The A/B rows' workloads (sequences of 32 to 80 tokens) fit in one 256-slot block, where the
entry point runs the dense computation for "blockwise" too (the same O(T x S) memory), so
their ratios show this machine's noise between identical programs. Before that choice,
blockwise's one-block online softmax gave speed-ups of 0.95x, 1.16x, 0.96x (tiny
iteration) and 1.15x, 1.00x, 0.93x (small iteration) in three same-run A/Bs: noise, no gain.
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


def _scenario_ab_rows(repeats) -> list[harness.Row]:
  """The rollout / grpo_iteration workloads under attention = reference and blockwise."""
  from benchmarks.scenarios import grpo_iteration, rollout
  from egpo_jax import sampling
  from egpo_jax.models import config as model_config
  from egpo_jax.models import transformer

  fns, load = {}, grpo_iteration.load_model
  try:
    for impl in ("reference", "blockwise"):
      grpo_iteration.load_model = lambda name, impl=impl: (
          lambda pc: (pc[0], pc[1].replace(attention=impl)))(load(name))
      for name in ("tiny", "small"):
        iteration_fns, config = grpo_iteration.build(
            name, grpo_iteration.spec.workload(name == "small"))
        assert config.attention == impl
        fns[f"A/B grpo_iteration {name} iteration: {impl}"] = iteration_fns["iteration"]
      for name in ("tiny", "small"):
        config = model_config.get_config(name).replace(attention=impl)
        params = transformer.init_params(config, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (rollout.NUM_PROMPTS, rollout.PROMPT_LEN),
                                 3, config.vocab_size, jnp.int32)
        fns[f"A/B rollout {name} generate: {impl}"] = functools.partial(
            sampling.generate, params, ids, jnp.ones_like(ids), jax.random.key(2),
            config=config, group_size=rollout.GROUP, max_new_tokens=16, eos_ids=())
  finally:
    grpo_iteration.load_model = load
  kwargs = {name: dict(baseline=name.replace(": blockwise", ": reference"))
            for name in fns if name.endswith(": blockwise")}
  return harness.alternate_rows(fns, warmup=1, repeats=repeats, row_kwargs=kwargs)


def run(quick: bool) -> list[harness.Row]:
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    rows += _memory_rows(1, 4096, dtype)
  if quick:
    rows += _timed_rows(1, 512, 3, blocks=(attention.BLOCK_SIZE,))
  else:
    rows += _timed_rows(2, 1024, 5, blocks=(128, 256, 512))
    rows += _scenario_ab_rows(repeats=7)
  return rows
