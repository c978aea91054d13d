"""Rollout throughput: new tokens/s of the KV-cache sampler (`egpo_jax.sampling.generate`)
for 8 prompts x 8 samples, 16-token prompts and exactly 64 new tokens (EOS disabled,
temperature 1, no top-k/top-p), against a naive sampler that re-runs the full forward pass
over the whole sequence buffer for every new token, and against transformers' `generate`
(PyTorch, KV cache) on the same weights exported with `save_hf_checkpoint`.

Models: "tiny" Qwen2 (D 64, 2 layers, 4/2 heads, MLP 128, V 512) and "small" (D 512,
8 layers, 8/2 heads, MLP 1408, V 512), random float32 weights. "x FLOP floor" is the
measured time over the matmul FLOPs of the rollout (prompt encoded once, every new token
through every layer, attention over the real context) at this run's jnp.dot rate
(harness.matmul_calls: 1024^3 float32 jnp.dot calls, timed round-robin with the model's
rows); "x floor at decode shapes" uses instead the rate jnp.dot reaches on the decode
step's own thin matmuls (q/k/v and gate/up fused, as the sampler runs them), timed alike.
"x bandwidth floor" is the time over the bytes the rollout must move (weights and output
head once per step, each prompt's keys and values once per group and each row's own over
its response so far; `rollout_bytes`)
at the copy rate of a large array (harness.copy_calls), timed alike; "GB/s" is those
bytes over the time. On an accelerator the dot is 8192^3, the copy 2 GiB, transformers
(a CPU baseline) is left out, and the section is written as "rollout-<backend>".
"""

from __future__ import annotations

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from egpo_jax import sampling
from egpo_jax.models import config as model_config
from egpo_jax.models import hf_io, transformer
from egpo_jax.sampling import filters

