"""The dry run compiled for a TPU slice (`--dry_run_topology`, deviceless AOT by libtpu).

Without libtpu (CI, the main venv): the flag's validation and its one-line error naming
the fix, before anything is compiled; the HLO parser on hand-written XLA:TPU text (loops
without `known_trip_count`, async collectives cloned into start / overlap / done fusions,
on-chip memory spaces). With libtpu (`pip install -e ".[tpu-aot]"`): the tiny model's
every phase compiled for v5e:2x4, and the command line.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from egpo_jax.training import dry_run
from test_dry_run import _tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NO_LIBTPU = "libtpu not installed (pip install -e '.[tpu-aot]')"
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)


def _main(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, "-m", "experiments.main", "--dry_run", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# ---------------------------------------------------------------------------------------
# Flag validation (no libtpu needed).

@pytest.mark.parametrize("name", ["v5e", "4x4", "v5e:4", "v5e:4x4x4x4", "v5e:4 x4"])
def test_a_malformed_topology_is_named_before_libtpu_is_looked_for(name):
  with pytest.raises(dry_run.DryRunError, match=r"^--dry_run_topology=.*generation:chips"):
    dry_run.tpu_devices(name)


def test_without_libtpu_the_error_names_the_flag_and_the_fix(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(dry_run.DryRunError) as err:
    dry_run.run(_tiny_config(), topology="v5e:4x4")
  line = str(err.value)
  assert "\n" not in line and line.startswith("--dry_run_topology=v5e:4x4: ")
  assert 'pip install -e ".[tpu-aot]"' in line


def test_devices_and_topology_together_are_refused():
  with pytest.raises(dry_run.DryRunError, match="--dry_run_devices=8 with "
                     "--dry_run_topology=v5e:2x4: give one"):
    dry_run.run(_tiny_config(), devices=8, topology="v5e:2x4")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu installed: its absence cannot be shown here")
def test_command_line_without_libtpu_exits_2_before_compiling():
  done = _main("--config=experiments/configs/tiny.py", "--dry_run_topology=v5e:2x4")
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip() == ('error: --dry_run_topology=v5e:2x4: compiling for a TPU '
                                 'without one needs libtpu: pip install -e ".[tpu-aot]"')
  assert "compiling" not in done.stdout


def test_caveat_and_memory_of_a_tpu_target():
  tpu = {"platform": "tpu", "libtpu": "0.0.42.1", "topology": "v5e:4x4",
         "device_kind": "TPU v5 lite"}
  text = dry_run.caveat(tpu)
  assert text.startswith("TPU-compiled by libtpu 0.0.42.1 for v5e:4x4 (TPU v5 lite")
  assert "nothing was allocated" in text and "+-30%" not in text
  assert dry_run.caveat({"platform": "cpu"}) == dry_run.CAVEAT
  assert dry_run.TPU_HBM_GIB["TPU v5 lite"] == 16


# ---------------------------------------------------------------------------------------
# XLA:TPU's HLO text, as libtpu prints it (trimmed): a layer scan with no
# known_trip_count whose counter starts at a copied constant 0, steps by 1 and stops at 3,
# holding an all-gather that XLA:TPU cloned into the async start, the fusion it overlaps
# with and the done (one channel); a data-dependent decode loop (an `and` condition);
# buffers in HBM and in on-chip memory (S(1)); an async copy.

TPU_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%start_comp (p0: bf16[8,128]) -> (bf16[8,128], bf16[64,128], u32[]) {
  %p0 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%p0), channel_id=7, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %cc.1 = (bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, bf16[64,128]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%overlap_comp (p1: bf16[8,128], p2: f32[16,128]) -> (f32[16,128], bf16[64,128]) {
  %p1 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p2 = f32[16,128]{1,0:T(8,128)} parameter(1)
  %all-gather.2 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} all-gather(%p1), channel_id=7, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %t = (f32[16,128]{1,0:T(8,128)}, bf16[64,128]{1,0:T(8,128)(2,1)S(1)}) tuple(%p2, %all-gather.2)
}

%done_comp (p3: bf16[8,128]) -> bf16[64,128] {
  %p3 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.3 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%p3), channel_id=7, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %cc.2 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} custom-call(%p3, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%layer_body (b: (s32[], bf16[8,128], f32[16,128])) -> (s32[], bf16[8,128], f32[16,128]) {
  %b = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[16,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%b), index=0
  %w = bf16[8,128]{1,0:T(8,128)(2,1)} get-tuple-element(%b), index=1
  %x = f32[16,128]{1,0:T(8,128)} get-tuple-element(%b), index=2
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %start = (bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, bf16[64,128]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) fusion(%w), kind=kCustom, calls=%start_comp
  %overlap = (f32[16,128]{1,0:T(8,128)}, bf16[64,128]{1,0:T(8,128)(2,1)S(1)}) fusion(%w, %x), kind=kOutput, calls=%overlap_comp
  %done = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} fusion(%w), kind=kCustom, calls=%done_comp
  %y = f32[16,128]{1,0:T(8,128)} get-tuple-element(%overlap), index=0
  ROOT %o = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[16,128]{1,0:T(8,128)}) tuple(%next, %w, %y)
}

%layer_cond (c: (s32[], bf16[8,128], f32[16,128])) -> pred[] {
  %c = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[16,128]{1,0:T(8,128)}) parameter(0)
  %three = s32[]{:T(128)} constant(3)
  %k = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%k, %three), direction=LT
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%decode_body (d: (s32[], f32[4,128])) -> (s32[], f32[4,128]) {
  %d = (s32[]{:T(128)}, f32[4,128]{1,0:T(4,128)}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%d), index=0
  %v = f32[4,128]{1,0:T(4,128)} get-tuple-element(%d), index=1
  %ar = f32[4,128]{1,0:T(4,128)} all-reduce(%v), channel_id=9, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %r = (s32[]{:T(128)}, f32[4,128]{1,0:T(4,128)}) tuple(%j, %ar)
}

%decode_cond (e: (s32[], f32[4,128])) -> pred[] {
  %e = (s32[]{:T(128)}, f32[4,128]{1,0:T(4,128)}) parameter(0)
  %limit = s32[]{:T(128)} constant(9)
  %m = s32[]{:T(128)} get-tuple-element(%e), index=0
  %below = pred[]{:T(512)} compare(%m, %limit), direction=LT
  %busy = pred[]{:T(512)} constant(true)
  ROOT %both = pred[]{:T(512)} and(%below, %busy)
}

ENTRY %main (w0: bf16[8,128], x0: f32[16,128]) -> f32[16,128] {
  %w0 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %x0 = f32[16,128]{1,0:T(8,128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %counter = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[16,128]{1,0:T(8,128)}) tuple(%counter, %w0, %x0)
  %scan = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}, f32[16,128]{1,0:T(8,128)}) while(%init), condition=%layer_cond, body=%layer_body
  %big = f32[1024,128]{1,0:T(8,128)S(1)} broadcast(%x0), dimensions={}
  %hbm = f32[512,128]{1,0:T(8,128)} broadcast(%x0), dimensions={}
  %cs = (f32[256,128]{1,0:T(8,128)}, f32[256,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%hbm)
  %cd = f32[256,128]{1,0:T(8,128)} copy-done(%cs)
  %dinit = (s32[]{:T(128)}, f32[4,128]{1,0:T(4,128)}) tuple(%zero, %cd)
  %dec = (s32[]{:T(128)}, f32[4,128]{1,0:T(4,128)}) while(%dinit), condition=%decode_cond, body=%decode_body
  ROOT %out = f32[16,128]{1,0:T(8,128)} get-tuple-element(%scan), index=2
}
"""


