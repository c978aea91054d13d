"""The paper's workload on the devices it is for, compile-only: `experiments.main --dry_run`.

`experiments/configs/paper.py:egpo,<backbone>` as shipped (64 prompts x G = 16 = 1,024
responses, prompts 1,024 + responses 3,072 tokens, bf16 compute, f32 params and AdamW, its
micro-batching and remat; training on fsdp over every device, the rollout on its own
data x tensor mesh, `rollout.tensor`, with continuous batching on `rollout.slots` slots),
compiled from abstract shapes on 8 and 16 fake CPU devices (`egpo_jax.training.dry_run`;
nothing is allocated). Per phase the per-device peak of the compiled program (arguments +
temporaries + outputs - aliased); "max +resident" is the largest phase peak with the train
state's bytes that live alongside it (the fit targets use it). The update's collective
bytes per iteration next to the FSDP floor (params all-gathered for forward and backward
in the compute dtype, gradients reduce-scattered in f32, per micro-batch); the rollout's
per decode step and per iteration (every response at its cap), the reshard's per
iteration. CPU-compiled estimates (+-30%); compile seconds are this machine's.

Where libtpu is installed (`pip install -e ".[tpu-aot]"`), the same cases compiled for
TPU slices (`--dry_run_topology`: 8 chips v5e:2x4, 16 chips v5e:4x4, and 7B on a v5p:2x2x2,
8 chips of 95 GiB): XLA's TPU buffer assignment, no fake devices, no float32 weight
copies; "compiled for" says which row is which.
"""

from __future__ import annotations

import importlib.util
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
# (backbone, TPU slice): the paper configs' meshes on TPU chips (libtpu, deviceless).
TPU_CASES = (("qwen2.5-math-1.5b", "v5e:2x4"), ("qwen2.5-math-1.5b", "v5e:4x4"),
             ("qwen2.5-math-7b", "v5e:2x4"), ("qwen2.5-math-7b", "v5e:4x4"),
             ("qwen2.5-math-7b", "v5p:2x2x2"))
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
missed, on the CPU figure and, where XLA:CPU's float32 per-layer copies of the bf16
decode weights ("rollout f32 copies GB", found in the compiled program; a GPU keeps them
bf16) are in it, with those copies at bf16; an empty one has no target for that case.

Before -> after (2026-12-07, scale branch; GB per device, rollout / old_logps / update,
update x floor, decode MB per token step):
1.5B x8 19.5 / 4.4 / 18.5, 1.06x, 0 -> 15.7 (prefill 8.3, reshard 5.8) / 4.4 / 18.5,
1.06x, 59.6. 1.5B x16 13.1 / 2.3 / 9.3, 1.05x, 0 -> 11.1 (6.2, 5.5) / 2.3 / 9.3, 1.05x,
31.7. 7B x8 (1x4x2) 44.3 / 9.4 / 34.9, 2.11x, 123 -> 31.1 (19.1, 16.0) / 9.5 / 30.7,
0.87x, 160. 7B x16 (1x8x2) 30.3 / 4.9 / 17.6, 1.50x, 62 -> 21.9 (14.8, 14.1) / 5.1 /
15.7, 0.87x, 82. What changed: (1) host mode's rollout is the continuous engine
(`sampling/continuous.py`) on 256 slots: its KV cache is 256 x 3,071 slots instead of
1,024 x 4,095. (2) It runs on its own mesh (`distributed.rollout_mesh`): data-parallel
groups of `rollout.tensor` devices (7B 4, 1.5B 2), the params cast to bf16 and resharded
there once per iteration (3.3-9.5 GB moved per device); so 7B trains on FSDP alone,
0.87x its floor (tensor = 2 made it 2.11x / 1.50x with Megatron all-reduces). Per token
step the rollout moves the tensor groups' two all-reduces per layer and the logits
(gathered over the vocabulary-split head; as many bytes as the prompt table's
first-token logits gathered per step when the head is whole), on a decode that had moved
nothing (1.5B, weights whole) or 62-123 MB (7B).

