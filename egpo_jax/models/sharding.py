"""Device mesh and partition specs for the decoder's parameters, KV cache and activations.

The mesh has three named axes (classic `Auto` axis types; GSPMD propagates shardings
between the annotations):

  data    pure data parallelism: batch split, parameters replicated.
  fsdp    batch split AND parameters split along their model-width (D) dimension
          (ZeRO-3 style: XLA all-gathers each layer's weights where they are used and
          reduce-scatters their gradients).
  tensor  Megatron-style: heads / MLP hidden / vocab split; activations exchanged.

Batch dimensions are split over ("data", "fsdp"). A dimension that an axis does not
divide is left unsplit (replicated) on that axis, so any config runs on any mesh.

Activations carry logical axis names, MaxText-style: the model calls
`constrain(x, ("activation_batch", "activation_length", "activation_embed"))` and
`LOGICAL_RULES` maps each name to mesh axes. Without these constraints GSPMD follows
the embedding's D-over-fsdp split into every layer: each device then computes every row
of a micro-batch and all-reduces float32 activations after each matmul. With them, each
device computes only its rows (over data x fsdp) and its heads / MLP columns (over
tensor), so FSDP moves weights (all-gathers) and gradients (reduce-scatters) only.
`constrain` is the identity unless a mesh is set with `jax.set_mesh`, so the
single-device path is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from egpo_jax.models.config import ModelConfig

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical activation axis -> mesh axes (None: replicated). Rows over data x fsdp; heads,
# MLP columns and vocabulary over tensor; sequence and model width never split.
LOGICAL_RULES = {
    "activation_batch": BATCH,
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_head_dim": None,
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    "vocab_parallel": ("data", "fsdp", "tensor"),   # the log-prob head (core/logprobs.py)
    "vocab_parallel_not_fsdp": ("data", "tensor"),
    "param_embed": "fsdp",   # a weight's model width, as _PARAM_SPECS splits it
    "micro_batches": None,   # the scan axis over micro-batches
}

# Spec per parameter path (leading None = stacked layer axis); see module docstring.
_PARAM_SPECS = {
    ("embed", "embedding"): P("tensor", "fsdp"),
    ("lm_head",): P("tensor", "fsdp"),
    ("final_norm", "scale"): P(None),
    ("layers", "input_norm", "scale"): P(None, None),
    ("layers", "post_attn_norm", "scale"): P(None, None),
    ("layers", "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "k_proj", "kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "v_proj", "kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "q_proj", "bias"): P(None, "tensor", None),
    ("layers", "k_proj", "bias"): P(None, "tensor", None),
    ("layers", "v_proj", "bias"): P(None, "tensor", None),
    ("layers", "o_proj", "kernel"): P(None, "tensor", None, "fsdp"),
    ("layers", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "up_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) mesh axes; one size may be -1 (= the rest)."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"MeshConfig{tuple(sizes)}: sizes must be positive, with at most one "
                       "-1 (meaning 'the remaining devices')")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"MeshConfig{tuple(sizes)}: {num_devices} devices are not divisible "
                         f"by the fixed axes' product {known}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"MeshConfig{tuple(sizes)} needs {math.prod(sizes)} devices but "
                       f"{num_devices} are available; make the product match or use -1")
    return tuple(sizes)


def make_mesh(mesh_config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_config.resolve(len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (those dims stay replicated).

  Axes of size 1 are kept, so a spec reads the same on every mesh shape.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for name in names:
      size = mesh.shape[name]
      if dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
        kept.append(name)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _path_key(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_partition_specs(params: Any, mesh: Mesh) -> Any:
  """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs) on `mesh`."""
  def spec(path, leaf):
    key = _path_key(path)
    if key not in _PARAM_SPECS:
      raise KeyError(f"no partition spec for parameter {'/'.join(key)}; add it to "
                     "egpo_jax.models.sharding._PARAM_SPECS")
    return _fit(_PARAM_SPECS[key], tuple(leaf.shape), mesh)
  return jax.tree_util.tree_map_with_path(spec, params)


def unsplit_params(params: Any, mesh: Mesh) -> list[str]:
  """One line per parameter dimension that a mesh axis of size > 1 in its spec does not
  divide: `_fit` leaves that dimension whole on that axis (replicated there), which costs
  memory and collectives silently. Empty when every split applies."""
  lines = []
  def check(path, leaf):
    key = _path_key(path)
    full = _PARAM_SPECS[key]
    kept = _fit(full, tuple(leaf.shape), mesh)
    pad = lambda spec: tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    names = lambda a: (a,) if isinstance(a, str) else tuple(a or ())
    for dim, (want, got) in enumerate(zip(pad(full), pad(kept))):
      for axis in names(want):
        if axis not in names(got) and mesh.shape[axis] > 1:
          lines.append(f"parameter {'/'.join(key)} {tuple(leaf.shape)}: dimension {dim} "
                       f"({leaf.shape[dim]}) is not split over mesh axis {axis!r} (size "
                       f"{mesh.shape[axis]}, which does not divide it): replicated there")
  jax.tree_util.tree_map_with_path(check, params)
  return lines


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """NamedShardings for a params pytree (use as jit in/out_shardings or device_put)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(params, mesh))


