"""Model throughput: forward and forward+backward of a Qwen2.5-0.5B-shaped decoder
(D 896, 14/2 heads, MLP 4864, V 151,936, tied; `egpo_jax.models.transformer`) on
sequences of 1024 tokens, next to the same run's jnp.dot rate (harness.matmul_gflops;
"% of dot" compares with the dot of the row's compute dtype). On CPU: batch 1, float32,
fewer layers (see the notes). On an accelerator: all 24 layers, batch 4 (1 with
--quick), float32 and bfloat16 compute (float32 params), dot at 8192^3.

Rows: "forward" = full float32 logits [1, L, V]; "forward+backward" = the trainer's path:
final hidden states -> per-token log-probs of the next token in chunks
(`egpo_jax.core.logprobs.token_logprobs`, chunk 1024) -> mean -> gradient w.r.t. all
parameters; "... remat" adds per-layer rematerialisation. GFLOP/s counts the matmul
FLOPs executed: 2 x params-in-matmuls per token, attention as run (full L x L scores and
weighted values, padding mask applied, not causal-skipped), the output head; backward
counted as 2x forward, plus the head recomputed by the chunked log-prob VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from egpo_jax.core import logprobs
from egpo_jax.models import config as config_lib
from egpo_jax.models import transformer

NOTES = """CPU rows: 2 cores shared with other jobs, so absolute rates are noisy. The full
24-layer model at L = 1024 takes about a minute per forward+backward on such a CPU, so the
CPU run uses 4 of its 24 layers (the per-layer cost is identical; the vocabulary head,
about 40% of the FLOPs at 4 layers, is full size); --quick uses 2 layers and L = 256.

One H100 (80 GB) run, 2026-11-27, from a device session (its image has jax 0.11.2 and
flax 0.12.10, not the pinned 0.10.2 / 0.12.8), all 24 layers, B x L = 4 x 1024:

| name | median ms | GFLOP/s | tokens/s | % of dot |
|---|---|---|---|---|
| jnp.dot 8192^3 float32 (TF32: JAX's default precision) | 2.721 | 4.041e+05 | | |
| jnp.dot 8192^3 bfloat16 | 1.517 | 7.25e+05 | | |
| forward (logits) float32 | 40.343 | 1.092e+05 | 1.015e+05 | 27.03 |
| forward+backward float32 | 165.620 | 8.656e+04 | 2.473e+04 | 21.42 |
| forward+backward remat float32 | 174.435 | 8.219e+04 | 2.348e+04 | 20.34 |
| forward (logits) bfloat16 | 30.299 | 1.455e+05 | 1.352e+05 | 20.06 |
| forward+backward bfloat16 | 120.740 | 1.187e+05 | 3.392e+04 | 16.38 |
| forward+backward remat bfloat16 | 140.394 | 1.021e+05 | 2.918e+04 | 14.08 |

At batch 8 the float32 forward+backward without remat ran out of memory (58 GB asked):
attention materialises [B, heads, L, L] float32 scores per layer, so long sequences
need remat or a fused (flash) attention, which this model does not have yet."""


def forward_flops(config: config_lib.ModelConfig, length: int) -> float:
  """Matmul FLOPs of one forward pass over `length` tokens (batch 1), logits included."""
  d, q = config.hidden_size, config.num_heads * config.head_size
  per_token = 2 * harness.matmul_params(config)
  attention = 2 * 2 * config.num_layers * q * length * length
  head = 2 * d * config.vocab_size
  return length * (per_token + head) + attention


def run(quick: bool) -> list[harness.Row]:
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    layers, length, batch, dtypes, dot_n = (2, 256, 1, ("float32",), 1024) if quick else (
        4, 1024, 1, ("float32",), 1024)
  else:  # the whole model, and bfloat16 compute as the trainer runs it on accelerators
    layers, length, batch, dtypes, dot_n = (24, 1024, 1 if quick else 4,
                                            ("float32", "bfloat16"), 8192)
  rows = []
  dot = {}
  for dtype in dtypes:
    dot[dtype] = harness.matmul_gflops(dot_n, jnp.dtype(dtype))
    rows.append(harness.Row(name=f"jnp.dot {dot_n}^3 {dtype}",
                            seconds=2 * dot_n**3 / dot[dtype] / 1e9,
                            extra={"GFLOP/s": dot[dtype]}))
  base = config_lib.get_config("qwen2.5-0.5b", num_layers=layers)
  params = transformer.init_params(base, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, base.vocab_size, (batch, length)), jnp.int32)
  mask = jnp.ones((batch, length), bool)

  def loss(p, cfg):
    hidden = transformer.forward(p, ids, mask, config=cfg, return_hidden=True)
    logps = logprobs.token_logprobs(hidden[:, :-1], transformer.output_embedding(p, cfg),
                                    ids[:, 1:], chunk_size=1024)
    return jnp.mean(logps)

  fwd = jax.jit(transformer.forward, static_argnames="config")
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  f_flops = batch * forward_flops(base, length)
  head = batch * 2 * base.hidden_size * base.vocab_size * (length - 1)
  fb_flops = 3 * f_flops + head  # backward = 2x forward, + the head the VJP recomputes
  for dtype in dtypes:
    config = base.replace(dtype=dtype)
    remat = config.replace(remat=True)
    timed = harness.alternate_rows(
        {f"forward (logits) {dtype}": lambda c=config: fwd(params, ids, mask, config=c),
         f"forward+backward {dtype}": lambda c=config: grad(params, c),
         f"forward+backward remat {dtype}": lambda c=remat: grad(params, c)},
        warmup=1, repeats=3 if quick or not on_cpu else 2)
    for row in timed:
      flops = f_flops if row.name.startswith("forward (") else fb_flops
      rate = flops / row.seconds / 1e9
      row.extra = {"layers": layers, "B x L": f"{batch} x {length}",
                   "tokens/s": batch * length / row.seconds, "GFLOP/s": rate,
                   "% of dot": 100 * rate / dot[dtype]}
      rows.append(row)
  return rows
