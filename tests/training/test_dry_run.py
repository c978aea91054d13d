"""The dry run: HLO collective inventory, FSDP floor, report keys, memory gate, bad input.

The parser is checked on hand-written HLO with known byte counts; the floor against the
tiny model's parameter count; the whole dry run on the tiny config on the 8 fake devices
(compile-only); the command line in subprocesses (bad input exits before compiling).
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from egpo_jax.models import sharding
from egpo_jax.models.config import get_config
from egpo_jax.training import dry_run
from experiments.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A module as XLA prints it after SPMD partitioning: an all-gather in the entry, a scan of
# 8 micro-batches holding a reduce-scatter, a nested scan of 3 layers holding an
# all-reduce of a tuple, a while loop without a known trip count holding an async
# all-gather, a fusion (whose internals are no buffers), and an all-gather of bf16 values
# that XLA:CPU widened to f32 (counted as bf16).
HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused (p: f32[64,32]) -> f32[64,32] {
  %p = f32[64,32]{1,0} parameter(0)
  ROOT %big = f32[4096,4096]{1,0} broadcast(%p), dimensions={}
}

%inner_body (t: (s32[], f32[16])) -> (s32[], f32[16]) {
  %t = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%t), index=1
  %ar = (f32[16]{0}, bf16[8]{0}) all-reduce(%v, %v), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %o = (s32[], f32[16]{0}) tuple(%i, %v)
}

%inner_cond (t: (s32[], f32[16])) -> pred[] {
  %t = (s32[], f32[16]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (t: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %t = (s32[], f32[64,32]{1,0}) parameter(0)
  %g = f32[64,32]{1,0} get-tuple-element(%t), index=1
  %f = f32[64,32]{1,0} fusion(%g), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/fused"}
  %rs = f32[8,32]{1,0} reduce-scatter(%f), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/grad"}
  %w = (s32[], f32[16]{0}) while(%x), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %o = (s32[], f32[64,32]{1,0}) tuple(%i, %g)
}

%outer_cond (t: (s32[], f32[64,32])) -> pred[] {
  %t = (s32[], f32[64,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%decode_body (t: (s32[], bf16[2,4])) -> (s32[], bf16[2,4]) {
  %t = (s32[], bf16[2,4]{1,0}) parameter(0)
  %q = bf16[2,4]{1,0} get-tuple-element(%t), index=1
  %ags = (bf16[2,4]{1,0}, bf16[16,4]{1,0}) all-gather-start(%q), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %agd = bf16[16,4]{1,0} all-gather-done(%ags)
  ROOT %o = (s32[], bf16[2,4]{1,0}) tuple(%i, %q)
}

%decode_cond (t: (s32[], bf16[2,4])) -> pred[] {
  %t = (s32[], bf16[2,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%round (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %c16 = bf16[4,8]{1,0} convert(%p)
  ROOT %c32 = f32[4,8]{1,0} convert(%c16)
}

ENTRY %main (p0: f32[8,32], p1: bf16[2,4], p2: f32[4,8]) -> f32[64,32] {
  %p0 = f32[8,32]{1,0} parameter(0), sharding={devices=[8,1]<=[8]}
  %p2 = f32[4,8]{1,0} parameter(2)
  %rnd = f32[4,8]{1,0} fusion(%p2), kind=kLoop, calls=%round
  %agw = f32[16,8]{1,0} all-gather(%rnd), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}
  %agf = f32[16,8]{1,0} all-gather(%p2), channel_id=6, replica_groups=[4,2]<=[8], dimensions={0}
  %ag = f32[64,32]{1,0} all-gather(%p0), channel_id=1, replica_groups={}, dimensions={0}, metadata={op_name="jit(step)/gather"}
  %w1 = (s32[], f32[64,32]{1,0}) while(%t0), condition=%outer_cond, body=%outer_body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"8"}}
  %w2 = (s32[], bf16[2,4]{1,0}) while(%t1), condition=%decode_cond, body=%decode_body
  ROOT %r = f32[64,32]{1,0} get-tuple-element(%w1), index=1
}
"""


def test_shape_bytes():
  assert dry_run.shape_bytes("bf16[16,4096,1536]{2,1,0}") == 2 * 16 * 4096 * 1536
  assert dry_run.shape_bytes("(f32[2]{0}, s32[], pred[3])") == 8 + 4 + 3
  assert dry_run.shape_bytes("f32[]") == 4
  with pytest.raises(ValueError, match="unknown element type"):
    dry_run.shape_bytes("q7[2]")