def abstract_params(config: ModelConfig, mesh: Mesh | None = None) -> Any:
  """ShapeDtypeStructs of the params (sharded on `mesh` if given); allocates nothing."""
  from egpo_jax.models import transformer
  shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, param_shardings(shapes, mesh))


def shard_params(params: Any, mesh: Mesh) -> Any:
  """Places a params pytree on the mesh with its partition specs."""
  return jax.device_put(params, param_shardings(params, mesh))


# Fused decode weights (`transformer.decode_params(fuse=True)`, used when tensor = 1).
_DECODE_FUSED = ("qkv_proj", "gate_up_proj")


def decode_param_specs(params: Any, mesh, *, vocab_split: bool = False) -> Any:
  """Specs for the decode loop's params (`transformer.decode_params`: per-layer tuples,
  optionally fused): each weight whole over the batch axes, its heads / MLP columns over
  `tensor`, and the embedding and output head whole.

  Constraining the params to these once, before the token loop, gathers the FSDP shards
  once per decode phase; left D-split, every step would contract over `fsdp` and
  all-reduce each layer's activations (3.0 GB per token step for 1.5B on 16 devices).
  The head whole makes each device's logits complete. `mesh` may be abstract.
  vocab_split: the embedding and head keep their vocabulary split over `tensor` (only
  gathered over the batch axes), as on the rollout's own mesh (`distributed.rollout_params`:
  a quarter of 7B's 1.1 GB head per device). The sampler then works on each device's
  slice of the logits (`filters.sample_with_logps` per device: only [rows]-sized values
  cross devices), except with top-k/top-p, which gather the [rows, V] logits every step.
  """
  def spec(path, leaf):
    # Without the per-layer tuple's index ("[i]").
    key = tuple(k for k in _path_key(path) if not str(k).startswith("["))
    if vocab_split and key in (("embed", "embedding"), ("lm_head",)):
      return _fit(P("tensor"), tuple(leaf.shape), mesh)
    if key[0] != "layers" or key[1] in _DECODE_FUSED:
      return P()
    if ("layers",) + key[1:] not in _PARAM_SPECS:
      raise KeyError(f"no partition spec for decode parameter {'/'.join(key)}; add it to "
                     "egpo_jax.models.sharding._PARAM_SPECS")
    full = tuple(_PARAM_SPECS[("layers",) + key[1:]])[1:]   # without the layer axis
    local = P(*(None if a == "fsdp" else a for a in full))
    return _fit(local, tuple(leaf.shape), mesh)
  return jax.tree_util.tree_map_with_path(spec, params)


def cache_partition_specs(cache: Any, mesh: Mesh) -> Any:
  """Specs for a KVCache: batch over (data, fsdp), kv heads over tensor."""
  from egpo_jax.models.transformer import KVCache
  kv = _fit(P(None, BATCH, None, "tensor", None), tuple(cache.k.shape), mesh)
  return KVCache(k=kv, v=kv, mask_BxS=_fit(P(BATCH, None), tuple(cache.mask_BxS.shape), mesh),
                 positions_B=_fit(P(BATCH), tuple(cache.positions_B.shape), mesh), index=P(),
                 rope_cos_SxF=P(), rope_sin_SxF=P())


def prompt_table_specs(table: Any, mesh, *, as_prefilled: bool = False) -> Any:
  """Specs for the continuous engine's prompt table (`sampling.continuous.PromptTable`):
  every entry whole over the batch axes, KV heads over `tensor`.

  Any slot, on any data replica, may read any entry, so a table split over the batch
  axes is gathered whole by every decode program that reads it (0.9 GB per device and
  chunk for 7B on 16 devices); held whole from the prefill on, it is read locally.
  as_prefilled: the layout the prefill leaves (entries over the batch axes, the logits'
  vocabulary over `tensor`, as the head's), to constrain to before the whole one."""
  rows = BATCH if as_prefilled else None
  def spec(path, leaf):
    key = _path_key(path)
    if key and key[0] in ("k", "v"):   # [E, kv heads, ...]
      return _fit(P(rows, "tensor"), tuple(leaf.shape), mesh)
    if as_prefilled and key and key[0] == "logits_BxV":
      return logits_spec(tuple(leaf.shape), mesh)
    return _fit(P(rows), tuple(leaf.shape), mesh)
  return jax.tree_util.tree_map_with_path(spec, table)


