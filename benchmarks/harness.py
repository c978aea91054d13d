"""A small benchmark harness: median timings after warm-up, ratios against a baseline
measured in the same process, one Markdown table per scenario in BENCHMARKS.md.

A scenario is a module in `benchmarks/scenarios/` with `run(quick: bool) -> list[Row]`.
Timing functions must block on their results (`jax.block_until_ready`); `time_fn` does
it for whatever the function returns.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass
class Row:
  """One line of a scenario's table.

  `seconds` is the median over the timed repeats; `baseline` names another row of the same
  scenario, and the table shows seconds(baseline) / seconds(this) as "speed-up" or, with
  `ratio="fraction"`, seconds(this) / seconds(baseline). `extra` holds further columns
  (tokens/s, GFLOP/s, bytes ...), already formatted or numeric.
  """
  name: str
  seconds: float | None
  baseline: str | None = None
  ratio: str = "speedup"
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  times: list[float] = dataclasses.field(default_factory=list)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> list[float]:
  """Calls fn `warmup` times untimed (compilation), then `repeats` times timed."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def timed_row(name: str, fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5,
              **row_kwargs) -> Row:
  times = time_fn(fn, warmup=warmup, repeats=repeats)
  return Row(name=name, seconds=statistics.median(times), times=times, **row_kwargs)


def alternate_rows(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 5,
                   row_kwargs: dict[str, dict] | None = None) -> list[Row]:
  """Times several functions round-robin, so drift of the machine hits all alike."""
  row_kwargs = row_kwargs or {}
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return [Row(name=k, seconds=statistics.median(v), times=v, **row_kwargs.get(k, {}))
          for k, v in times.items()]


def on_accelerator() -> bool:
  """Whether JAX runs on a GPU or TPU (peaks and floors are then the card's)."""
  return jax.default_backend() != "cpu"


def dot_size() -> int:
  """n of the n^3 jnp.dot whose rate stands for the machine's matmul peak: 1024 on CPU
  (larger is no faster there), 8192 on an accelerator (1024 is launch-bound)."""
  return 8192 if on_accelerator() else 1024


def matmul_gflops(n: int | None = None, dtype=None, repeats: int = 5) -> float:
  """This machine's float32 (or `dtype`) jnp.dot rate in GFLOP/s, for FLOP-floor ratios."""
  fn, flops = matmul_calls(n, calls=1, dtype=dtype)
  return flops / statistics.median(time_fn(fn, repeats=repeats)) / 1e9


def matmul_calls(n: int | None = None, calls: int = 16, dtype=None
                 ) -> tuple[Callable[[], Any], float]:
  """(fn, flops): `calls` separate jitted n^3 jnp.dot calls (n: `dot_size()`), the rate
  `matmul_gflops` measures, packaged to be timed round-robin with the rows it is the
  floor of (`alternate_rows`): on a shared CPU a rate measured once, before them, moved
  by 1.5x. (A chain of dots inside one jitted loop runs ~15% faster than separate calls
  here.)"""
  import jax.numpy as jnp
  n = n or dot_size()
  dtype = dtype or jnp.float32
  a = jnp.full((n, n), 1.0 / n, dtype)
  f = jax.jit(lambda x: x @ x)

  def fn():
    return [f(a) for _ in range(calls)]
  return fn, 2.0 * calls * n**3


def copy_calls(nbytes: int | None = None, calls: int = 4
               ) -> tuple[Callable[[], Any], float]:
  """(fn, bytes): `calls` jitted in-place `x + 1` passes over a float32 array of `nbytes`
  (256 MiB on CPU, far past its caches; 2 GiB on an accelerator), each reading and
  writing it once: the memory bandwidth a bandwidth floor is measured against, timed
  round-robin with its rows like `matmul_calls`.

  The array is donated, so every pass writes where it read: with a fresh output buffer
  per call, XLA:CPU's first touch of 256 MiB of new pages (the kernel faults and zeroes
  each one) made the same loop ~8x slower here.
  """
  import jax.numpy as jnp
  nbytes = nbytes or (2 << 30 if on_accelerator() else 256 << 20)
  state = [jnp.zeros((nbytes // 4,), jnp.float32)]
  f = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def fn():
    for _ in range(calls):
      state[0] = f(state[0])
    return state[0]
  return fn, 2.0 * calls * (nbytes // 4) * 4


def copy_gbps(nbytes: int | None = None, repeats: int = 5) -> float:
  """This machine's memory bandwidth in GB/s (read + write of a large array)."""
  fn, moved = copy_calls(nbytes, calls=1)
  return moved / statistics.median(time_fn(fn, repeats=repeats)) / 1e9


def matmul_params(config) -> int:
  """Weights in every layer's matmuls (q, k, v, o, gate, up, down), summed over the
  layers of a `ModelConfig`: the per-token FLOPs of the layers are twice this."""
  d, inter = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
  return config.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * inter)


def machine_info() -> dict[str, str]:
  import importlib.metadata as md
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import os
  return {
      "cpu": cpu,
      "cores": str(os.cpu_count()),
      "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
      "backend": jax.default_backend(),
      "python": platform.python_version(),
      "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
  }


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def format_table(rows: list[Row]) -> str:
  by_name = {r.name: r for r in rows}
  extra_cols: list[str] = []
  for r in rows:
    for k in r.extra:
      if k not in extra_cols:
        extra_cols.append(k)
  header = ["name", "median ms", "ratio", *extra_cols]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    ratio = ""
    base = by_name.get(r.baseline) if r.baseline else None
    if base is not None and base.seconds and r.seconds:
      if r.ratio == "fraction":
        ratio = f"{100 * r.seconds / base.seconds:.2f}% of {base.name}"
      else:
        ratio = f"{base.seconds / r.seconds:.2f}x vs {base.name}"
    ms = "" if r.seconds is None else f"{1e3 * r.seconds:.3f}"
    cells = [r.name, ms, ratio, *(_fmt(r.extra.get(k, "")) for k in extra_cols)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
