"""The GPU check: one L = 4,096 update micro-batch of a Qwen2.5-Math-1.5B-shaped random model.

    python -m benchmarks.gpu_check            # on one GPU, whenever one is at hand (<= 8 min)
    python -m benchmarks.gpu_check --smoke    # a tiny model on CPU in seconds (tested)

It runs the trainer's own update (`update.update`, state donated) with the paper config's
settings (`experiments/configs/paper.py`: bf16 compute, f32 params and AdamW, remat,
log-prob chunks, shared prompts) on one micro-batch of `--rows` responses of G = 16 to
one prompt each group, every token valid (prompt 1,024 + response 3,072), one AdamW step:

  * time: median of `--repeats` steps after a compiled warm-up;
  * MFU: model FLOPs (`update_flops`: 3 x the forward's matmul and attention FLOPs, remat's
    recomputation not counted) per second over the card's bf16 jnp.dot rate, measured
    here (`benchmarks.harness.matmul_gflops`);
  * memory: `memory_stats()['peak_bytes_in_use']` next to the dry run's estimate of the
    same program (compiled on the CPU backend from abstract shapes, as
    `experiments.main --dry_run` does) and the GPU compiler's own (`memory_analysis()`).

Attention: `--attention` names the implementations to compare (default on a GPU
"cudnn,blockwise"; elsewhere the paper config's); each runs in its own process, so each
peak is its own. With "cudnn" on a GPU it also checks cuDNN parity (`cudnn_parity`): on
one left-padded L = 4,096 bf16 batch, cuDNN's values and q/k/v gradients must be as close
to the float32 reference as blockwise's are (the exit code is 1 if not).

Prints one JSON line per implementation, then the markdown rows for BENCHMARKS.md's
"gpu_check" table. An out-of-memory step is a result, not a crash: the JSON says so and
the exit code is 1. Never run in CI.

    python -m benchmarks.gpu_check --decode           # decode attention full/bounded/pallas
    python -m benchmarks.gpu_check --decode --smoke   # tiny shapes on CPU (pallas interpreted)

`--decode` times one layer's decode attention of the continuous engine
(`decode_attention_check`): `--rows` slots of `--model`'s heads, a prompt-table prefix of
`--prompt_len`, own caches of `--response_len` - 1 slots (rounded up to `--read_block`),
each slot at a length drawn as rollout_lengths' caps (97% in [T/10, T/2], 3% T). "full"
reads every own slot, "bounded" the used blocks by plain JAX (`_attend_one_paged`),
"pallas" the same blocks by the Pallas kernel (`attend_one_pallas`: Triton on a GPU,
Mosaic on a TPU); its largest difference from "full" is reported. On a CPU the kernel
runs in the Pallas interpreter: its time there means nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.scenarios import rollout_lengths
from egpo_jax.models import attention as attention_lib
from egpo_jax.models import config as model_config_lib
from egpo_jax.models import transformer
from egpo_jax.training import config as config_lib
from egpo_jax.training import dry_run, experiment
from egpo_jax.training import update as update_lib
from egpo_jax.types import RolloutBatch, TrainState
from experiments.configs import paper

SMOKE = dict(model="tiny", rows=4, group_size=2, prompt_len=8, response_len=24, repeats=2)
COLUMNS = ("device", "model", "rows x L", "step s", "TFLOP/s", "bf16 dot TFLOP/s", "MFU",
           "peak GB", "dry-run GB", "GPU-compiled GB", "attention")


def update_flops(config: model_config_lib.ModelConfig, *, rows: int, group_size: int,
                 prompt_len: int, response_len: int) -> float:
  """Model FLOPs of forward + backward (3 x forward) of one shared-prompt micro-batch.

  Forward: 2 x matmul weights per token (each group's prompt once, every response token),
  the output head on the response tokens, and causal attention (QK^T and AV: 4 x heads x
  head_dim per query-key pair) over every query's context.
  """
  prompts = rows // group_size
  p, t = prompt_len, response_len
  tokens = prompts * p + rows * t
  pairs = prompts * p * (p + 1) / 2 + rows * (t * p + t * (t + 1) / 2)
  attn_width = config.num_heads * config.head_size
  forward = (2 * harness.matmul_params(config) * tokens
             + 2 * config.vocab_size * config.hidden_size * rows * t
             + 4 * attn_width * pairs * config.num_layers)
  return 3.0 * forward


def _random_batch(key, config, *, rows, group_size, prompt_len, response_len) -> RolloutBatch:
  k = jax.random.split(key, 4)
  prompts = jax.random.randint(k[0], (rows // group_size, prompt_len), 3, config.vocab_size)
  full = lambda n: jnp.ones((rows, n), bool)
  return RolloutBatch(
      prompt_ids_NxP=jnp.repeat(prompts, group_size, axis=0), prompt_mask_NxP=full(prompt_len),
      completion_ids_NxT=jax.random.randint(k[1], (rows, response_len), 3, config.vocab_size),
      completion_mask_NxT=full(response_len),
      old_logps_NxT=-jax.random.uniform(k[2], (rows, response_len), minval=0.1, maxval=8.0),
      adv_N=jax.random.normal(k[3], (rows,)),
      ref_logps_NxT=jnp.zeros((rows, response_len)),
      is_weights_NxT=jnp.ones((rows, response_len)))


def check(model: str, rows: int, group_size: int, prompt_len: int, response_len: int,
          repeats: int, cpu_estimate: bool = True, attention: str = "") -> dict[str, Any]:
  """Runs the check on the default device (attention: the paper config's unless named);
  returns the JSON record."""
  c = paper.get_config(f"egpo,{model if model in paper.BACKBONES else paper.BACKBONES[0]}")
  c.rollout.prompts_per_batch, c.rollout.group_size = rows // group_size, group_size
  c.ppo.micro_batches = 1
  cfg = model_config_lib.get_config(
      model, dtype=c.model.dtype, remat=c.model.get("remat_policy") or c.model.remat,
      attention=attention or c.model.get("attention", "blockwise"))
  settings = config_lib.update_settings(c)
  optimizer = experiment.rl_optimizer(c, int(c.train.iterations))
  shapes = dict(rows=rows, group_size=group_size, prompt_len=prompt_len,
                response_len=response_len)
  device = jax.devices()[0]
  record: dict[str, Any] = {
      "backend": jax.default_backend(), "device": device.device_kind, "model": model,
      **shapes, "params": cfg.num_params(), "dtype": cfg.dtype, "remat": cfg.remat,
      "attention": cfg.attention,
      "flops_per_step": update_flops(cfg, **shapes)}
  record["matmul_tflops"] = harness.matmul_gflops(dtype=jnp.bfloat16) / 1e3

  step = jax.jit(functools.partial(update_lib.update, optimizer=optimizer, model_config=cfg,
                                   settings=settings, group_size=group_size),
                 donate_argnums=(0,))
  key = jax.random.PRNGKey(0)
  init = jax.jit(lambda k: TrainState.create(p := transformer.init_params(cfg, k),
                                             optimizer.init(p)))
  batch = _random_batch(key, cfg, **shapes)
  if cpu_estimate and record["backend"] != "cpu":
    # The dry run's figure: the same program compiled for a CPU device from shapes alone.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = dry_run.with_shardings(jax.eval_shape(init, key), cpu)
    args = dry_run.with_shardings((abstract, jax.eval_shape(lambda: batch), key), cpu)
    record["dry_run_estimate_bytes"] = dry_run.CompiledMemory.of(
        step.lower(*args).compile()).peak_bytes
  state = init(key)
  try:
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    record["compile_seconds"] = time.perf_counter() - start
    record["compiled_estimate_bytes"] = dry_run.CompiledMemory.of(compiled).peak_bytes
    if record["backend"] == "cpu":   # the dry run compiles exactly this
      record["dry_run_estimate_bytes"] = record["compiled_estimate_bytes"]
    times = []
    for i in range(repeats + 1):   # the first run is a warm-up
      start = time.perf_counter()
      state, metrics = compiled(state, batch, jax.random.fold_in(key, i))
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    record["error"] = "out of memory: " + str(err).splitlines()[0][:300]
    return record
  record["seconds"] = statistics.median(times[1:])
  record["tflops"] = record["flops_per_step"] / record["seconds"] / 1e12
  record["mfu"] = record["tflops"] / record["matmul_tflops"]
  record["loss"] = float(metrics["loss"])
  stats = device.memory_stats() or {}
  record["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  return record


def markdown_row(r: dict[str, Any]) -> str:
  """The record as a row of BENCHMARKS.md's gpu_check table (`COLUMNS`)."""
  gb = lambda key: f"{r[key] / 1e9:.1f}" if r.get(key) is not None else "-"
  if "error" in r:
    timing = [r["error"][:60], "-", f"{r['matmul_tflops']:.0f}", "-"]
  else:
    timing = [f"{r['seconds']:.3f}", f"{r['tflops']:.1f}", f"{r['matmul_tflops']:.0f}",
              f"{100 * r['mfu']:.1f}%"]
  cells = [r["device"], r["model"], f"{r['rows']} x {r['prompt_len'] + r['response_len']}",
           *timing, gb("peak_bytes_in_use"), gb("dry_run_estimate_bytes"),
           gb("compiled_estimate_bytes"), r.get("attention", "-")]
  return "| " + " | ".join(cells) + " |"


def cudnn_parity(model: str, rows: int = 2, length: int = 4096) -> dict[str, Any]:
  """cuDNN against blockwise on one causal, left-padded bf16 batch of `model`'s attention
  shapes: each one's largest error, over query rows with a valid key, in the output and
  the q/k/v gradients against the float32 reference (`attention._attend`) on the same
  bf16 inputs. cuDNN passes when no error exceeds max(2 x blockwise's, 1e-2 x the
  reference's largest magnitude)."""
  cfg = model_config_lib.get_config(model)
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (rows, length, cfg.num_heads, cfg.head_size), jnp.bfloat16)
  k, v = (jax.random.normal(key, (rows, length, cfg.num_kv_heads, cfg.head_size), jnp.bfloat16)
          for key in ks[1:3])
  mask = jnp.arange(length)[None] >= (jnp.arange(rows) * 300)[:, None]
  valid = attention_lib.causal_allowed(mask, length).any(-1)[..., None, None]
  w = jax.random.normal(ks[3], q.shape) * valid

  def outputs(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = fn(q, k, v).astype(jnp.float32) * valid
    return (out, *jax.grad(loss, (0, 1, 2))(q, k, v))

  fns = {"reference": lambda q, k, v: attention_lib._attend(  # pylint: disable=protected-access
             *(x.astype(jnp.float32) for x in (q, k, v)),
             attention_lib.causal_allowed(mask, length)),
         **{name: functools.partial(attention_lib.attend, kv_mask_BxS=mask, implementation=name)
            for name in ("blockwise", "cudnn")}}
  got = {name: jax.jit(functools.partial(outputs, fn))() for name, fn in fns.items()}
  names = ("out", "dq", "dk", "dv")
  errors = {impl: {n: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r)))
                   for n, a, r in zip(names, got[impl], got["reference"])}
            for impl in ("blockwise", "cudnn")}
  scale = {n: float(jnp.max(jnp.abs(r))) for n, r in zip(names, got["reference"])}
  ok = all(errors["cudnn"][n] <= max(2 * errors["blockwise"][n], 1e-2 * scale[n])
           for n in names)
  return {"cudnn_parity": "ok" if ok else "FAILED", "rows": rows, "length": length,
          "max_abs_error": errors, "reference_max_abs": scale}