def logical_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
  """The PartitionSpec of `LOGICAL_RULES` for an array of `shape` (non-dividing axes
  dropped, as `_fit` does); `mesh` may be concrete or abstract."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {logical_axes} do not match the array's rank "
                     f"{len(shape)} (shape {shape})")
  unknown = [a for a in logical_axes if a is not None and a not in LOGICAL_RULES]
  if unknown:
    raise KeyError(f"logical axes {unknown} have no rule; add them to "
                   "egpo_jax.models.sharding.LOGICAL_RULES")
  spec = P(*(None if a is None else LOGICAL_RULES[a] for a in logical_axes))
  return _fit(spec, tuple(shape), mesh)


def leading_spec(x, *logical_axes: str, mesh) -> P:
  """`logical_spec` of x's leading axes by these names, its other axes whole (the
  per-device wrappers' in_specs: rows, then heads)."""
  names = logical_axes + (None,) * (x.ndim - len(logical_axes))
  return logical_spec(names, x.shape, mesh)


def active_mesh():
  """The (abstract) mesh of `jax.set_mesh` if it has the trainer's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh


def per_device_mesh():
  """The mesh for a per-device wrapper's `jax.shard_map`: that of `active_mesh`, or None
  where the wrapped function should run as it is (no mesh, one device, or already inside
  a caller's shard_map, whose manual axes hold per-device blocks)."""
  mesh = active_mesh()
  if mesh is None or mesh.size == 1 or mesh.manual_axes:
    return None
  return mesh


def target_platform() -> str:
  """The platform the code being traced compiles for: the devices' of the mesh of
  `jax.set_mesh` (a TPU topology's in the deviceless dry run, whose host backend is the
  CPU), else JAX's default backend. Kernels pick their lowering by it."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """`x` constrained to the sharding its logical axes name under the mesh of
  `jax.set_mesh`; the identity without one (or on a mesh without the trainer's axes)."""
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes, x.shape, mesh))


def embedding_output(x_BxTxD: jax.Array) -> jax.Array:
  """The embedding lookup's output [B, T, D] laid out as the table leaves it: rows over
  `data`, model width over `fsdp` (the table's own D split). Call it before constraining
  the rows over data x fsdp.

  On a data x fsdp mesh GSPMD cannot go between "D over fsdp" (the lookup, and in the
  backward pass the table's scatter-add) and "rows over data x fsdp" in one step
  ("Involuntary full rematerialization": it replicated the whole [B, T, D] float32 array
  on every device, then sliced it). Through this layout each direction is one all-to-all
  within the fsdp groups (a sharding constraint is its own transpose, so the gradient
  takes the same route back). The identity without a mesh.
  """
  mesh = active_mesh()
  if mesh is None:
    return x_BxTxD
  spec = _fit(P("data", None, "fsdp"), tuple(x_BxTxD.shape), mesh)
  return jax.lax.with_sharding_constraint(x_BxTxD, spec)


def batch_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """Spec for a batch-leading array (ids_BxL, mask_BxL, hidden_BxLxD, logps_NxT...)."""
  return _fit(P(BATCH), tuple(shape), mesh)


def logits_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """Spec for logits [B, ..., V]: batch over (data, fsdp), vocab over tensor."""
  middle = (None,) * (len(shape) - 2)
  return _fit(P(BATCH, *middle, "tensor"), tuple(shape), mesh)


def addressable_rows(x: Any) -> tuple[int, np.ndarray]:
  """(first row, rows) of a batch-leading array that this process holds, in order: the
  whole array when this process addresses all of it; across processes the rows of its
  addressable shards (replicas over other axes taken once), which must be one contiguous
  block (a batch split over data x fsdp axes that span the processes)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return 0, np.asarray(x)
  blocks = {}
  for shard in x.addressable_shards:
    lo, hi, _ = shard.index[0].indices(x.shape[0]) if shard.index else (0, x.shape[0], 1)
    blocks.setdefault((lo, hi), shard)
  spans = sorted(blocks)
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"process {jax.process_index()} holds rows {spans} of a batch, not one "
                     "block: use a config.mesh (and rollout.tensor) whose data x fsdp axes "
                     "span the processes")
  return spans[0][0], np.concatenate([np.asarray(blocks[k].data) for k in spans])


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total