def test_tpu_hlo_loops_without_known_trip_counts_and_async_clones():
  h = dry_run.parse_hlo(TPU_HLO, unknown_trip_counts=[5])
  # The all-gather's three clones (start / overlap / done, channel 7) count once, times
  # the 3 layers that the scan's condition bounds; its result is 64 x 128 bf16.
  gathers = [c for c in h.collectives if c.kind == "all-gather"]
  assert len(gathers) == 1
  assert (gathers[0].bytes, gathers[0].executions, gathers[0].group_size) == (
      64 * 128 * 2, 3, 8)
  # The decode loop's condition is data-dependent: it takes the caller's 5 steps and is
  # the one unknown loop (its per-step bytes: one f32 [4, 128] all-reduce).
  assert h.unknown_loops == (4 * 128 * 4,)
  reduces = [c for c in h.collectives if c.kind == "all-reduce"]
  assert [(c.executions, c.group_size) for c in reduces] == [(5, 4)]
  assert dry_run.bytes_by_kind(h.collectives)["all-gather"] == 3 * 64 * 128 * 2


def test_tpu_hlo_largest_buffers_are_in_device_memory_only():
  h = dry_run.parse_hlo(TPU_HLO, unknown_trip_counts=[5])
  shapes = [(b["shape"], b["bytes"]) for b in h.largest_buffers]
  # The on-chip f32 [1024, 128] (S(1)) is not HBM; the async copy's destination is one
  # f32 [256, 128], not its (destination, source, context) tuple.
  assert shapes[0] == ("f32[512,128]", 512 * 128 * 4)
  assert not any(s.startswith("f32[1024,128]") for s, _ in shapes)
  assert ("f32[256,128]", 256 * 128 * 4) in shapes
  assert dry_run.device_memory_bytes("(bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, "
                                     "f32[2]{0:T(128)}, s32[4]{0})") == 8 + 16
  assert dry_run.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}") == 8 * 128 * 2


