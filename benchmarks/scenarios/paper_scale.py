"""The paper's workload on the devices it is for, compile-only: `experiments.main --dry_run`.

`experiments/configs/paper.py:egpo,<backbone>` as shipped (64 prompts x G = 16 = 1,024
responses, prompts 1,024 + responses 3,072 tokens, bf16 compute, f32 params and AdamW, its
micro-batching and remat) on the default mesh (fsdp over every device), compiled from
abstract shapes on 8 and 16 fake CPU devices (`egpo_jax.training.dry_run`; nothing is
allocated). Per phase the per-device peak (arguments + temporaries + outputs - aliased),
the update's collective bytes per iteration next to the FSDP floor (params all-gathered
for forward and backward in the compute dtype, gradients reduce-scattered in f32, per
micro-batch), the rollout's collective bytes per decode step. CPU-compiled estimates
(+-30%); compile seconds are this machine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks import harness

GB = 1e9
CASES = (("qwen2.5-math-1.5b", 8), ("qwen2.5-math-1.5b", 16), ("qwen2.5-math-7b", 8),
         ("qwen2.5-math-7b", 16))
# Per-device targets of the paper-scale issue: (backbone, devices) -> GB for every phase.
FIT_TARGETS_GB = {("qwen2.5-math-1.5b", 16): 14.0, ("qwen2.5-math-7b", 8): 70.0,
                  ("qwen2.5-math-7b", 16): 28.0}
# The rollout-engine issue's target: the rollout phase alone, with the config's own mesh.
ROLLOUT_TARGETS_GB = {("qwen2.5-math-7b", 16): 14.0}
UPDATE_FLOOR_TARGET = 1.5      # update collectives <= 1.5 x the FSDP floor
ACTIVATION_SHRINK_TARGET = 0.6  # (peak16 - state16) <= 0.6 x (peak8 - state8), update

NOTES = """
Read with the dry run's own table (`python -m experiments.main --config=... --dry_run
--dry_run_devices=N`), which also lists the largest buffers and collectives by kind.
"update x floor" is the update's collective bytes over its FSDP floor; "activations 16/8"
is (peak - train state) of the update on 16 devices over the same on 8 (1/2 when
activations split with the devices). A target column says "met" or by how much it is
missed; an empty one has no target for that case.

Before -> after (2026-12-07, scale branch, with main's blockwise attention): 1.5B update
peak 13.8 -> 8.5 GB on 8 and 8.1 -> 4.3 GB on 16 ("activations 16/8" 0.61 -> 0.51).
Blockwise attention alone gave 10.6 / 6.6 GB (0.65: it shrinks the per-row part, so the
fixed part weighed more; the reference attention path now gives 11.7 / 5.9 GB, 0.51);
the rest is the log-prob head made vocabulary-parallel over every
device (`core/logprobs.py`): before, each device held the whole head and a float32
[V, D] partial sum of its gradient (about 1.4 GB at 1.5B, the same on 8 and 16 devices).
The rollout no longer runs its decode FSDP-sharded (3.0 GB of activation all-reduces per
token step for 1.5B, 5.7 GB for 7B): the weights are gathered once before the token loops
(`sampling/engine.py`), so decode moves nothing per step with tensor = 1 and only the
two per-layer [rows, D] all-reduces over `tensor` for 7B (tensor = 2 in the paper
config). The price is the gathered weights in the rollout's memory, and on XLA:CPU a
float32 copy of them (hoisted conversion for its dots; a GPU keeps bf16): 1.5B 14.6 ->
19.5 GB on 8. The 7B rollout target (<= 14 GB on 16) is out of reach with one rollout
pass: the bf16 KV cache of 1,024 rows x 4,095 slots is 10.6 GB per device at any mesh,
the sharded f32 master params 1.9 GB, and the gathered weights 15.2 / tensor GB; it
needs the responses decoded in several sequential row chunks (not built). With tensor
> 1 the update's Megatron all-reduces are outside the FSDP floor, hence 7B's ratio
(fewer bytes than before on 16 devices: 2,924 vs 3,429 GB); and 7B's rollout (30.3 GB,
CPU estimate) now misses the 28 GB fit target on 16.
"""


def row(report: dict[str, Any]) -> dict[str, Any]:
  """One table row (numbers in GB) from a dry-run report (`dry_run.report_json`)."""
  phases = report["phases"]
  update = phases["update"]
  ro = report.get("rollout", {})
  out: dict[str, Any] = {"devices": report["devices"],
                         "mesh": "x".join(str(v) for v in report["mesh"].values()),
                         "rollout mesh": "x".join(str(v) for v in ro.get(
                             "mesh", report["mesh"]).values()),
                         "slots": ro.get("slots", 0)}
  for name in ("reshard", "rollout_prefill", "rollout", "old_logps", "ref_logps", "update"):
    if name in phases:
      out[f"{name} peak GB"] = round(phases[name]["peak_bytes_per_device"] / GB, 2)
  rollout = phases.get("rollout", {})
  if rollout.get("f32_weight_copy_bytes"):
    out["rollout f32 copies GB"] = round(rollout["f32_weight_copy_bytes"] / GB, 2)
  out["max +resident GB"] = round(max_peak(report) / GB, 2)
  out["state GB"] = round(report["state_bytes_per_device"] / GB, 2)
  if "reshard" in phases:
    out["reshard GB/it"] = round(phases["reshard"]["collective_bytes_per_iteration"] / GB, 1)
  out["update coll. GB"] = round(update["collective_bytes_per_iteration"] / GB, 1)
  out["update floor GB"] = round(update["floor_bytes_per_iteration"] / GB, 1)
  out["update x floor"] = round(update_floor_ratio(report), 2)
  if "decode_bytes_per_step" in rollout:
    out["decode MB/step"] = round(rollout["decode_bytes_per_step"] / 1e6, 1)
    out["rollout coll. GB/it"] = round(rollout["collective_bytes_per_iteration"] / GB, 1)
  return out


def update_floor_ratio(report: dict[str, Any]) -> float:
  update = report["phases"]["update"]
  floor = update["floor_bytes_per_iteration"]
  return update["collective_bytes_per_iteration"] / floor if floor else float("inf")


def _need(p: dict[str, Any], bf16_copies: bool = False) -> int:
  """A phase's bytes per device with what lives alongside it; `bf16_copies`: with
  XLA:CPU's float32 per-layer weight copies counted at the bf16 a GPU keeps."""
  need = p.get("peak_with_resident_bytes", p["peak_bytes_per_device"])
  return need - (p.get("f32_weight_copy_bytes", 0) // 2 if bf16_copies else 0)


def max_peak(report: dict[str, Any], bf16_copies: bool = False) -> int:
  return max(_need(p, bf16_copies) for p in report["phases"].values())


def activation_ratio(report8: dict[str, Any], report16: dict[str, Any]) -> float:
  """(update peak - state) on 16 devices / the same on 8."""
  act = lambda r: r["phases"]["update"]["peak_bytes_per_device"] - r["state_bytes_per_device"]
  return act(report16) / act(report8)


def verdict(value: float, target: float) -> str:
  return "met" if value <= target else f"missed ({value / target:.2f}x)"


def _fit(value: int, bf16_value: int, limit: float) -> str:
  """The CPU figure's verdict, and the one with bf16 weight copies where they differ."""
  text = f"<= {limit:g} GB: {verdict(value / GB, limit)} ({value / GB:.1f})"
  if bf16_value != value:
    text += f"; with bf16 copies {verdict(bf16_value / GB, limit)} ({bf16_value / GB:.1f})"
  return text


def targets(reports: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, int], dict]:
  """The issue's targets per case: fit (every phase, with the bytes resident alongside),
  the rollout's own peak, update collectives vs floor, activation shrink."""
  out = {}
  for (model, devices), report in reports.items():
    t: dict[str, str] = {}
    limit = FIT_TARGETS_GB.get((model, devices))
    if limit is not None:
      t["fit target"] = _fit(max_peak(report), max_peak(report, True), limit)
    limit = ROLLOUT_TARGETS_GB.get((model, devices))
    if limit is not None:
      p = report["phases"]["rollout"]
      peak = p["peak_bytes_per_device"]
      t["rollout target"] = _fit(peak, peak - p.get("f32_weight_copy_bytes", 0) // 2, limit)
    t["floor target"] = verdict(update_floor_ratio(report), UPDATE_FLOOR_TARGET)
    if devices == 16 and (model, 8) in reports:
      ratio = activation_ratio(reports[(model, 8)], report)
      t["activations 16/8"] = f"{ratio:.2f}: " + verdict(ratio, ACTIVATION_SHRINK_TARGET)
    out[(model, devices)] = t
  return out


# Set to a folder to keep each case's full dry-run report there as <backbone>_<devices>.json.
JSON_DIR_ENV = "PAPER_SCALE_JSON_DIR"


def measure(model: str, devices: int, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
  """Runs the dry run of the paper config in a fresh process (the device count must be
  set before JAX starts) and returns its JSON report."""
  with tempfile.TemporaryDirectory() as tmp:
    keep = os.environ.get(JSON_DIR_ENV)
    path = os.path.join(keep or tmp, f"{model}_{devices}.json")
    cmd = [sys.executable, "-m", "experiments.main",
           f"--config=experiments/configs/paper.py:egpo,{model}", "--dry_run",
           f"--dry_run_devices={devices}", f"--dry_run_json={path}", *extra_args]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"dry run of {model} on {devices} devices failed: "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    with open(path) as f:
      return json.load(f)


def run(quick: bool) -> list[harness.Row]:
  cases = CASES[:1] if quick else CASES
  reports = {case: measure(*case) for case in cases}
  checks = targets(reports)
  rows = []
  for (model, devices), report in reports.items():
    extra = {**row(report), **checks[(model, devices)]}
    rows.append(harness.Row(name=f"{model} x{devices}", seconds=None, extra=extra))
  return rows
