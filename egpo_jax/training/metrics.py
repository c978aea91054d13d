"""Metric sinks: one JSON line per iteration, TensorBoard scalars, and a PNG of the curves.

Only process 0 writes (multi-host runs log once). Values are converted to Python floats;
non-finite values are written as null in JSON, since NaN is not valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
  out: dict[str, float | int | None] = {}
  for k, v in metrics.items():
    x = np.asarray(jax.device_get(v))
    if x.size != 1:
      continue
    x = x.item()
    if isinstance(x, bool):
      x = int(x)
    if isinstance(x, float) and not math.isfinite(x):
      x = None
    out[k] = x
  return out


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics file; a line cut off by a killed run is skipped, not fatal."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files.

  `resume_after`: the iteration a resumed run restarts from; the rows after it, which the
  run recomputes, are dropped from the JSONL file, and TensorBoard is told to hide its
  events after it (a SessionLog START at `resume_after + 1`, TensorBoard's purge: the
  event files of the killed run may hold steps the JSONL file lacks, since TensorBoard
  flushes on its own schedule), so no iteration is shown twice.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, filename: str = "metrics.jsonl",
               resume_after: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_after is not None and os.path.exists(self.path):
      rows = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_after]
      with open(self.path, "w") as f:
        for r in rows:
          f.write(json.dumps(r) + "\n")
    if tensorboard:
      from tensorboardX import SummaryWriter
      purge = None if resume_after is None else resume_after + 1
      # The suffix: tensorboardX names files by the second, and a second writer in the
      # same second would overwrite the first one's file.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge,
                               filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), **to_python(metrics)}
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, step)
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def plot_curves(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str,
                title: str = "") -> str | None:
  """Plots `keys` against `step`, one panel each; returns the path, or None if no data."""
  keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
  if not rows or not keys:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
