"""Variable-length rollouts: continuous batching (`egpo_jax.sampling.continuous`) against
the static sampler, and the length-bucketed update (`update.bucketed_update`) against the
padded one, on the same batch.

Workload: the "small" model (D 512, 8 layers, 8/2 heads, V 512, random float32 weights),
64 prompts of 16-64 tokens (bucket 64) x 8 samples, T = 512, temperature 1. EOS is
disabled; each response stops at its own cap, drawn once (seed 0): 97% uniform in
[T/10, T/2], 3% at T. Queue order FIFO (n = b * G + g).

Rows:
  * continuous, S slots (S = 16, 32, 64): one jitted call; "slot util" = token-emitting
    slot-steps / (S x steps), "FIFO sim util" = the same for a host simulation of S FIFO
    slots on the same caps (a slot takes the next response the step after its last
    token); "util / sim" is the target's ratio. "full attention" reads every slot's
    P + T - 1 cache slots per step, "bounded" only the used 64-slot blocks of each
    (`ContinuousSpec.decode_attention`); "E table entries": a prompt table of E = 3 S / G
    entries refilled inside the loop (`ContinuousSpec.table_entries`), else all 64 prompts.
    On a GPU or TPU also "pallas attention": the bounded blocks read by the Pallas kernel
    (`attention.attend_one_pallas`; blocks of 128 on a TPU, Mosaic's tiling). Not on a
    CPU, where the kernel runs in the Pallas interpreter and its time means nothing (its
    parity is tested in tests/models/test_pallas_decode.py).
  * static, ceil(N/S) chunks of S rows (S = 64, equal slot memory: 8 prompts x 8 per
    chunk): `engine.generate` per chunk with max_new_tokens = the chunk's largest cap,
    i.e. the static loop stopping when its last row reaches its cap (its best case).
  * static, unchunked: all 512 rows in one `engine.generate` (max_new_tokens = 512).
  * update, padded: `update.update` (jitted, shared prompts on: the default path) on the
    S = 64 rollout's batch (random advantages), 64 micro-batches of 8 rows.
  * update, bucketed: `update.bucketed_update`, same batch and settings, 8 length buckets
    (multiples of 64); "padding" = padded share of the computed response slots.
"""

from __future__ import annotations

import functools
import heapq
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from egpo_jax.models import config as model_config
from egpo_jax.models import transformer
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import RolloutBatch, TrainState

NOTES = """See the module docstring for the workload. Timings are single runs, compiled
beforehand (the continuous engine by a run with caps of 1 token, the same shapes; the
static sampler and the bucketed update ahead of time from shapes), on 2 CPU cores shared
with other jobs: compare ratios within the run."""