@pytest.mark.parametrize("attrs, size", [
    ("replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}", 2),
    ("replica_groups=[2,4]<=[8], to_apply=%add", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}, x", 4),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) "
     "{'axis_0'}, to_apply=%add", 2),
    ("replica_groups={}, dimensions={0}", 8),
])
def test_replica_group_size_reads_every_spelling(attrs, size):
  assert dry_run.replica_group_size(attrs, 8) == size


def test_parse_hlo_counts_collectives_times_their_loops():
  hlo = dry_run.parse_hlo(HLO, unknown_trip_counts=[5])
  got = {(c.kind, c.executions, c.group_size): c.bytes for c in hlo.collectives}
  assert got == {
      ("all-gather", 1, 8): 64 * 32 * 4,               # the result
      ("reduce-scatter", 8, 8): 8 * 32 * 4 * 8,        # the operand = result x group
      ("all-reduce", 24, 4): 16 * 4 + 8 * 2,           # both tuple operands, 8 x 3 runs
      ("all-gather", 5, 4): 16 * 4 * 2,                # async: the gathered half of the tuple
      ("all-gather", 1, 4): 16 * 8 * 2,                # bf16 values widened to f32 by XLA:CPU
      ("all-gather", 1, 2): 16 * 8 * 4,                # f32 values
  }
  by_kind = dry_run.bytes_by_kind(hlo.collectives)
  assert by_kind["all-gather"] == 64 * 32 * 4 + 5 * 128 + 256 + 512
  assert by_kind["reduce-scatter"] == 8 * 8192
  assert by_kind["all-reduce"] == 24 * 80
  assert by_kind["all-to-all"] == 0
  # The loop without a trip count: its per-trip bytes, in program order.
  assert hlo.unknown_loops == (128,)
  # Without a trip count given, it counts once.
  once = dry_run.parse_hlo(HLO)
  assert dry_run.bytes_by_kind(once.collectives)["all-gather"] == 8192 + 128 + 256 + 512


def test_parse_hlo_largest_buffers_skip_fusion_internals_and_aliases():
  buffers = dry_run.parse_hlo(HLO).largest_buffers
  shapes = [b["shape"] for b in buffers]
  assert "f32[4096,4096]" not in shapes          # inside a fusion: never materialised
  assert buffers[0]["shape"] == "f32[64,32]"
  assert buffers[0]["bytes"] == 8192
  assert all(b["opcode"] not in ("parameter", "get-tuple-element", "tuple") for b in buffers)
  fused = next(b for b in buffers if b["opcode"] == "fusion")
  assert fused["executions"] == 8


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(sharding.MeshConfig(data, fsdp, tensor))


def test_fsdp_floor_is_two_gathers_in_the_compute_dtype_plus_f32_gradients(num_devices):
  cfg = get_config("tiny")
  params = sharding.abstract_params(cfg)
  p = cfg.num_params()
  d, layers = cfg.hidden_size, cfg.num_layers
  kv = cfg.num_kv_heads * cfg.head_size
  # Left whole by fsdp: RMSNorm scales (2 per layer + final) and q/k/v biases.
  replicated = layers * 2 * d + d + layers * (cfg.num_heads * cfg.head_size + 2 * kv)
  floor = dry_run.fsdp_floor_bytes(params, _mesh(1, 8, 1), "bfloat16", gathers=2,
                                   gradients=True)
  assert floor == 2 * 2 * (p - replicated) + 4 * p
  # Forward only, float32: one gather, no gradient.
  assert dry_run.fsdp_floor_bytes(params, _mesh(1, 8, 1), "float32", gathers=1,
                                  gradients=False) == 4 * (p - replicated)
  # Pure data parallelism gathers nothing; its gradients are still all-reduced.
  assert dry_run.fsdp_floor_bytes(params, _mesh(8, 1, 1), "bfloat16", gathers=2,
                                  gradients=True) == 4 * p
  # tensor=2 halves what each device gathers and reduces of the tensor-split leaves.
  half = dry_run.fsdp_floor_bytes(params, _mesh(2, 2, 2), "bfloat16", gathers=2,
                                  gradients=True)
  assert floor / 2 < half < floor


