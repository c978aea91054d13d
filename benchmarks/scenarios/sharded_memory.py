"""Per-device memory of params + AdamW state under FSDP / tensor parallelism, compile-only.

One optimizer step (global-norm clip -> AdamW, the state donated) of the paper's 1.5B
and 7B backbones, compiled from abstract shapes with the trainer's shardings on 8 fake
CPU devices (`egpo_jax.training.memory.update_memory`); nothing is allocated. "state" is
params + both AdamW moments + counters (float32); "fraction" is per-device state /
unsharded state. Activations of the forward/backward pass are not included (they depend
on batch and sequence sizes): the whole iteration of the paper's setup, activations and
collectives included, is the `paper_scale` scenario (`experiments.main --dry_run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

from benchmarks import harness

NOTES = """
Compile-only figures from XLA's CPU buffer assignment (`memory_analysis()`); the "state"
and "gradient" columns are exact shard sizes. The fraction exceeds 1/8 by the leaves that
stay replicated (RMSNorm scales, q/k/v biases, counters: a few MB). "temp" is the step's
temporaries (on CPU, e.g. the clipped gradient); "peak" = arguments + temporaries + outputs
not written in place. data=8 is the contrast: plain data parallelism replicates the state.
"""

GB = 1e9
_DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={_DEVICES}"
_MESHES = {"fsdp=8": dict(fsdp=8), "fsdp=4 tensor=2": dict(fsdp=4, tensor=2),
           "data=8": dict(data=8, fsdp=1)}


def _cases(quick: bool) -> list[tuple[str, str]]:
  if quick:
    return [("qwen2.5-math-1.5b", "fsdp=8"), ("qwen2.5-math-7b", "fsdp=8")]
  return [(model, mesh) for model in ("qwen2.5-math-1.5b", "qwen2.5-math-7b")
          for mesh in _MESHES]


def _measure(quick: bool) -> list[dict]:
  from egpo_jax.models import config as config_lib
  from egpo_jax.models import sharding
  from egpo_jax.training import memory
  out = []
  for model, mesh_name in _cases(quick):
    config = config_lib.get_config(model)
    mesh = sharding.make_mesh(sharding.MeshConfig(**_MESHES[mesh_name]))
    m = memory.update_memory(config, mesh)
    out.append({
        "name": f"{model} {mesh_name}",
        "params B": round(config.num_params() / 1e9, 3),
        "state GB (unsharded)": round(m.state_bytes / GB, 2),
        "state GB / device": round(m.per_device_state_bytes / GB, 3),
        "fraction": f"1/{1 / m.state_fraction:.3f}",
        "gradient GB / device": round(m.per_device_grad_bytes / GB, 3),
        "temp GB / device": round(m.temp_bytes / GB, 3),
        "peak GB / device": round(m.peak_bytes / GB, 3),
        "compile s": round(m.compile_seconds, 1)})
  return out


def run(quick: bool) -> list[harness.Row]:
  if jax.device_count() >= _DEVICES:
    results = _measure(quick)
  else:
    # XLA_FLAGS must be set before jax starts: measure in a fresh process.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()}
    cmd = [sys.executable, "-m", "benchmarks.scenarios.sharded_memory"]
    done = subprocess.run(cmd + (["--quick"] if quick else []), env=env, check=True,
                          capture_output=True, text=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
  return [harness.Row(name=r.pop("name"), seconds=None, extra=r) for r in results]


if __name__ == "__main__":
  print(json.dumps(_measure("--quick" in sys.argv)))