NOTES = """No GPU was lent to this session: all numbers are CPU times on 2 cores, drifting
by 10-20% from minute to minute, so only ratios within one run mean much: rows are timed
round-robin in one process, the dot and copy rates included. This run is on an Intel Xeon
(AVX-512), the sessions before it on an AMD EPYC: the 1024^3 dot runs at 200-280 GFLOP/s
here against 80-180 there, and transformers' generate is 2.3x (tiny) and 2.5x (small)
faster than the issue's AMD figures. transformers runs
with the faster of torch's default thread count and one thread, picked by a short probe.
The naive sampler (same keys and law; "same tokens as ours" checks the KV-cache path
against it) is quadratic in length and is timed on tiny only. "model decode + argmax"
runs the model's `decode` T - 1 times with the argmax fed back (no sampling, no prefill);
"decode's weight matmuls only" runs just the decode step's weight matmuls at their exact
shapes (64 rows x D): "x floor at decode shapes" divides by the rollout's FLOPs at that
rate.

Targets: tiny >= 5x transformers: met, 5.74x in this run (2026-12-05 11:23 UTC, Intel);
7.06x and 8.14x on the AMD machine (2026-11-28). Small <= 1.5x the FLOP floor: missed
here, 1.99x (generate 1.37 s, the dot at 279 GFLOP/s), where the AMD runs gave 1.39x,
1.60x and 1.62x. On this CPU the target is out of reach of a decode of 64 rows: the
decode step's weight matmuls alone, at their own shapes, take 1.44x the rollout's floor,
because 64-row matmuls reach 185 GFLOP/s against the 1024^3 dot's 279 (66%; 75-90% on
the AMD). At those shapes the small rollout is 1.31x its floor; what is left above the
weight matmuls (~0.37 s of 1.37 s) is attention, the norms, RoPE and sampling. On an
accelerator the issue's target is the bandwidth floor (within 2x): the columns are there,
the run is not (no GPU lent).

Shared prompt cache (this version; `SamplingSpec.shared_prompt_min_len`): a prompt's
keys and values can stay once per group instead of G times, so decode reads them once
for the G rows in one [G * 4, 64] @ [64, P] product per (prompt, kv head). Attention
alone (64 rows, 8/2 heads of 64, jitted, medians of 7 x 100 calls, Intel): P = 16 with 42
own slots 386-484 us repeated vs 517-544 us shared (slower: the grouping's reshapes of
queries, scores and outputs cost more than 16 slots' reads); P = 64: 689 vs 517 us;
P = 256 with 64 own: 1,510-1,620 vs 1,185-1,266 us; P = 512 with 128: 2,560 vs
1,930-2,060 us. The whole small rollout shared at P = 16 was 12-14% slower (1,954 vs
1,714 ms and 2,076 vs 1,834 ms, separate processes alternated). So the engine shares from
a 64-token prompt bucket on (the default threshold) and this 16-token benchmark repeats
the prompt per row as before; the cache memory a shared prompt saves is (G - 1) * P
slots per prompt (7/8 of it at G = 8), whatever the speed.

Sampling (AMD, 2026-11-28): generate costs the same as "model decode + argmax" (31 vs
32 ms tiny, 1.87 vs 1.86 s small; on the Intel 31 vs 37 ms and 1.37 vs 1.36 s). A
jax.profiler trace of the tiny generate had XLA:CPU's cumulative
sum over the 512-token vocabulary (a reduce-window) at ~18% of the rollout's op time;
`filters._inverse_cdf` now finds the block of ~sqrt(V) weights first, then the token in
it (two cumulative sums of 16 and 32; same law, never a zero-weight token). 63 steps of
[64, 512] sampling: 13.7 -> 2.9 ms; [8, 151,936] (Qwen's vocabulary): 317 -> 55 ms.

Bandwidth (AMD; the Intel copies at 41-51 GB/s): the copy rate is an in-place `x + 1`
over 256 MiB (read + write counted), 46-47 GB/s there. The small rollout moves 7 GB at
least (the 90 MB of weights 64 times), so its bandwidth floor is ~0.15 s and the CPU run
is ~10x above it: compute-bound, as
the FLOP columns say. Page faults: with a fresh output buffer per call the same copy ran
at 5.3 GB/s, as XLA:CPU maps each call's large temporaries afresh (glibc mmaps blocks
over 32 MB) and the kernel faults and zeroes them page by page (counted with getrusage:
~33,000 faults per small rollout, 17,800 per tiny update, 500,000 per small update).
glibc's transparent-huge-page tunable (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) cuts the
faults 40-500x, but in interleaved A/B runs (two worker processes, alternate calls) the
wall time moved within noise: tiny iteration 0.105 s default vs 0.107 s, small 8.01 s vs
7.76 s; not adopted.

Cache phases (AMD, 2026-11-27): the decode runs in up to `SamplingSpec.cache_phases` loops
(3 here: 21 steps each) on a cache that holds only the slots each loop reaches (37, 58,
79), so attention reads 58 slots per step on average instead of 79; tokens and log-probs
are identical. A/B in one process, round-robin: 5-12% less time for the small rollout,
tiny unchanged. Growing the cache by 40 empty slots had cost 400-600 ms of the small
model's 2.4 s rollout: attention is memory-bound there (the 8 layers' cache, 41 MB at 79
slots, does not fit the 32 MB L3 next to 90 MB of weights streamed every step). "model
decode + argmax" runs the same phases. Tried and dropped: activations laid out [D, B] with
[out, in] kernels, so the weight matmuls are kernel @ x (8-25% faster in a chain of bare
decode-shaped matmuls, as XLA:CPU then does not repack the weights): inside generate no
gain, because transposing the 90 MB of weights once per call costs as much; 7 phases
instead of 3: no further gain, 2x the loop compilations.

Where the small model's time went before phases (jax.profiler trace, per XLA thunk,
decode loop): weight matmuls ~73%, attention ~17-25% (batched [4 x 64] @ [64 x 79]
products over 128 (row, kv head) pairs; an elementwise formulation and Eigen instead of
YNNPACK were slower), the per-call copies that unstack and fuse the layer weights and lay
out the cache ~2%, prefill ~2%, sampling ~2%. Earlier versions: q/k/v and gate/up as one
matmul each (`transformer.decode_params`; 14% less time in the decode-shaped matmuls),
keys cached slots-last (2x faster scores), RoPE sin/cos from a table built with the
cache (7% of the step), decode in plain jnp with unrolled layers, weights unstacked and
cache laid out once before the loop (a test checks the compiled loop body copies
neither), one exp over V per step to sample and score."""

NUM_PROMPTS, GROUP, PROMPT_LEN = 8, 8, 16