def test_static_trip_count_needs_a_constant_bound_and_start():
  comps, entry, _ = dry_run._parse_module(TPU_HLO)
  defs = {name: (op, rest) for name, _, op, rest in comps[entry]}
  rests = {name: rest for name, _, op, rest in comps[entry] if op == "while"}
  assert dry_run.static_trip_count(comps, defs, rests["scan"]) == 3
  assert dry_run.static_trip_count(comps, defs, rests["dec"]) is None
  # A counter that does not start at a constant: unknown.
  defs_moved = dict(defs, counter=("parameter", "parameter(2)"))
  assert dry_run.static_trip_count(comps, defs_moved, rests["scan"]) is None
  # A body that steps by 2 (XLA:TPU's windowed einsum loops, unrolled): ceil(3 / 2).
  two, _, _ = dry_run._parse_module(TPU_HLO.replace("%one = s32[]{:T(128)} constant(1)",
                                                    "%one = s32[]{:T(128)} constant(2)"))
  assert dry_run.static_trip_count(two, defs, rests["scan"]) == 2
  # A body whose counter is not counter + constant: unknown.
  odd, _, _ = dry_run._parse_module(TPU_HLO.replace("add(%i, %one)", "multiply(%i, %one)"))
  assert dry_run.static_trip_count(odd, defs, rests["scan"]) is None


def test_hbm_refusal_gives_the_temporaries_else_none():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (21.11G) exceeds available HBM (15.75G).")
  assert dry_run._hbm_refusal_temp_bytes(msg) == int(21.11 * 2**30)
  assert dry_run._hbm_refusal_temp_bytes(msg.replace("(21.11G)", "(512M)")) == 512 * 2**20
  assert dry_run._hbm_refusal_temp_bytes("INTERNAL: something else") is None


# ---------------------------------------------------------------------------------------
# Compiled by libtpu (skipped without it).

TOPOLOGY = "v5e:2x4"


@pytest.fixture(scope="module")
def tpu_report():
  pytest.importorskip("libtpu", reason=NO_LIBTPU)
  return dry_run.run(_tiny_config(**{"loss.kl_coef": 0.01, "loss.old_logps": "recompute"}),
                     topology=TOPOLOGY)


@needs_libtpu
def test_every_phase_compiles_for_the_tpu_slice(tpu_report):
  r = tpu_report
  assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert list(r["phases"]) == ["rollout", "old_logps", "ref_logps", "update"]
  t = r["target"]
  assert (t["platform"], t["topology"], t["device_kind"]) == ("tpu", TOPOLOGY, "TPU v5 lite")
  assert t["hbm_bytes_per_device"] == 16 * 2**30
  assert r["caveat"].startswith(f"TPU-compiled by libtpu {t['libtpu']} for {TOPOLOGY}")
  for phase in r["phases"].values():
    assert phase["peak_bytes_per_device"] == (phase["argument_bytes"] + phase["temp_bytes"]
                                              + phase["output_bytes"] - phase["alias_bytes"])
    assert 0 < phase["peak_bytes_per_device"] < t["hbm_bytes_per_device"]
    assert "f32_weight_copy_bytes" not in phase   # XLA:CPU's artefact only
  # Collectives from the TPU HLO: FSDP gathers the weights and reduces the gradients in
  # the update's micro-batch scan (XLA:TPU has no known_trip_count: the scans' bounds are
  # read from their conditions, so the micro-batches and layers multiply in).
  update = r["phases"]["update"]
  assert update["collective_bytes_by_kind"]["all-gather"] > 0
  assert update["collective_bytes_by_kind"]["all-reduce"] > 0
  assert max(c["executions"] for c in update["collectives"]) >= 2 * 2   # micro x layers
  assert 0.25 < update["collective_bytes_per_iteration"] / update[
      "floor_bytes_per_iteration"] < 4
  assert update["alias_bytes"] > 0   # the donated state comes back in place
  rollout = r["phases"]["rollout"]
  assert rollout["decode_loops"] >= 1
  assert rollout["collective_bytes_per_iteration"] >= 11 * rollout["decode_bytes_per_step"]
  assert "Figures are TPU-compiled by libtpu" in dry_run.format_report(r)
  json.dumps(r)


