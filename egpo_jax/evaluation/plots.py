"""PNG figures of an evaluation and of a comparison of runs (matplotlib, Agg backend).

Every function writes one file and returns its path, or None when there is nothing to
draw (no data, or a class is empty); none of them raises on a degenerate input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  if fig.get_layout_engine() is None:   # a constrained layout already fits its titles
    fig.tight_layout()
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)
  return path


def _reliability_axes(ax, bins: Mapping[str, Sequence], label: str | None = None):
  pts = [(c, a, n) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"])
         if n and c is not None and a is not None]
  if not pts:
    return False
  conf, acc, count = (np.asarray(x, float) for x in zip(*pts))
  size = 20 + 180 * count / count.max()
  line = ax.plot(conf, acc, lw=1.2, label=label)[0]
  ax.scatter(conf, acc, s=size, color=line.get_color(), alpha=0.7, zorder=3)
  return True


def _unit_square(ax, title: str):
  ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
  ax.set_xlim(0, 1)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("confidence exp(-H~) (bin mean)")
  ax.set_ylabel("accuracy in bin")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)


def reliability_diagram(bins: Mapping[str, Sequence], path: str, *, title: str = "",
                        ece: float | None = None) -> str | None:
  """Accuracy vs mean confidence per equal-mass bin (marker area ~ bin size)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.2, 4.0))
  if not _reliability_axes(ax, bins, "responses"):
    plt.close(fig)
    return None
  suffix = f" (ECE {ece:.3f})" if ece is not None else ""
  _unit_square(ax, f"{title}{suffix}")
  ax.legend(fontsize=8, loc="upper left")
  return _save(fig, path)


def entropy_histogram(entropy_N: np.ndarray, correct_N: np.ndarray, path: str, *,
                      title: str = "", bins: int = 30) -> str | None:
  """Histograms of H~ for correct and wrong responses, with their means (paper Fig. 3)."""
  entropy_N, correct_N = np.asarray(entropy_N, float), np.asarray(correct_N, bool)
  if entropy_N.size == 0:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.0, 3.4))
  hi = float(entropy_N.max()) if entropy_N.max() > 0 else 1.0
  edges = np.linspace(0.0, hi * 1.0001, bins + 1)
  for mask, name, color in ((correct_N, "correct", "tab:green"), (~correct_N, "wrong", "tab:red")):
    if mask.any():
      ax.hist(entropy_N[mask], bins=edges, alpha=0.5, color=color, density=True,
              label=f"{name} (n={int(mask.sum())}, mean {entropy_N[mask].mean():.3f})")
      ax.axvline(entropy_N[mask].mean(), color=color, ls="--", lw=1)
  ax.set_xlabel("entropy proxy H~ (mean NLL of sampled tokens)")
  ax.set_ylabel("density")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _series(runs: Mapping[str, Sequence[Mapping[str, Any]]], key: str) -> tuple:
  """Each run's (step, value) points of `key`, values to 6 significant digits (so that
  e.g. an ECE equal to the mean confidence up to float rounding counts as a repeat)."""
  return tuple((label, tuple((r["step"], float(f"{r[key]:.6g}")) for r in rows
                             if r.get(key) is not None and r.get("step") is not None))
               for label, rows in runs.items())


def informative_keys(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str]
                     ) -> tuple[list[str], dict[str, str]]:
  """(keys worth a panel, {left-out key: why}): a key is left out when it has one value
  in every row of every run (a flat line says nothing) or when every run's series
  equals that of an earlier kept key; keys no run has are dropped without a reason."""
  kept, left_out, seen = [], {}, {}
  for key in keys:
    series = _series(runs, key)
    values = {v for _, pts in series for _, v in pts}
    if not values:
      continue
    if len(values) == 1:
      left_out[key] = f"constant {next(iter(values))}"
    elif series in seen:
      left_out[key] = f"same values as {seen[series]}"
    else:
      seen[series] = key
      kept.append(key)
  return kept, left_out


def overlay_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str],
                   path: str, *, title: str = "") -> str | None:
  """One panel per metric key, one line per run, against the row's `step`.

  The title is the figure's suptitle under a constrained layout, which reserves room
  for it above the first row of panels.
  """
  keys = [k for k in keys if any(r.get(k) is not None for rows in runs.values() for r in rows)]
  if not keys:
    return None
  plt = _pyplot()
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.0 * nrows), squeeze=False,
                           layout="constrained")
  for ax, key in zip(axes.flat, keys):
    for label, rows in runs.items():
      pts = [(r["step"], r[key]) for r in rows
             if r.get(key) is not None and r.get("step") is not None]
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=label)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def overlay_reliability(runs: Mapping[str, Mapping[str, Mapping[str, Sequence]]], path: str
                        ) -> str | None:
  """One panel per benchmark, each run's reliability diagram overlaid."""
  benches = sorted({b for per_run in runs.values() for b in per_run})
  if not benches:
    return None
  plt = _pyplot()
  cols = min(3, len(benches))
  nrows = math.ceil(len(benches) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.0 * nrows), squeeze=False)
  drawn = False
  for ax, bench in zip(axes.flat, benches):
    for label, per_run in runs.items():
      if bench in per_run:
        drawn |= _reliability_axes(ax, per_run[bench], label)
    _unit_square(ax, bench)
    ax.legend(fontsize=7, loc="upper left")
  for ax in list(axes.flat)[len(benches):]:
    ax.axis("off")
  if not drawn:
    plt.close(fig)
    return None
  return _save(fig, path)


def grouped_bars(values: Mapping[str, Mapping[str, float | None]], path: str, *,
                 title: str = "", ylabel: str = "") -> str | None:
  """Bars per benchmark (x) and run (colour); a missing or undefined value is left out."""
  benches = sorted({b for per_run in values.values() for b, v in per_run.items()
                    if v is not None})
  if not benches:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(benches) * max(1, len(values)) / 2), 3.4))
  width = 0.8 / max(1, len(values))
  x = np.arange(len(benches))
  for i, (label, per_run) in enumerate(values.items()):
    ys = [per_run.get(b) for b in benches]
    xs = [x[j] + i * width for j, y in enumerate(ys) if y is not None]
    ax.bar(xs, [y for y in ys if y is not None], width=width, label=label)
  ax.set_xticks(x + width * (len(values) - 1) / 2)
  ax.set_xticklabels(benches, rotation=20, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  return _save(fig, path)