def rollout_flops(config: model_config.ModelConfig, num_prompts: int, group: int,
                  prompt_len: int, new_tokens: int) -> float:
  """Matmul FLOPs of a rollout: the prompt once, each new token through every layer."""
  d, q = config.hidden_size, config.num_heads * config.head_size
  per_token = 2 * harness.matmul_params(config)
  attn_per_ctx = 2 * 2 * config.num_layers * q  # scores + weighted values per context slot
  head = 2 * d * config.vocab_size
  n = num_prompts * group
  prefill = num_prompts * (prompt_len * per_token
                           + attn_per_ctx * prompt_len * (prompt_len + 1) / 2 + head)
  # Tokens 1..T-1 are fed back; token t attends to prompt_len + t slots.
  ctx = sum(prompt_len + t for t in range(1, new_tokens))
  decode = n * ((new_tokens - 1) * (per_token + head) + attn_per_ctx * ctx)
  return prefill + decode


def rollout_bytes(config: model_config.ModelConfig, num_prompts: int, group: int,
                  prompt_len: int, new_tokens: int, dtype_bytes: int = 4) -> float:
  """Bytes a rollout must move through memory at the least: the matmul weights and the
  output head read once by the prefill and once per decode step, at every step each
  prompt's keys and values read once for its group (`transformer.share_prefix`) and each
  row's own over its response so far, and every slot written once.

  Its time at the machine's copy rate is the rollout's bandwidth floor: where a decode
  step is bound by streaming the weights (an accelerator, few rows), it is the floor
  that counts; on this CPU the FLOP floor is the higher one.
  """
  kv = config.num_kv_heads * config.head_size
  weights = harness.matmul_params(config) + config.hidden_size * config.vocab_size
  slot = 2 * kv * config.num_layers  # one position's keys and values, every layer
  n = num_prompts * group
  steps = new_tokens - 1
  own = steps * (steps + 1) // 2  # a row's own slots read, summed over the decode steps
  reads = new_tokens * weights + (num_prompts * prompt_len * steps + n * own) * slot
  writes = (num_prompts * prompt_len + n * steps) * slot
  return float(dtype_bytes * (reads + writes))


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def decode_only(params, tokens_N, cache, *, config, steps,
                phases=sampling.SamplingSpec.cache_phases):
  """The model's decode `steps` times, greedy (argmax fed back): the sampler's lower bound.

  Decodes in the sampler's phases (`sampling.cache_plan`) on the cache of
  `sampling.start_rollout`, growing it as the engine does. The argmax keeps the logits
  live; a loop that drops them lets XLA skip the last layer's MLP and the output head,
  which is not a bound on anything.
  """
  # Converted once, as the engine does before its decode loop.
  params = transformer.decode_params(params)
  cache = transformer.decode_layout(cache)

  def body(_, carry):
    tokens_N, cache = carry
    logits_NxV, cache = transformer.decode(params, tokens_N, cache, config=config)
    return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32), cache
  carry, done = (tokens_N, cache), 0
  prompt_len = cache.capacity - steps
  for slots in sampling.cache_plan(prompt_len, steps + 1, phases):
    carry = (carry[0], transformer.grow_cache(carry[1], slots))
    carry = jax.lax.fori_loop(done, slots - prompt_len, body, carry)
    done = slots - prompt_len
  return carry


def decode_matmul_shapes(config: model_config.ModelConfig, rows: int
                         ) -> list[tuple[int, int, int]]:
  """(M, K, N) of every weight matmul in one decode step of `rows` rows, q/k/v and
  gate/up fused as `transformer.decode_params` fuses them."""
  d, inter = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
  layer = [(rows, d, q + 2 * kv), (rows, q, d), (rows, d, 2 * inter), (rows, inter, d)]
  return layer * config.num_layers + [(rows, d, config.vocab_size)]


@functools.partial(jax.jit, static_argnames=("steps",))
def matmuls_only(weights, x_MxK, *, steps):
  """Every weight matmul of the decode step at its exact shape, `steps` times.

  Each step's inputs depend on the previous step's outputs, so nothing is hoisted out of
  the loop; the added elementwise work is a few vector ops per matmul.
  """
  def body(_, x_MxK):
    acc = x_MxK
    for w_KxN in weights:
      out = acc[:, :w_KxN.shape[0]] @ w_KxN
      acc = acc.at[:, :1].add(1e-9 * out[:, :1])
    return acc
  return jax.lax.fori_loop(0, steps, body, x_MxK)