@needs_libtpu
def test_continuous_rollout_on_its_own_mesh_compiles_for_the_tpu_slice(num_devices):
  r = dry_run.run(_tiny_config(**{"task.name": "jsonl", "task.train_file": "",
                                  "rollout.slots": 4, "rollout.chunk_steps": 5,
                                  "rollout.tensor": 2, "model.dtype": "bfloat16"}),
                  topology=TOPOLOGY)
  assert list(r["phases"]) == ["reshard", "rollout_prefill", "rollout", "old_logps",
                               "update"]
  assert r["rollout"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert r["target"]["platform"] == "tpu"
  assert r["phases"]["reshard"]["collective_bytes_per_iteration"] > 0
  assert all(p["peak_bytes_per_device"] > 0 for p in r["phases"].values())
  # The same config on the 8 fake CPU devices: there XLA:CPU keeps float32 copies of the
  # bf16 decode weights (counted), which the TPU program does not have.
  cpu = dry_run.run(_tiny_config(**{"task.name": "jsonl", "task.train_file": "",
                                    "rollout.slots": 4, "rollout.chunk_steps": 5,
                                    "rollout.tensor": 2, "model.dtype": "bfloat16"}))
  assert cpu["target"]["platform"] == "cpu"
  assert cpu["phases"]["rollout"]["f32_weight_copy_bytes"] > 0
  assert "f32_weight_copy_bytes" not in r["phases"]["rollout"]


@needs_libtpu
def test_command_line_topology_json_and_the_chips_memory(tmp_path):
  out = tmp_path / "report.json"
  done = _main("--config=experiments/configs/tiny.py", "--dry_run_topology=v5e:2x2",
               f"--dry_run_json={out}")
  assert done.returncode == 0, done.stderr
  # libtpu's warnings about a TPU VM's environment are silenced (tpu_devices).
  assert "TPU_WORKER_HOSTNAMES" not in done.stderr, done.stderr
  assert "TPU_ACCELERATOR_TYPE" not in done.stderr, done.stderr
  assert "Memory check: TPU v5 lite has 16 GiB = 17.18 GB" in done.stdout
  report = json.loads(out.read_text())
  assert report["devices"] == 4 and report["target"]["topology"] == "v5e:2x2"
  # A gate below every phase's peak: exit 1, naming the phase.
  done = _main("--config=experiments/configs/tiny.py", "--dry_run_topology=v5e:2x2",
               "--device_memory_gb=1e-6")
  assert done.returncode == 1 and "phase 'rollout'" in done.stderr
  # A slice libtpu does not know: exit 2 with one line, nothing compiled.
  done = _main("--config=experiments/configs/tiny.py", "--dry_run_topology=v5e:3x3")
  assert done.returncode == 2
  assert done.stderr.strip().startswith("error: --dry_run_topology=v5e:3x3: libtpu refused it")
  assert len(done.stderr.strip().splitlines()) == 1 and "compiling" not in done.stdout


@needs_libtpu
def test_a_phase_over_the_chips_hbm_is_reported_not_raised():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4,), ("fsdp",), devices=dry_run.tpu_devices("v5e:2x2"),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  # A sorted [1024, 1024, 5000] f32 per device (20 GB) must be materialised: over 16 GiB.
  big = jax.jit(lambda x: jnp.sum(jnp.sort(jnp.broadcast_to(
      x[:, :, None], (x.shape[0], 1024, 5000)), axis=1), axis=(1, 2)))
  phase = dry_run._compile("big", "sort", big, (x,), floor=0)
  assert phase.refused.startswith("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
  assert phase.memory.temp_bytes > 16 * 2**30
  assert phase.memory.argument_bytes == 1024 * 1024 * 4   # its shard of x
  assert phase.to_json()["refused"] == phase.refused and not phase.hlo.collectives
  with pytest.raises(dry_run.DryRunError, match="phase 'big' is over the chip's HBM"):
    dry_run._compile("big", "sort", big, (x,), floor=0, keep=[])