The fit targets count, for every phase, what lives alongside the program (the optimizer
moments; the f32 master params while the rollout decodes from bf16 copies; the previous
chunk's outputs): met on the CPU figures. The rollout target (7B on 16 devices <= 14 GB,
the larger of the continuous engine's two programs, prefill and decode): met with
XLA:CPU's float32 weight copies counted at bf16 (12.7 GB decode, 12.3 prefill), and
without any (9.2, 9.0); missed on the raw CPU figure (16.2 decode, 15.6 prefill: 7.1 and
6.5 GB of it are those copies, which XLA:CPU hoists out of the loops, every layer's at
once).

Before -> after (2026-12-07, decode branch; 7B x16 rollout / prefill / reshard, GB per
device, CPU figure (with bf16 copies, without)): 21.9 (18.4, 14.9) / 14.8 / 14.1 ->
16.2 (12.7, 9.2) / 15.6 (12.3, 9.0) / 14.1; 1.5B x16 11.1 / 6.2 / 5.5 -> 7.8 (6.3, 4.7)
/ 7.1 / 5.5. What changed (`sampling/continuous.py`; XLA's buffer assignment,
`--xla_dump_to`, had put 14.8 of the decode's 15.1 GB of temporaries in float32 copies of
bf16 arrays): (1) the slots' cache and the prompt table are carried as the uint16 bits of
their bf16 values: XLA:CPU ran each step's per-slot key/value scatter on a float32 copy
of every layer's whole cache (5.6 GB), and kept a float32 copy of every layer's whole
table for the per-step gather (1.9 GB); on bits the scatter is in place and the gather
reads 16-bit values (a GPU reads the same bytes either way). (2) The prompt table is
made whole over the data replicas once, at the prefill (+0.7 GB held), instead of
gathered again by every chunk's call (0.9 GB, in float32 on CPU). (3) The decode weights
are cast to the compute dtype and gathered over the batch axes once before the loop
(`sharding.decode_param_specs`, the head kept vocabulary-split), so a rollout mesh with
fsdp > 1 no longer decodes FSDP-split. What the decode still holds per device: the
stacked bf16 params (3.8 GB), their per-layer slices (`transformer.decode_params`, the
f32 copies here; a GPU that copies the slices holds 3.5 GB of them, the "with bf16
copies" figure), the cache (2.8), the whole table (0.9), per-layer prefix gathers and
attention partials (about 1.2). The prefill's f32 copies are of the stacked weights,
which a layer scan on a GPU reads without copying. Variants (7B x16, decode / prefill,
CPU figure): 128 slots 14.1 / 14.1 (half the cache, a slower rollout); a 48-entry
table refilled in the loop (`rollout.table_entries`, 3 S / G) 23.6 (its in-loop prefill
converts the stacked weights too); full attention 16.2, as bounded.

TPU rows (2026-12-07, tpu branch; the same command where libtpu is installed, `pip
install -e ".[tpu-aot]"`): compiled by libtpu 0.0.42.1 for v5e slices (16 GiB of HBM a
chip = 17.18 GB, of which XLA:TPU lets a program use 15.75 GiB) and one v5p:2x2x2 (95
GiB), from the topology's compile-only devices: XLA's TPU buffer assignment, no float32
weight copies. The rollout target (7B on 16 chips, prefill and decode each <= 14 GB) is
met on TPU: decode 11.5 GB, prefill 9.0. The decode's 11.5: arguments 7.6 (the bf16
params 3.8, the slots' KV cache, the whole prompt table), temporaries 3.9, whose largest
buffers are the per-layer bf16 weight slices (`transformer.decode_params`: multi-output
`jit(_run)/squeeze` fusions before the loop; 28 layers' slices are 3.3 GB, held beside
the stacked weights, as on CPU but in bf16). With the train state that
lives beside it (5.7 GB: f32 master params and AdamW moments) the decode needs 17.2 GB a
chip, just over a v5e's 17.18 ("HBM fit"). 7B on 8 v5e chips: XLA:TPU refuses to compile
the update (21.1 GiB of temporaries alone; the row's 34.1 is arguments + temporaries, a
lower bound), and the decode needs 27.7 GB with the state; on 8 v5p chips every phase
compiles, the largest the update at 30.0 GB. Collectives: XLA:TPU turns the FSDP
gathers and gradient reductions of the large matmuls into windowed einsums (shards
passed by collective-permutes, overlapped with the dots, in loops unrolled by 2) and
reduces the gradients in bf16 before they become f32, so the update moves 0.70-0.94x the
floor (which counts f32 gradients); decode 25-130 MB per token step.

Decode collectives after the per-device sampler and cache write (2026-12-07, coll branch;
CPU, 1.5B x8, `python -m experiments.main
--config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b --dry_run
--dry_run_devices=8`; the table's rows predate it): 59.6 -> 16.7 MB per token
step. Gone: the [rows, V] logits all-gather over `tensor` (38.9 MB: the vocabulary-split
head's logits are now sampled per device, `filters.sample_with_logps`, exchanging [rows]
and [rows, tensor] values) and the per-row KV-cache write's all-gathers across the data
groups (3.7 MB: `transformer._write_rows` per device). Left: the two per-layer all-reduces
of [local rows, D] (16.5 MB; the down_proj half is counted in f32, an XLA:CPU fusion the
parser does not see as widened bf16, so about 11 MB on a GPU or TPU) and the
vocabulary-split embedding lookup's all-reduce (0.2 MB). Rollout collectives per
iteration 732 -> 206 GB. With `--config.rollout.decode_attention=pallas
--config.rollout.read_block=128` on v5e:4x4 (7B x16; the Mosaic kernel, compiled since
kernels target the mesh's devices, `sharding.target_platform`; before the collective
change): decode 11.05 GB (bounded 11.48), prefill 8.99.
"""


def compiled_for(report: dict[str, Any]) -> str:
  """"cpu (fake devices)" or the TPU slice and libtpu's version."""
  t = report.get("target", {"platform": "cpu"})
  if t["platform"] != "tpu":
    return f"{t['platform']} (fake devices)"
  return f"tpu {t['topology']} (libtpu {t['libtpu']})"


def row(report: dict[str, Any]) -> dict[str, Any]:
  """One table row (numbers in GB) from a dry-run report (`dry_run.report_json`)."""
  phases = report["phases"]
  update = phases["update"]
  ro = report.get("rollout", {})
  out: dict[str, Any] = {"compiled for": compiled_for(report), "devices": report["devices"],
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
  refused = [name for name, p in phases.items() if p.get("refused")]
  if refused:   # XLA:TPU compiles no program over the chip's HBM: peak = args + temporaries
    out["over HBM (lower bound)"] = ", ".join(refused)
  out["max +resident GB"] = round(max_peak(report) / GB, 2)
  hbm = report.get("target", {}).get("hbm_bytes_per_device", 0)
  if hbm:
    out["HBM GB"] = round(hbm / GB, 2)
  out["state GB"] = round(report["state_bytes_per_device"] / GB, 2)
  if "reshard" in phases:
    out["reshard GB/it"] = round(phases["reshard"]["collective_bytes_per_iteration"] / GB, 1)
  if not update.get("refused"):   # an update XLA:TPU did not compile has no collectives
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


def _family(topology: str) -> str:
  """"" for fake CPU devices, else the TPU generation ("v5e")."""
  return topology.partition(":")[0]


def targets(reports: dict[tuple[str, int, str], dict[str, Any]]
            ) -> dict[tuple[str, int, str], dict]:
  """The issue's targets per case (backbone, devices, TPU slice or ""): fit (every phase,
  with the bytes resident alongside), the rollout's own peak, update collectives vs
  floor, activation shrink (16 devices over 8 of the same kind)."""
  out = {}
  for (model, devices, topology), report in reports.items():
    t: dict[str, str] = {}
    refused = [n for n, p in report["phases"].items() if p.get("refused")]
    hbm = report.get("target", {}).get("hbm_bytes_per_device", 0)
    if hbm:   # a TPU slice: every phase with what lives beside it in the chip's HBM
      t["HBM fit"] = (f"over: XLA:TPU refused {', '.join(refused)}" if refused else
                      _fit(max_peak(report), max_peak(report), round(hbm / GB, 2)))
    limit = FIT_TARGETS_GB.get((model, devices))
    if limit is not None:
      if refused and max_peak(report) <= limit * GB:   # a lower bound proves no fit
        t["fit target"] = (f"<= {limit:g} GB: unknown ({', '.join(refused)} not compiled, "
                           f">= {max_peak(report) / GB:.1f})")
      else:
        t["fit target"] = _fit(max_peak(report), max_peak(report, True), limit)
    limit = ROLLOUT_TARGETS_GB.get((model, devices))
    if limit is not None:
      # The rollout's programs: the prompt table's prefill (continuous engine) and the decode.
      ps = [report["phases"][n] for n in ("rollout_prefill", "rollout")
            if n in report["phases"]]
      peak = max(p["peak_bytes_per_device"] for p in ps)
      bf16 = max(p["peak_bytes_per_device"] - p.get("f32_weight_copy_bytes", 0) // 2
                 for p in ps)
      t["rollout target"] = _fit(peak, bf16, limit)
    update_refused = lambda r: bool(r["phases"]["update"].get("refused"))  # noqa: E731
    if not update_refused(report):
      t["floor target"] = verdict(update_floor_ratio(report), UPDATE_FLOOR_TARGET)
    eight = next((k for k in reports if k[:2] == (model, 8)
                  and _family(k[2]) == _family(topology)), None)
    if devices == 16 and eight and not update_refused(reports[eight]):
      ratio = activation_ratio(reports[eight], report)
      t["activations 16/8"] = f"{ratio:.2f}: " + verdict(ratio, ACTIVATION_SHRINK_TARGET)
    out[(model, devices, topology)] = t
  return out


# Set to a folder to keep each case's full dry-run report there as <backbone>_<devices>.json
# (<backbone>_<slice>.json for a TPU slice); with REUSE_ENV=1 too, a report already there
# is read instead of compiled again (re-rendering the table after editing the notes).
JSON_DIR_ENV = "PAPER_SCALE_JSON_DIR"
REUSE_ENV = "PAPER_SCALE_REUSE_JSON"


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def measure(model: str, devices: int, extra_args: tuple[str, ...] = (),
            topology: str = "") -> dict[str, Any]:
  """Runs the dry run of the paper config in a fresh process (the device count must be
  set before JAX starts) and returns its JSON report; with `topology`, compiled for that
  TPU slice instead (`devices` is then its chip count; a case that exceeds the chip's
  HBM, the dry run's exit 1, is still reported)."""
  with tempfile.TemporaryDirectory() as tmp:
    keep = os.environ.get(JSON_DIR_ENV)
    where = topology.replace(":", "_") if topology else str(devices)
    path = os.path.join(keep or tmp, f"{model}_{where}.json")
    if keep and os.environ.get(REUSE_ENV) == "1" and os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    target = (f"--dry_run_topology={topology}" if topology
              else f"--dry_run_devices={devices}")
    cmd = [sys.executable, "-m", "experiments.main",
           f"--config=experiments/configs/paper.py:egpo,{model}", "--dry_run",
           target, f"--dry_run_json={path}", *extra_args]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode and not (topology and done.returncode == 1):
      raise RuntimeError(f"dry run of {model} on {topology or devices} devices failed: "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    with open(path) as f:
      return json.load(f)


def run(quick: bool) -> list[harness.Row]:
  cases = [(m, d, "") for m, d in (CASES[:1] if quick else CASES)]
  if has_libtpu():
    cases += [(m, 0, t) for m, t in (TPU_CASES[:1] if quick else TPU_CASES)]
  reports = {}
  for model, devices, topology in cases:
    report = measure(model, devices, topology=topology)
    reports[(model, report["devices"], topology)] = report
  checks = targets(reports)
  rows = []
  for (model, devices, topology), report in reports.items():
    extra = {**row(report), **checks[(model, devices, topology)]}
    name = f"{model} x{devices}" + (f" {topology}" if topology else "")
    rows.append(harness.Row(name=name, seconds=None, extra=extra))
  return rows