@functools.partial(jax.jit, static_argnames=("config", "group", "new_tokens"))
def naive_generate(params, prompt_ids_BxP, rng, *, config, group, new_tokens):
  """Samples like `generate` (same keys and law) but with a full forward per token."""
  ids_NxP = jnp.repeat(prompt_ids_BxP, group, axis=0)
  n, p = ids_NxP.shape
  buf_NxL = jnp.concatenate([ids_NxP, jnp.zeros((n, new_tokens), jnp.int32)], axis=1)
  keys_N = sampling.response_keys(rng, jnp.arange(prompt_ids_BxP.shape[0]), group)
  embedding_VxD = transformer.output_embedding(params, config)

  def step(t, buf_NxL):
    mask_NxL = jnp.broadcast_to(jnp.arange(p + new_tokens) < p + t, buf_NxL.shape)
    hidden = transformer.forward(params, buf_NxL, mask_NxL, config=config,
                                 return_hidden=True)
    last_NxD = jax.lax.dynamic_index_in_dim(hidden, p + t - 1, axis=1, keepdims=False)
    logits_NxV = jnp.einsum("nd,vd->nv", last_NxD, embedding_VxD,
                            preferred_element_type=jnp.float32)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_N, t)
    tokens_N = filters.sample_tokens(step_keys, logits_NxV)
    return jax.lax.dynamic_update_slice_in_dim(buf_NxL, tokens_N[:, None], p + t, axis=1)

  return jax.lax.fori_loop(0, new_tokens, step, buf_NxL)[:, p:]