def _tiny_config(**overrides):
  c = tiny.get_config()
  c.rollout.prompts_per_batch = 8
  c.ppo.micro_batches = 2
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c[node]
    for part in path[:-1]:
      target = target[part]
    target[path[-1]] = value
  return c


@pytest.fixture(scope="module")
def tiny_report(num_devices):
  return dry_run.run(_tiny_config(**{"loss.kl_coef": 0.01, "loss.old_logps": "recompute"}))


def test_report_has_every_phase_and_the_documented_keys(tiny_report):
  r = tiny_report
  assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert list(r["phases"]) == ["rollout", "old_logps", "ref_logps", "update"]
  for phase in r["phases"].values():
    assert phase["peak_bytes_per_device"] == (phase["argument_bytes"] + phase["temp_bytes"]
                                              + phase["output_bytes"] - phase["alias_bytes"])
    assert phase["peak_bytes_per_device"] > 0
  c = r["collectives"]
  assert c["bytes_per_iteration"] == sum(p["collective_bytes_per_iteration"]
                                         for p in r["phases"].values())
  assert c["floor_bytes_per_iteration"] == sum(p["floor_bytes_per_iteration"]
                                               for p in r["phases"].values())
  assert sum(c["bytes_by_kind"].values()) == c["bytes_per_iteration"]
  json.dumps(r)   # serialisable as --dry_run_json writes it


def test_update_floor_and_collectives_follow_the_micro_batches(tiny_report):
  cfg = get_config("tiny")
  params = sharding.abstract_params(cfg)
  per_micro = dry_run.fsdp_floor_bytes(params, _mesh(1, 8, 1), "float32", gathers=2,
                                       gradients=True)
  update = tiny_report["phases"]["update"]
  assert update["floor_bytes_per_iteration"] == 2 * per_micro
  # The trainer's forward passes (recomputed old and reference log-probs): one gather per
  # micro-batch each.
  forward = dry_run.fsdp_floor_bytes(params, _mesh(1, 8, 1), "float32", gathers=1,
                                     gradients=False)
  for name in ("old_logps", "ref_logps"):
    assert tiny_report["phases"][name]["floor_bytes_per_iteration"] == 2 * forward
  # FSDP: the weights are gathered and the gradients reduced inside the micro-batch scan.
  assert update["collective_bytes_by_kind"]["all-gather"] > 0
  assert update["collective_bytes_per_iteration"] >= update["floor_bytes_per_iteration"] / 2
  # The donated state comes back in place.
  assert update["alias_bytes"] > 0
  # The rollout's decode loops are counted for every step up to the cap (11 steps).
  rollout = tiny_report["phases"]["rollout"]
  assert rollout["decode_loops"] >= 1
  assert rollout["collective_bytes_per_iteration"] >= 11 * rollout["decode_bytes_per_step"]


def test_memory_gate_names_the_phase(tiny_report):
  peak = max(p["peak_bytes_per_device"] for p in tiny_report["phases"].values())
  assert dry_run.check_fits(tiny_report, peak * 1.01 / dry_run.GB) is None
  line = dry_run.check_fits(tiny_report, peak * 0.99 / dry_run.GB)
  worst = max(tiny_report["phases"],
              key=lambda k: tiny_report["phases"][k]["peak_bytes_per_device"])
  first_over = next(k for k, p in tiny_report["phases"].items()
                    if p["peak_bytes_per_device"] > peak * 0.99)
  assert first_over == worst and f"phase {worst!r}" in line and "\n" not in line


def test_format_report_states_the_caveat(tiny_report):
  text = dry_run.format_report(tiny_report)
  assert "CPU-compiled estimates" in text and "+-30%" in text
  for name in tiny_report["phases"]:
    assert f"\n{name} " in text