DECODE_SMOKE = dict(model="tiny", rows=4, prompt_len=8, response_len=33, read_block=8,
                    repeats=2)


def decode_attention_check(model: str, rows: int, prompt_len: int, response_len: int,
                           read_block: int, repeats: int) -> list[dict[str, Any]]:
  """One JSON record per decode attention ("full", "bounded", "pallas"): the median
  seconds of one layer's `attention.attend` call over `repeats` (after a compiled warm-up),
  the own slots each reads per row on average, and the largest |difference| from "full"."""
  cfg = model_config_lib.get_config(model)
  h, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
  own = -(-max(response_len - 1, 1) // read_block) * read_block
  lens = np.asarray(rollout_lengths.draw_caps(rows, response_len - 1, seed=0))
  rs = np.random.RandomState(3)    # numpy: eager jax.random ops each compile
  normal = lambda *shape: jnp.asarray(rs.standard_normal(shape), dtype)   # noqa: E731
  q, k, v = normal(rows, h, hd), normal(rows, g, hd, own), normal(rows, g, own, hd)
  mask = jnp.asarray(np.arange(own)[None] < lens[:, None])
  prefix = (normal(rows, g, hd, prompt_len), normal(rows, g, prompt_len, hd),
            jnp.ones((rows, prompt_len), bool))
  read = jnp.asarray(lens, jnp.int32)
  fns = {"full": lambda q, k, v, m, r, p: attention_lib.attend(q, k, v, m, prefix=p),
         **{name: functools.partial(
             lambda q, k, v, m, r, p, kernel: attention_lib.attend(
                 q, k, v, m, prefix=p, read_slots_B=r, read_block=read_block,
                 read_kernel=kernel), kernel=kernel)
            for name, kernel in (("bounded", "xla"), ("pallas", "pallas"))}}
  base = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, model=model,
              rows=rows, heads=f"{h}/{g}x{hd}", prefix=prompt_len, own_slots=own,
              read_block=read_block, dtype=jnp.dtype(dtype).name)
  records, outs = [], {}
  for name, fn in fns.items():
    record = dict(base, decode_attention=name)
    try:
      compiled = jax.jit(fn).lower(q, k, v, mask, read, prefix).compile()
      outs[name] = jax.block_until_ready(compiled(q, k, v, mask, read, prefix))
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, mask, read, prefix))
        times.append(time.perf_counter() - start)
      record["seconds"] = statistics.median(times)
      blocks = -(-lens // read_block)
      record["own_slots_read_per_row"] = float(own if name == "full" else
                                               (blocks * read_block).mean())
      record["max_abs_diff_vs_full"] = float(jnp.max(jnp.abs(
          outs[name].astype(jnp.float32) - outs["full"].astype(jnp.float32))))
    except Exception as err:   # noqa: BLE001  (a kernel that does not build is a result)
      record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    if jax.default_backend() == "cpu" and name == "pallas":
      record["note"] = "Pallas interpreter on CPU: the time is meaningless"
    records.append(record)
  return records


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="qwen2.5-math-1.5b")
  parser.add_argument("--rows", type=int, default=16,
                      help="responses in the micro-batch (paper: 1,024 / 64 micro-batches)")
  parser.add_argument("--group_size", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=1024)
  parser.add_argument("--response_len", type=int, default=3072)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_cpu_estimate", action="store_true",
                      help="skip compiling the dry run's CPU estimate (~1 min for 1.5B)")
  parser.add_argument("--attention", default="",
                      help="comma-separated attention implementations to compare (default: "
                           "'cudnn,blockwise' on a GPU, else the paper config's)")
  parser.add_argument("--no_parity", action="store_true", help="skip the cuDNN parity check")
  parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: " + str(SMOKE))
  parser.add_argument("--decode", action="store_true",
                      help="time decode attention full/bounded/pallas instead (see above)")
  parser.add_argument("--slots", type=int, default=64, help="--decode: decode rows")
  parser.add_argument("--read_block", type=int, default=128, help="--decode: block of slots")
  args = parser.parse_args(argv)
  if args.decode:
    kw = (dict(DECODE_SMOKE) if args.smoke else
          dict(model=args.model, rows=args.slots, prompt_len=args.prompt_len,
               response_len=args.response_len, read_block=args.read_block,
               repeats=max(args.repeats, 10)))
    records = decode_attention_check(**kw)
    for record in records:
      print(json.dumps(record), flush=True)
    return 1 if any("error" in r for r in records) else 0
  kwargs = {k: getattr(args, k) for k in ("model", "rows", "group_size", "prompt_len",
                                          "response_len", "repeats")}
  if args.smoke:
    kwargs.update(SMOKE)
  if kwargs["rows"] % kwargs["group_size"]:
    parser.error(f"--rows={kwargs['rows']} must be a multiple of "
                 f"--group_size={kwargs['group_size']}")
  impls = [x for x in args.attention.split(",") if x] or (
      [""] if args.smoke else ["cudnn", "blockwise"])
  if len(impls) > 1:
    # One process per implementation, started before this one touches the device (JAX
    # preallocates most of a GPU's memory): peak_bytes_in_use is then each one's own.
    argv = [f"--{k}={v}" for k, v in kwargs.items()] + [
        f for f, on in (("--no_cpu_estimate", args.no_cpu_estimate), ("--smoke", args.smoke))
        if on]
    records, failed = [], False
    for impl in impls:
      done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *argv,
                             f"--attention={impl}", "--no_parity"], capture_output=True,
                            text=True, env=os.environ, check=False)
      print(done.stderr[-3000:], file=sys.stderr)
      lines = done.stdout.strip().splitlines()
      failed |= done.returncode != 0
      if lines:
        print(lines[0], flush=True)
        records.append(lines[-1])
    parity_failed = False
    if "cudnn" in impls and not args.no_parity:
      parity = cudnn_parity(args.model)
      print(json.dumps(parity), flush=True)
      parity_failed = parity["cudnn_parity"] != "ok"
    print("| " + " | ".join(COLUMNS) + " |")
    print("\n".join(records))
    return 1 if failed or parity_failed else 0
  if not args.smoke and jax.default_backend() == "cpu":
    parser.error("no GPU here: this check is for a GPU (use --smoke for the CPU smoke run)")
  record = check(**kwargs, cpu_estimate=not args.no_cpu_estimate, attention=impls[0])
  print(json.dumps(record))
  parity_failed = False
  if impls[0] == "cudnn" and not args.no_parity:
    parity = cudnn_parity(args.model)
    print(json.dumps(parity), flush=True)
    parity_failed = parity["cudnn_parity"] != "ok"
  print("| " + " | ".join(COLUMNS) + " |")
  print(markdown_row(record))
  return 1 if "error" in record or parity_failed else 0


if __name__ == "__main__":
  sys.exit(main())