def draw_caps(n: int, t: int, seed: int = 0) -> np.ndarray:
  """97% uniform integers in [t/10, t/2], 3% exactly t."""
  rs = np.random.RandomState(seed)
  caps = rs.randint(t // 10, t // 2 + 1, size=n)
  return np.where(rs.uniform(size=n) < 0.03, t, caps).astype(np.int32)


def fifo_simulation(caps_N: np.ndarray, slots: int) -> tuple[int, float]:
  """(steps, utilisation) of `slots` FIFO slots emitting one token per step, each taking
  the next response in queue order the step after its previous one ended."""
  free_at = [0] * slots                # step at which each slot is next free
  heapq.heapify(free_at)
  end = 0
  for cap in caps_N:
    start = heapq.heappop(free_at)
    heapq.heappush(free_at, start + int(cap))
    end = max(end, start + int(cap))
  return end, float(caps_N.sum()) / (slots * end)


def _prompts(num_prompts: int, vocab: int, seed: int = 1):
  rs = np.random.RandomState(seed)
  lengths = rs.randint(16, 65, size=num_prompts)
  width = int(lengths.max())
  ids = rs.randint(3, vocab, size=(num_prompts, width)).astype(np.int32)
  mask = (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int32)
  return ids * mask, mask


def run(quick: bool) -> list[harness.Row]:
  num_prompts, group, t = (8, 4, 64) if quick else (64, 8, 512)
  slot_counts = (8, 16) if quick else (16, 32, 64)
  main_slots = slot_counts[-1]
  config = model_config.get_config("tiny" if quick else "small")
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  ids, mask = _prompts(num_prompts, config.vocab_size)
  n = num_prompts * group
  caps = draw_caps(n, t)
  rng = jax.random.PRNGKey(2)
  sspec = engine.SamplingSpec(group_size=group, max_new_tokens=t, eos_ids=())
  rows: list[harness.Row] = []

  def timed(name, fn, warm):
    warm()
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    row = harness.Row(name=name, seconds=time.perf_counter() - start)
    rows.append(row)
    # Progress on stderr: a long CPU run's finished rows survive an interruption.
    print(f"[rollout_lengths] {name}: {row.seconds:.2f} s", file=sys.stderr, flush=True)
    return row, out

  def progress():
    print(harness.format_table(rows), file=sys.stderr, flush=True)

  gens = {}
  # With EOS off the schedule depends only on the caps: the smaller slot counts' steps and
  # utilisation are measured on the tiny model (same draw, T and slots), and only the
  # main slot count is timed on the benchmark's model (a 2-core CPU budget). Table
  # entries: 3 S / G (a slot count's prompts in flight, plus those held by stragglers).
  tiny = model_config.get_config("tiny")
  tiny_params = transformer.init_params(tiny, jax.random.PRNGKey(0))
  variants = [(main_slots, "full", 0), (main_slots, "bounded", 0),
              (main_slots, "bounded", 3 * main_slots // group)]
  variants += [(s, "bounded", e) for s in slot_counts if s != main_slots
               for e in (0, 3 * s // group)]
  if jax.default_backend() in ("gpu", "tpu"):
    variants.insert(2, (main_slots, "pallas", 0))
  variants = [(s, a, e) for s, a, e in variants if e < num_prompts]   # e >= B: no table
  for slots, attn, entries in variants:
    block = 128 if attn == "pallas" and jax.default_backend() == "tpu" else 64
    spec = continuous.ContinuousSpec(sampling=sspec, slots=slots, decode_attention=attn,
                                     attention_block=block, table_entries=entries)
    entries = spec.entries(num_prompts)
    cfg, prm = (config, params) if slots == main_slots else (tiny, tiny_params)
    run_c = functools.partial(continuous.generate, prm, ids % cfg.vocab_size, mask, rng,
                              config=cfg, spec=spec, caps_N=caps)
    label = "" if slots == main_slots else " (tiny model: steps and utilisation only)"
    name = (f"continuous, {slots} slots, {attn} attention"
            + (f", {entries} table entries" if entries < num_prompts else "") + label)
    row, gen = timed(name, run_c, lambda run_c=run_c: jax.block_until_ready(
        run_c(caps_N=np.ones_like(caps))))
    if slots != main_slots:
      row.seconds = None
    sim_steps, sim_util = fifo_simulation(caps, slots)
    util = float(gen.busy_slot_steps) / (slots * int(gen.num_steps))
    assert np.array_equal(np.asarray(gen.lengths_N), caps)
    row.extra.update({"steps": int(gen.num_steps), "FIFO sim steps": sim_steps,
                      "slot util": round(util, 4), "FIFO sim util": round(sim_util, 4),
                      "util / sim": round(util / sim_util, 4),
                      # Own slots plus the prompt table's entries (bucket 64).
                      "cache slots": slots * spec.own_slots + entries * 64})
    gens[name] = gen

  # The static sampler over ceil(N / S) chunks of S rows: S / G prompts per chunk.
  per_chunk = main_slots // group
  chunks = [slice(c, c + per_chunk) for c in range(0, num_prompts, per_chunk)]
  chunk_t = [int(caps[c.start * group:c.stop * group].max()) for c in chunks]

  def static_chunked():
    out = []
    for c, steps in zip(chunks, chunk_t):
      out.append(engine.generate(params, ids[c], mask[c], rng, config=config,
                                 group_size=group, max_new_tokens=steps, eos_ids=(),
                                 prompt_ids_B=np.arange(c.start, c.stop)))
    return out

  def warm_static():
    for c, steps in zip(chunks, chunk_t):
      compile_static(params, ids[c], mask[c], rng, np.arange(c.start, c.stop),
                     config=config, group=group, steps=steps)

  static_row, static_out = timed(f"static, {len(chunks)} chunks of {main_slots} rows",
                                 static_chunked, warm_static)
  static_row.extra.update({"steps": sum(chunk_t),
                           "slot util": round(caps.sum() / (main_slots * sum(chunk_t)), 4),
                           # The prompt shared by its group (bucket 64).
                           "cache slots": per_chunk * 64 + main_slots * (t - 1)})
  for r in rows:
    if r.name.startswith("continuous") and r.seconds is not None:
      r.baseline = static_row.name
      # Same tokens: the static rows cut at their caps against the continuous ones.
      gen, same = gens[r.name], []
      for c, out in zip(chunks, static_out):
        rows_n = slice(c.start * group, c.stop * group)
        steps = out.completion_ids_NxT.shape[1]
        valid = np.asarray(gen.completion_mask_NxT[rows_n, :steps])
        same.append(np.all((np.asarray(out.completion_ids_NxT) ==
                            np.asarray(gen.completion_ids_NxT[rows_n, :steps])) | ~valid,
                           axis=1))
      r.extra["same tokens as static"] = f"{np.concatenate(same).mean():.3f}"
  gen = gens[f"continuous, {main_slots} slots, bounded attention"]
  progress()

  if os.environ.get("ROLLOUT_LENGTHS_ONLY_ROLLOUT"):   # a rerun of the rollout rows alone
    _unchunked_row(timed, params, ids, mask, rng, config, group, caps, num_prompts, n, t,
                   static_row)
    return rows
  # The update on the S = main_slots rollout's batch.
  k = jax.random.split(jax.random.PRNGKey(5), 1)[0]
  n_ids = np.repeat(np.asarray(ids), group, 0)
  n_mask = np.repeat(np.asarray(mask), group, 0)
  batch = RolloutBatch(
      prompt_ids_NxP=jnp.asarray(n_ids), prompt_mask_NxP=jnp.asarray(n_mask, bool),
      completion_ids_NxT=gen.completion_ids_NxT, completion_mask_NxT=gen.completion_mask_NxT,
      old_logps_NxT=gen.logps_NxT, adv_N=jax.random.normal(k, (n,)),
      ref_logps_NxT=jnp.zeros((n, t)), is_weights_NxT=jnp.ones((n, t)))
  optimizer = make_optimizer(lr=1e-6)
  # 8 rows (one group) per micro-batch: 32 rows of 576 tokens took ~10 GB on this
  # machine (the kernel's OOM killer ended that run).
  micro = max(1, n // 8)
  settings = update.UpdateSettings(micro_batches=micro)
  state = TrainState.create(params, optimizer.init(params))
  padded = jax.jit(functools.partial(update.update, optimizer=optimizer, model_config=config,
                                     settings=settings, group_size=group))
  upd_rng = jax.random.PRNGKey(7)
  compiled = padded.lower(state, batch, upd_rng).compile()
  row_pad, (_, m_pad) = timed("update, padded (shared prompts)",
                              lambda: compiled(state, batch, upd_rng), lambda: None)
  row_pad.extra["padding"] = round(float(m_pad["padding_fraction"]), 4)
  bucketed = functools.partial(update.bucketed_update, state, batch, upd_rng,
                               optimizer=optimizer, model_config=config, settings=settings,
                               length_buckets_count=8)
  row_b, (_, m_b) = timed(
      "update, length-bucketed", bucketed,
      lambda: update.compile_bucketed_update(state, batch, optimizer=optimizer,
                                             model_config=config, settings=settings,
                                             length_buckets_count=8))
  row_b.baseline = row_pad.name
  row_b.extra["padding"] = round(m_b["padding_fraction"], 4)
  row_b.extra["loss - padded loss"] = f"{m_b['loss'] - float(m_pad['loss']):.2e}"
  progress()
  _unchunked_row(timed, params, ids, mask, rng, config, group, caps, num_prompts, n, t,
                 static_row)
  return rows


def _unchunked_row(timed, params, ids, mask, rng, config, group, caps, num_prompts, n, t,
                   static_row):
  unchunked = functools.partial(engine.generate, params, ids, mask, rng, config=config,
                                group_size=group, max_new_tokens=int(caps.max()),
                                eos_ids=())
  row, _ = timed(f"static, unchunked ({n} rows)", unchunked,
                 lambda: compile_static(params, ids, mask, rng, np.arange(num_prompts),
                                        config=config, group=group, steps=int(caps.max())))
  row.baseline = static_row.name
  row.extra.update({"steps": int(caps.max()),
                    "slot util": round(caps.sum() / (n * int(caps.max())), 4),
                    "cache slots": num_prompts * 64 + n * (t - 1)})


def compile_static(params, ids, mask, rng, prompt_ids_B, *, config, group, steps):
  """Compiles `engine.generate`'s stages for these shapes ahead of time (from shapes: no
  decoding), so that its timed call does not compile."""
  spec = engine.SamplingSpec(group_size=group, max_new_tokens=steps, eos_ids=())
  bucket = engine.bucket_length(ids.shape[1], 16)
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  ids, mask = np.pad(ids, pad), np.pad(mask, pad)
  args = (params, ids, mask, rng, jnp.asarray(prompt_ids_B))
  start = functools.partial(engine._start_jit, config=config, spec=spec, cache_dtype=None)
  engine._start_jit.lower(*args, config=config, spec=spec, cache_dtype=None).compile()
  state = jax.eval_shape(start, *args)
  grows = state.cache.max_len < state.cache.capacity
  cont = engine._continue_growing_jit if grows else engine._continue_jit
  cont.lower(params, state.replace(cache=None), state.cache, config=config,
             spec=spec).compile()
  done = jax.eval_shape(functools.partial(cont, config=config, spec=spec), params,
                        state.replace(cache=None), state.cache)
  engine._finish_jit.lower(done).compile()
