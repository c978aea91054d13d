"""Compiles `attention.attend_one_pallas` for hardware this machine may not have, from
abstract shapes: the Pallas decode kernel (`rollout.decode_attention="pallas"`) at the
Qwen2.5-7B decode shapes (28 query heads, 4 kv heads, head_dim 128).

  tpu: deviceless Mosaic compilation on a v5e:2x2 topology (needs jax[tpu]/libtpu; no TPU),
       through `attention.attend` under the 4-device mesh, so each device runs the kernel
       on its own rows and heads (`_paged_per_device`'s shard_map), one layer's attention.
  gpu: the Triton lowering, jit(...).trace(...).lower(lowering_platforms=("cuda",)); a
       full compile needs a GPU.

    python benchmarks/pallas_decode_lowering.py tpu [--block 128 256] [--slots 64]
    python benchmarks/pallas_decode_lowering.py gpu

(in a venv with jax[tpu] for "tpu"; ALLOW_MULTIPLE_LIBTPU_LOAD=1 when another process
holds libtpu's lock file). Measured 2026-12-07, jax 0.10.2: TPU compiles (one Mosaic
kernel per layer call, no collectives under the 4-device mesh, rows split 4 ways or rows 2
x heads 2 (--tensor 2), 7B and 1.5B heads) at read_block 128, 256, 512 and one whole block
of 200; 64 is refused by `pallas_query_rows` (and, without that check,
by Mosaic's tiling rule). GPU: Triton lowering succeeds at blocks 16-512 (without the
padding of the 7 query heads to 16, Triton's power-of-two rule refuses it); compiling to
PTX needs a GPU, not tried.

Prints one line per configuration: compiled (or lowered) or the error. Not a test: it needs
platform plugins CI does not have.
"""

from __future__ import annotations

import argparse
import functools
import re
import time

import jax
import jax.numpy as jnp

from egpo_jax.models import attention, sharding
from egpo_jax.models import config as model_config

def _shapes(model: str, rows: int, own: int, prefix: int, dtype):
  """Abstract (q, keys, values, mask, read_slots, prefix) of one layer's decode attention."""
  c = model_config.get_config(model)
  h, g, hd = c.num_heads, c.num_kv_heads, c.head_size
  sds = jax.ShapeDtypeStruct
  return (sds((rows, h, hd), dtype), sds((rows, g, hd, own), dtype),
          sds((rows, g, own, hd), dtype), sds((rows, own), jnp.bool_), sds((rows,), jnp.int32),
          (sds((rows, g, hd, prefix), dtype), sds((rows, g, prefix, hd), dtype),
           sds((rows, prefix), jnp.bool_)))


# Logical axes of _shapes' arrays, as `attention._paged_per_device` splits them.
_AXES = (("activation_batch", "activation_heads"), ("activation_batch", "activation_kv_heads"),
         ("activation_batch", "activation_kv_heads"), ("activation_batch",),
         ("activation_batch",),
         (("activation_batch", "activation_kv_heads"), ("activation_batch", "activation_kv_heads"),
          ("activation_batch",)))


def _target(backend: str):
  """attend_one_pallas picks its target from jax.default_backend(), here the CPU: aim it at
  `backend` (compiled, not interpreted) for the whole `attend` path."""
  attention.attend_one_pallas = functools.partial(_KERNEL, backend=backend, interpret=False)


_KERNEL = attention.attend_one_pallas


def tpu(model, blocks, rows, own, prefix, tensor=1, topology="v5e:2x2"):
  from jax.experimental import topologies   # noqa: PLC0415
  _target("tpu")
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  mesh = sharding.make_mesh(sharding.MeshConfig(-1, 1, tensor), devices=topo.devices)
  for block in blocks:
    args = _shapes(model, rows * len(topo.devices) // tensor, own, prefix, jnp.bfloat16)
    def placed(x, names):
      spec = sharding.logical_spec(names + (None,) * (x.ndim - len(names)), x.shape, mesh)
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=jax.sharding.NamedSharding(mesh, spec))
    with_sharding = jax.tree.map(placed, args, _AXES)   # _AXES: args' structure, deeper
    fn = jax.jit(lambda q, k, v, m, r, p, block=block: attention.attend(
        q, k, v, m, prefix=p, read_slots_B=r, read_block=block, read_kernel="pallas"))
    t = time.time()
    try:
      with jax.set_mesh(mesh):
        compiled = fn.lower(*with_sharding).compile()
      text = compiled.as_text()
      mosaic = len(re.findall(r'custom_call_target="tpu_custom_call"', text))
      moved = len(re.findall(r"all-gather|all-reduce|collective-permute|all-to-all", text))
      print(f"tpu {topology} tensor={tensor} {model} block={block} rows/data shard={rows} "
            f"own={own} prefix={prefix}: "
            f"compiled in {time.time() - t:.1f}s; Mosaic kernels: {mosaic}, collectives: "
            f"{moved}")
    except Exception as e:   # noqa: BLE001  (report and go on)
      print(f"tpu {topology} block={block}: FAILED {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}")


def gpu(model, blocks, rows, own, prefix):
  for block in blocks:
    args = _shapes(model, rows, own, prefix, jnp.bfloat16)
    fn = jax.jit(functools.partial(_KERNEL, block=block, backend="gpu", interpret=False))
    t = time.time()
    try:
      lowered = fn.trace(*args[:4], args[5], args[4]).lower(lowering_platforms=("cuda",))
      text = lowered.as_text()
      print(f"gpu {model} block={block} rows={rows} own={own} prefix={prefix}: lowered in "
            f"{time.time() - t:.1f}s, Triton calls: {text.count('__gpu$xla.gpu.triton')}")
    except Exception as e:   # noqa: BLE001
      print(f"gpu block={block}: FAILED {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("platform", choices=("tpu", "gpu"))
  ap.add_argument("--block", type=int, nargs="+", default=[128, 256])
  ap.add_argument("--slots", type=int, default=64, help="decode rows (per device on TPU)")
  ap.add_argument("--own", type=int, default=4096, help="own cache slots per row")
  ap.add_argument("--prefix", type=int, default=512, help="prompt-table slots")
  ap.add_argument("--model", default="qwen2.5-math-7b", help="a models.config name (heads)")
  ap.add_argument("--tensor", type=int, default=1, help="tpu: heads split over this many")
  a = ap.parse_args()
  if a.platform == "tpu":
    tpu(a.model, a.block, a.slots, a.own, a.prefix, a.tensor)
  else:
    gpu(a.model, a.block, a.slots, a.own, a.prefix)


if __name__ == "__main__":
  main()