def _main(*args, devices=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if os.environ.get("EGPO_JAX_COMPILATION_CACHE"):   # the suite's cache, as conftest sets it
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["EGPO_JAX_COMPILATION_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  cmd = [sys.executable, "-m", "experiments.main", "--dry_run", *args]
  if devices:
    cmd.append(f"--dry_run_devices={devices}")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args, devices, words", [
    (["--config=experiments/configs/tiny.py", "--config.mesh.data=3"], 8,
     ["config.mesh", "--dry_run_devices=8"]),
    (["--config=experiments/configs/tiny.py"], -2, ["--dry_run_devices=-2"]),
    (["--config=experiments/configs/tiny.py", "--device_memory_gb=-1"], 8,
     ["--device_memory_gb"]),
    (["--config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b",
      "--config.model.name=no-such-model"], 8, ["config.model.name", "no-such-model"]),
    (["--config=experiments/configs/tiny.py", "--config.rollout.group_size=1"], 8,
     ["config.rollout.group_size"]),
    (["--config=experiments/configs/tiny.py", "--config.model.no_such_field=1"], 8,
     ["config.model.no_such_field"]),
    (["--config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b",
      "--config.model.path=/no/such/folder"], 8, ["config.model.path", "/no/such/folder"]),
    (["--config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b",
      "--config.rollout.tensor=3"], 8, ["config.rollout.tensor=3", "divide the 8 devices"]),
])
def test_bad_input_exits_with_one_line_naming_the_cause(args, devices, words):
  done = _main(*args, devices=devices)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  for word in words:
    assert word in lines[0]


@pytest.mark.slow
def test_command_line_fake_devices_json_and_gate(tmp_path):
  out = tmp_path / "report.json"
  done = _main("--config=experiments/configs/tiny.py", "--config.mesh.fsdp=2",
               "--config.mesh.data=2", f"--dry_run_json={out}", "--device_memory_gb=1e-6",
               devices=4)
  assert done.returncode == 1, done.stderr
  # XLA's own C++ warnings (e.g. the SPMD partitioner's "involuntary full
  # rematerialization" on a data x fsdp mesh) go to stderr too; the tool's own message is
  # one line.
  ours = [l for l in done.stderr.strip().splitlines() if not re.match(r"[IWEF]\d{4} ", l)]
  assert len(ours) == 1, done.stderr
  assert "phase 'rollout'" in done.stderr
  report = json.loads(out.read_text())
  assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert {"rollout", "old_logps", "update"} <= set(report["phases"])
  assert math.isfinite(report["collectives"]["bytes_per_iteration"])
  assert "floor_bytes_per_iteration" in report["collectives"]
  assert "CPU-compiled estimates" in done.stdout


def test_paper_config_needs_no_weights_data_or_tokenizer(tmp_path):
  from experiments.configs import paper
  spec = dry_run.spec_from_config(paper.get_config("egpo,qwen2.5-math-7b"))
  assert spec.model_config == get_config("qwen2.5-math-7b", dtype="bfloat16", remat=True)
  assert (spec.settings.prompts_per_batch, spec.settings.group_size) == (64, 16)
  assert (spec.prompt_len, spec.settings.sampling.max_new_tokens) == (1024, 3072)
  # model.path: the shapes come from its config.json alone (no safetensors, no tokenizer).
  from egpo_jax.models import config as model_config
  (tmp_path / "config.json").write_text(json.dumps(model_config.to_hf_dict(
      get_config("tiny").replace(num_layers=3))))
  c = paper.get_config("egpo,qwen2.5-math-1.5b")
  c.model.path, c.model.name = str(tmp_path), ""
  assert dry_run.spec_from_config(c).model_config.num_layers == 3


