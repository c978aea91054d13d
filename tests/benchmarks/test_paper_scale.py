"""The paper_scale scenario's table and target checks, on hand-made dry-run reports."""

import pytest

from benchmarks.scenarios import paper_scale

GB = 1e9


def _report(devices, *, update_peak, state, rollout_peak, coll, floor, decode=None):
  rollout = {"peak_bytes_per_device": rollout_peak * GB}
  if decode is not None:
    rollout["decode_bytes_per_step"] = decode
    rollout["collective_bytes_per_iteration"] = decode * 1000
  return {"devices": devices, "mesh": {"data": 1, "fsdp": devices // 2, "tensor": 2},
          "state_bytes_per_device": state * GB,
          "phases": {"rollout": rollout,
                     "old_logps": {"peak_bytes_per_device": 1.0 * GB},
                     "update": {"peak_bytes_per_device": update_peak * GB,
                                "collective_bytes_per_iteration": coll * GB,
                                "floor_bytes_per_iteration": floor * GB}}}


R8 = _report(8, update_peak=30.0, state=10.0, rollout_peak=20.0, coll=1200.0, floor=1000.0,
             decode=2.5e6)
R16 = _report(16, update_peak=20.0, state=5.0, rollout_peak=12.0, coll=2000.0, floor=1000.0)


def test_row_reads_peaks_state_collectives_and_decode_bytes():
  row = paper_scale.row(R8)
  assert row == {"compiled for": "cpu (fake devices)", "devices": 8, "mesh": "1x4x2",
                 "rollout mesh": "1x4x2", "slots": 0,
                 "rollout peak GB": 20.0, "old_logps peak GB": 1.0,
                 "update peak GB": 30.0, "max +resident GB": 30.0, "state GB": 10.0,
                 "update coll. GB": 1200.0, "update floor GB": 1000.0, "update x floor": 1.2,
                 "decode MB/step": 2.5, "rollout coll. GB/it": 2.5}
  assert "decode MB/step" not in paper_scale.row(R16)


def test_fit_counts_resident_bytes_and_reports_the_bf16_copy_figure():
  """A phase's resident bytes count toward the fit; XLA:CPU's f32 weight copies are
  reported at bf16 (half) beside the CPU figure, never dropped."""
  r = _report(16, update_peak=20.0, state=5.0, rollout_peak=25.0, coll=1.0, floor=1.0)
  r["phases"]["rollout"].update(resident_bytes=4 * GB, peak_with_resident_bytes=29 * GB,
                                f32_weight_copy_bytes=6 * GB)
  r["rollout"] = {"mesh": {"data": 4, "fsdp": 1, "tensor": 4}, "slots": 256}
  row = paper_scale.row(r)
  assert (row["rollout mesh"], row["slots"], row["max +resident GB"],
          row["rollout f32 copies GB"]) == ("4x1x4", 256, 29.0, 6.0)
  t = paper_scale.targets({("qwen2.5-math-7b", 16, ""): r})[("qwen2.5-math-7b", 16, "")]
  assert t["fit target"] == ("<= 28 GB: missed (1.04x) (29.0); with bf16 copies met (26.0)")
  assert t["rollout target"] == ("<= 14 GB: missed (1.79x) (25.0); with bf16 copies "
                                 "missed (1.57x) (22.0)")


def test_targets_fit_floor_and_activation_shrink():
  checks = paper_scale.targets({("qwen2.5-math-7b", 8, ""): R8,
                                ("qwen2.5-math-7b", 16, ""): R16})
  # 7B on 8: every phase <= 70 GB; 1.2x the floor <= 1.5x.
  assert checks[("qwen2.5-math-7b", 8, "")] == {"fit target": "<= 70 GB: met (30.0)",
                                            "floor target": "met"}
  c16 = checks[("qwen2.5-math-7b", 16, "")]
  assert c16["fit target"] == "<= 28 GB: met (20.0)"
  assert c16["rollout target"] == "<= 14 GB: met (12.0)"  # the rollout alone, 12 GB
  assert c16["floor target"] == "missed (1.33x)"          # 2.0 / 1.5
  # Activations (peak - state): 15 GB on 16 vs 20 GB on 8 = 0.75 > 0.6.
  assert c16["activations 16/8"] == "0.75: missed (1.25x)"
  assert paper_scale.activation_ratio(R8, R16) == pytest.approx(0.75)


def test_targets_without_a_fit_target_or_a_pair():
  checks = paper_scale.targets({("qwen2.5-math-1.5b", 8, ""): R8})
  assert checks[("qwen2.5-math-1.5b", 8, "")] == {"floor target": "met"}
  big = _report(16, update_peak=15.0, state=1.0, rollout_peak=12.0, coll=1.0, floor=1.0)
  assert paper_scale.targets({("qwen2.5-math-1.5b", 16, ""): big})[
      ("qwen2.5-math-1.5b", 16, "")]["fit target"] == "<= 14 GB: missed (1.07x) (15.0)"


def test_rollout_target_counts_the_continuous_prefill_too():
  """The continuous rollout is two programs (prompt table prefill, decode): its target
  takes the larger of each figure, with each phase's own float32 weight copies."""
  r = _report(16, update_peak=20.0, state=5.0, rollout_peak=12.0, coll=1.0, floor=1.0)
  r["phases"]["rollout"]["f32_weight_copy_bytes"] = 2 * GB          # 12 -> 11 at bf16
  r["phases"]["rollout_prefill"] = {"peak_bytes_per_device": 15.0 * GB,
                                    "f32_weight_copy_bytes": 6 * GB}  # 15 -> 12 at bf16
  t = paper_scale.targets({("qwen2.5-math-7b", 16, ""): r})[("qwen2.5-math-7b", 16, "")]
  assert t["rollout target"] == "<= 14 GB: missed (1.07x) (15.0); with bf16 copies met (12.0)"


def test_tpu_rows_say_what_they_were_compiled_for_and_pair_with_their_own_kind():
  """A report compiled for a TPU slice: the row names the slice and libtpu, gives the
  chip's HBM; its targets read the same figures (no f32 copies); the activation ratio
  pairs 16 chips with 8 of the same generation, never with the fake CPU devices."""
  tpu = {"platform": "tpu", "topology": "v5e:4x4", "libtpu": "0.0.42.1",
         "device_kind": "TPU v5 lite", "hbm_bytes_per_device": 16 * 2**30}
  r16 = dict(R16, target=tpu)
  row = paper_scale.row(r16)
  assert row["compiled for"] == "tpu v5e:4x4 (libtpu 0.0.42.1)"
  assert row["HBM GB"] == 17.18 and "rollout f32 copies GB" not in row
  r8 = dict(R8, target=dict(tpu, topology="v5e:2x4"))
  checks = paper_scale.targets({("qwen2.5-math-7b", 8, ""): R16,
                                ("qwen2.5-math-7b", 16, "v5e:4x4"): r16})
  assert "activations 16/8" not in checks[("qwen2.5-math-7b", 16, "v5e:4x4")]
  checks = paper_scale.targets({("qwen2.5-math-7b", 8, "v5e:2x4"): r8,
                                ("qwen2.5-math-7b", 16, "v5e:4x4"): r16})
  c16 = checks[("qwen2.5-math-7b", 16, "v5e:4x4")]
  assert c16["activations 16/8"] == "0.75: missed (1.25x)"
  assert c16["rollout target"] == "<= 14 GB: met (12.0)"


def test_a_phase_xla_tpu_refused_is_no_fit_and_no_ratio():
  """On a TPU slice a program over the chip's HBM is not compiled (`refused`, its peak a
  lower bound): no collectives or floor ratio for it, the fit target unknown while the
  lower bound is within it, no activation ratio against it; HBM fit names it."""
  tpu = {"platform": "tpu", "topology": "v5e:2x4", "libtpu": "0.0.42.1",
         "device_kind": "TPU v5 lite", "hbm_bytes_per_device": 16 * 2**30}
  r8 = dict(R8, target=tpu)
  r8["phases"] = dict(R8["phases"], update=dict(R8["phases"]["update"], refused="OOM"))
  row = paper_scale.row(r8)
  assert "update x floor" not in row and row["over HBM (lower bound)"] == "update"
  r16 = dict(R16, target=dict(tpu, topology="v5e:4x4"))
  checks = paper_scale.targets({("qwen2.5-math-7b", 8, "v5e:2x4"): r8,
                                ("qwen2.5-math-7b", 16, "v5e:4x4"): r16})
  c8 = checks[("qwen2.5-math-7b", 8, "v5e:2x4")]
  assert c8 == {"HBM fit": "over: XLA:TPU refused update",
                "fit target": "<= 70 GB: unknown (update not compiled, >= 30.0)"}
  c16 = checks[("qwen2.5-math-7b", 16, "v5e:4x4")]
  assert "activations 16/8" not in c16
  assert c16["HBM fit"] == "<= 17.18 GB: missed (1.16x) (20.0)"