def _hf_generate_fn(params, config, prompt_ids_BxP, new_tokens):
  """transformers generate, with the faster of torch's default and 1 thread (probed)."""
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    hf_io.save_hf_checkpoint(params, config, tmp, dtype="float32")
    model = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
  ids = torch.as_tensor(np.repeat(np.asarray(prompt_ids_BxP), GROUP, axis=0))
  attention = torch.ones_like(ids)
  torch.manual_seed(0)

  def make(threads, steps):
    def fn():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        return model.generate(ids, attention_mask=attention, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=steps,
                              min_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    return fn

  # With other jobs on the machine torch's multi-threaded generate can be several times
  # slower than single-threaded; a short probe picks the setting that is faster here.
  candidates = sorted({torch.get_num_threads(), 1})
  probe = {t: min(harness.time_fn(make(t, 4), warmup=1, repeats=2)) for t in candidates}
  threads = min(probe, key=probe.get)
  out = make(threads, new_tokens)()
  assert tuple(out.shape) == (NUM_PROMPTS * GROUP, PROMPT_LEN + new_tokens)
  label = f"transformers generate ({threads} thread{'s' if threads > 1 else ''})"
  return label, make(threads, new_tokens)


def _model_rows(name: str, config, new_tokens: int, *, repeats: int,
                with_naive: bool) -> list[harness.Row]:
  params = transformer.init_params(config, jax.random.key(0))
  prompt_ids = jax.random.randint(jax.random.key(1), (NUM_PROMPTS, PROMPT_LEN), 3,
                                  config.vocab_size, jnp.int32)
  mask = jnp.ones_like(prompt_ids)
  rng = jax.random.key(2)
  ours = functools.partial(sampling.generate, params, prompt_ids, mask, rng, config=config,
                           group_size=GROUP, max_new_tokens=new_tokens, eos_ids=())
  out = jax.device_get(ours())
  assert (out.lengths_N == new_tokens).all() and int(out.num_steps) == new_tokens

  n = NUM_PROMPTS * GROUP
  # The cache and first tokens generate decodes from: its own first stage, on the prompts
  # padded to their bucket as generate pads them.
  spec = sampling.SamplingSpec(group_size=GROUP, max_new_tokens=new_tokens, eos_ids=())
  pad = ((0, 0), (sampling.bucket_length(PROMPT_LEN) - PROMPT_LEN, 0))
  start = jax.jit(functools.partial(sampling.start_rollout, config=config, spec=spec))(
      params, jnp.pad(prompt_ids, pad), jnp.pad(mask, pad), rng,
      jnp.arange(NUM_PROMPTS, dtype=jnp.int32))
  cache, tokens_N = start.cache, start.last_tokens_N
  decode = functools.partial(decode_only, params, tokens_N, cache, config=config,
                             steps=new_tokens - 1)
  shapes = decode_matmul_shapes(config, n)
  keys = jax.random.split(jax.random.key(3), len(shapes))
  weights = [jax.random.normal(key, (k, m_n), jnp.float32) * 0.02
             for key, (_, k, m_n) in zip(keys, shapes)]
  x_MxK = jnp.ones((n, max(k for _, k, _ in shapes)), jnp.float32)
  matmuls = functools.partial(matmuls_only, weights, x_MxK, steps=new_tokens - 1)

  tag = f"{name}: "
  ours_row = tag + "egpo_jax generate (KV cache)"
  fns = {ours_row: ours}
  # transformers runs on the CPU: a baseline only where JAX does too.
  base = ours_row
  if not harness.on_accelerator():
    hf_label, fns[tag + hf_label] = _hf_generate_fn(params, config, prompt_ids, new_tokens)
    base = tag + hf_label
  matmul_row = tag + "decode's weight matmuls only (same shapes)"
  dot_row, copy_row = tag + "jnp.dot", tag + "copy"
  dots, dot_flops = harness.matmul_calls()
  copies, copy_bytes = harness.copy_calls()
  fns.update({tag + "model decode + argmax (no sampling)": decode, matmul_row: matmuls,
              dot_row: dots, copy_row: copies})
  rows = harness.alternate_rows(fns, warmup=1, repeats=repeats)
  dot = next(r for r in rows if r.name == dot_row)
  copy = next(r for r in rows if r.name == copy_row)
  rows.remove(dot)
  rows.remove(copy)
  gflops = dot_flops / dot.seconds / 1e9
  gbps = copy_bytes / copy.seconds / 1e9
  if with_naive:
    naive = functools.partial(naive_generate, params, prompt_ids, rng, config=config,
                              group=GROUP, new_tokens=new_tokens)
    same = float((np.asarray(naive()) == out.completion_ids_NxT).mean())
    rows.append(harness.timed_row(tag + "naive (full forward per token)", naive, warmup=0,
                                  repeats=3))
    rows[-1].extra["same tokens as ours"] = f"{100 * same:.1f}%"
  tokens = NUM_PROMPTS * GROUP * new_tokens
  total_flops = rollout_flops(config, NUM_PROMPTS, GROUP, PROMPT_LEN, new_tokens)
  floor_s = total_flops / (gflops * 1e9)
  # The second, honest floor: the same FLOPs at the rate jnp.dot reaches at the decode's
  # own (thin, rows x D) shapes, measured side by side with the rest.
  matmul = next(r for r in rows if r.name == matmul_row)
  shape_gflops = (new_tokens - 1) * sum(2 * m * k * m_n for m, k, m_n in shapes) / (
      matmul.seconds * 1e9)
  shape_floor_s = total_flops / (shape_gflops * 1e9)
  total_bytes = rollout_bytes(config, NUM_PROMPTS, GROUP, PROMPT_LEN, new_tokens)
  bandwidth_floor_s = total_bytes / (gbps * 1e9)
  for r in rows:
    r.baseline = base
    r.extra["new tokens/s"] = round(tokens / r.seconds)
    r.extra["x FLOP floor"] = round(r.seconds / floor_s, 2)
    r.extra["x floor at decode shapes"] = round(r.seconds / shape_floor_s, 2)
    if r.name != matmul_row:
      r.extra["GB/s"] = round(total_bytes / r.seconds / 1e9, 2)
      r.extra["x bandwidth floor"] = round(r.seconds / bandwidth_floor_s, 2)
  matmul.extra["dot GFLOP/s"] = round(shape_gflops, 1)
  n_dot = harness.dot_size()
  rows.append(harness.Row(
      name=f"{tag}jnp.dot rate ({n_dot}^3 float32) and copy rate, timed with the rows above",
      seconds=None, extra={"dot GFLOP/s": round(gflops, 1), "GB/s": round(gbps, 2)}))
  rows.append(harness.Row(
      name=f"{tag}rollout: {total_flops / 1e9:.3g} GFLOP, {total_bytes / 1e9:.3g} GB moved",
      seconds=None))
  return rows


def run(quick: bool) -> list[harness.Row]:
  new_tokens = 16 if quick else 64
  rows = []
  for name in ("tiny", "small"):
    config = model_config.get_config(name)
    rows += _model_rows(name, config, new_tokens,
                        repeats=2 if quick else (7 if name == "tiny" else 5),
                        with_naive=name == "tiny")
  return rows