def test_a_mesh_that_does_not_divide_is_named_not_silently_replicated(num_devices):
  # The tiny model's dimensions are powers of two: fsdp = 6 divides none of them.
  six = sharding.make_mesh(sharding.MeshConfig(1, 6, 1), devices=jax.devices()[:6])
  params = sharding.abstract_params(get_config("tiny"))
  lines = sharding.unsplit_params(params, six)
  specs = jax.tree.leaves(sharding.param_partition_specs(params, _mesh(1, 8, 1)),
                         is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert len(lines) == sum("fsdp" in tuple(s) for s in specs) > 0
  line = next(l for l in lines if l.startswith("parameter layers/q_proj/kernel "))
  assert "'fsdp'" in line and "size 6" in line and "\n" not in line
  # Nothing to say where every axis divides (or has size 1).
  assert sharding.unsplit_params(params, _mesh(1, 8, 1)) == []
  assert sharding.unsplit_params(params, _mesh(2, 2, 2)) == []
  # The dry run also names batch rows that data x fsdp does not divide (8 prompts x 4).
  spec = dry_run.spec_from_config(_tiny_config())
  warnings = dry_run.unsplit_warnings(spec, six)
  assert warnings[:len(lines)] == lines
  assert any(w.startswith("prompts: 8 ") and "data x fsdp = 6" in w for w in warnings)
  assert dry_run.unsplit_warnings(spec, _mesh(1, 8, 1)) == []


@pytest.fixture(scope="module")
def continuous_report(num_devices):
  """Host mode's continuous rollout on its own mesh: the tiny model trained on fsdp = 8,
  decoding on data 4 x tensor 2 with 4 slots in chunks of 5 steps."""
  return dry_run.run(_tiny_config(**{"task.name": "jsonl", "task.train_file": "",
                                     "rollout.slots": 4, "rollout.chunk_steps": 5,
                                     "rollout.tensor": 2}))


def test_continuous_rollout_compiles_on_the_rollout_mesh(continuous_report):
  r = continuous_report
  assert list(r["phases"]) == ["reshard", "rollout_prefill", "rollout", "old_logps",
                               "update"]
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["rollout"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
  c = tiny.get_config()
  n, t = 8 * c.rollout.group_size, c.rollout.max_new_tokens
  steps = -(-n // 4) * t   # every response at its cap, 4 at a time
  assert r["rollout"]["decode_steps"] == steps
  decode = r["phases"]["rollout"]
  assert decode["calls_per_iteration"] == -(-steps // 5)
  # Per iteration: every chunk's call; the per-call collectives are the listed ones.
  per_call = sum(x["total_bytes"] for x in decode["collectives"])
  assert decode["collective_bytes_per_iteration"] == decode["calls_per_iteration"] * per_call
  # The continuous engine's programs hold the slots, not B x G rows: their own buffers
  # stay below the static sampler's for the same iteration (same meshes otherwise).
  assert r["phases"]["reshard"]["collective_bytes_per_iteration"] > 0
  # While it decodes, the f32 train state lives alongside the resharded params.
  state = r["state_bytes_per_device"]
  for name in ("rollout_prefill", "rollout"):
    p = r["phases"][name]
    assert p["resident_bytes"] >= state
    assert p["peak_with_resident_bytes"] == p["peak_bytes_per_device"] + p["resident_bytes"]
  assert r["phases"]["update"]["resident_bytes"] == 0   # the state is its argument
  text = dry_run.format_report(r)
  assert "Rollout on mesh data=4 fsdp=1 tensor=2: continuous batching, 4 slots" in text
  # The gate counts the resident bytes.
  worst = max(p["peak_with_resident_bytes"] for p in r["phases"].values())
  assert dry_run.check_fits(r, worst * 1.01 / dry_run.GB) is None
  assert dry_run.check_fits(r, worst * 0.99 / dry_run.GB) is not None


def test_f32_weight_copies_counts_entry_f32_arrays_of_a_weight_size():
  hlo = """HloModule m, num_partitions=2

%body (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  %w = f32[8,4]{1,0} fusion(%t), kind=kLoop, calls=%f
  ROOT %o = (s32[], f32[8,4]{1,0}) tuple(%i, %w)
}

ENTRY %main (p: bf16[2,8,4]) -> f32[8,4] {
  %p = bf16[2,8,4]{2,1,0} parameter(0)
  %a = f32[8,4]{1,0} fusion(%p), kind=kLoop, calls=%f
  %b = f32[4,8]{1,0} fusion(%p), kind=kLoop, calls=%f
  %c = f32[16,2]{1,0} fusion(%p), kind=kLoop, calls=%f
  %d = bf16[8,4]{1,0} fusion(%p), kind=kLoop, calls=%f
  %w = (s32[], f32[8,4]{1,0}) while(%x), condition=%cond, body=%body
  ROOT %r = f32[8,4]{1,0} add(%a, %a)
}
"""
  # The entry's f32 [8, 4] and [4, 8] fusions (32 elements, a dimension of width 8)
  # count; not the loop body's, not [16, 2] (no width dimension), not the bf16 one, not
  # an arithmetic op's result (the root add).
  assert dry_run.f32_weight_copies(hlo, frozenset({32}), 8) == 2 * 32 * 4
  assert dry_run.f32_weight_copies(hlo, frozenset(), 8) == 0
