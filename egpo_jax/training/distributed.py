"""Running the trainer on a device mesh, across processes and hosts.

What this module owns, in the order a run meets it:

  initialize()        jax.distributed.initialize from the config or the environment
                      (EGPO_COORDINATOR_ADDRESS, EGPO_NUM_PROCESSES, EGPO_PROCESS_ID); on
                      TPU pod slices, SLURM and Open MPI, mode "on" lets JAX detect them.
  mesh_from_config()  the (data, fsdp, tensor) mesh over every device of every process.
  rollout_mesh()      the rollout's own mesh over the same devices (rollout.tensor), and
  RolloutOnMesh       host mode's rollout run there on params resharded once
                      (`rollout_params`: cast to the compute dtype, then moved).
  state_shardings()   NamedShardings of a TrainState: params by `models.sharding`'s specs,
                      AdamW moments like their params, counters replicated.
  put()               places a pytree on shardings (multi-process safe).
  BatchPlacement      process-local rows <-> global batch-sharded arrays: each process
                      contributes (and verifies) only its own rows of a global batch.
  jit_iterations()    `iteration.run_iterations` jitted with those shardings, donating
                      the train state.
  global_masked_mean  a masked mean written per device with shard_map + psum (equal to
                      the plain jnp version, which under jit is already global).

Under jit, a reduction over a sharded array is global: `jnp.sum(mask)` of a batch split
over (data, fsdp) is the global token count, so the update's token-mean normalisation
(`update.minibatch_step`) needs no collective written by hand. Only code written per
device (shard_map, pmap) must psum its counts, as `global_masked_mean` does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from egpo_jax.models import sharding
from egpo_jax.training import iteration

ENV_COORDINATOR = "EGPO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "EGPO_NUM_PROCESSES"
ENV_PROCESS_ID = "EGPO_PROCESS_ID"
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How to join a multi-process run; unset fields come from the environment.

  mode: "auto" joins when num_processes > 1; "on" always calls
    jax.distributed.initialize (unset fields are auto-detected by JAX on Cloud TPU,
    SLURM, Open MPI, Kubernetes); "off" never does.
  coordinator_address: "host:port" of process 0 ("" = $EGPO_COORDINATOR_ADDRESS, then
    $JAX_COORDINATOR_ADDRESS).
  num_processes: 0 = $EGPO_NUM_PROCESSES (default 1).
  process_id: -1 = $EGPO_PROCESS_ID.
  timeout_s: seconds to wait for every process to join before failing.
  """
  mode: str = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  timeout_s: int = 300

  def resolve(self, environ: Mapping[str, str] | None = None) -> DistributedSpec:
    """Fills unset fields from the environment and checks them (errors name the field)."""
    env = os.environ if environ is None else environ
    if self.mode not in MODES:
      raise ValueError(f"config.distributed.mode={self.mode!r}: use one of {MODES}")
    address = (self.coordinator_address or env.get(ENV_COORDINATOR)
               or env.get("JAX_COORDINATOR_ADDRESS", ""))
    num = self.num_processes or _env_int(env, ENV_NUM_PROCESSES, "num_processes", 1)
    pid = self.process_id if self.process_id >= 0 else _env_int(env, ENV_PROCESS_ID,
                                                                 "process_id", -1)
    if num < 1:
      raise ValueError(f"config.distributed.num_processes={num}: use >= 1")
    if self.mode == "auto" and num > 1:
      if not address:
        raise ValueError(f"config.distributed.coordinator_address is empty for a run of {num} "
                         f"processes: give process 0's host:port (or set {ENV_COORDINATOR})")
      if not 0 <= pid < num:
        raise ValueError(f"config.distributed.process_id={pid}: each of the {num} processes "
                         f"needs a distinct id in [0, {num}) (or set {ENV_PROCESS_ID})")
    return dataclasses.replace(self, coordinator_address=address, num_processes=num,
                               process_id=pid)

  @property
  def wants_init(self) -> bool:
    return self.mode == "on" or (self.mode == "auto" and self.num_processes > 1)


def _env_int(env: Mapping[str, str], name: str, field: str, default: int) -> int:
  raw = env.get(name, "")
  if not raw:
    return default
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"${name}={raw!r} (config.distributed.{field}) must be an integer"
                     ) from None


def initialize(spec: DistributedSpec = DistributedSpec(),
               environ: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process run `spec` asks for; returns whether this is one.

  Call it before anything touches a device. Idempotent: a second call does nothing.
  """
  spec = spec.resolve(environ)
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if not spec.wants_init:
    return False
  if spec.mode == "on" and spec.num_processes <= 1 and not spec.coordinator_address:
    jax.distributed.initialize(initialization_timeout=spec.timeout_s)   # JAX auto-detects
  else:
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address or None,
        num_processes=spec.num_processes, process_id=spec.process_id if spec.process_id >= 0
        else None, initialization_timeout=spec.timeout_s)
  return jax.process_count() > 1


def spec_from_config(c) -> DistributedSpec:
  """config.distributed (a config without it: the defaults, i.e. the environment)."""
  if "distributed" not in c:
    return DistributedSpec()
  d = c.distributed
  return DistributedSpec(mode=d.mode, coordinator_address=d.coordinator_address,
                         num_processes=d.num_processes, process_id=d.process_id,
                         timeout_s=d.timeout_s)


def mesh_config_from_config(c) -> sharding.MeshConfig:
  """config.mesh (a config without it: fsdp over every device)."""
  if "mesh" not in c:
    return sharding.MeshConfig()
  return sharding.MeshConfig(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)


def mesh_from_config(c, devices: Any = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all, `jax.devices()`; the
  dry run passes a TPU topology's); a bad layout names config.mesh."""
  try:
    return sharding.make_mesh(mesh_config_from_config(c), devices)
  except ValueError as err:
    raise ValueError(f"config.mesh (data, fsdp, tensor): {err}") from None


def rollout_mesh(mesh: Mesh, tensor: int, *, num_heads: int, num_kv_heads: int) -> Mesh:
  """The rollout's own mesh (verl's hybrid engine) over the training mesh's devices, in
  the same flat order: `tensor` devices per tensor group, the groups data-parallel
  replicas (data = devices / tensor, fsdp = 1), the layout of an inference engine.

  Decoding wants its weights whole over the rows (each step multiplies every weight),
  which FSDP must gather, while the update wants FSDP alone (no activation
  all-reduces). On this mesh each device holds 1 / tensor of the bf16 weights and of the
  KV heads, and decoding gathers nothing; the same device order makes moving the params
  here one reshard per iteration (`rollout_params`). tensor 0 returns `mesh` itself (the
  rollout runs on the training mesh). A size that does not divide the devices, the
  query heads or the KV heads is refused, naming rollout.tensor.
  """
  if tensor == 0:
    return mesh
  for ok, what in ((tensor > 0, "use >= 0 (0 = decode on the training mesh)"),
                   (tensor > 0 and mesh.size % tensor == 0,
                    f"it must divide the {mesh.size} devices"),
                   (tensor > 0 and num_heads % tensor == 0,
                    f"it must divide the model's {num_heads} query heads"),
                   (tensor > 0 and num_kv_heads % tensor == 0,
                    f"it must divide the model's {num_kv_heads} KV heads")):
    if not ok:
      raise ValueError(f"config.rollout.tensor={tensor}: {what}")
  shape = (mesh.size // tensor, 1, tensor)
  if tuple(mesh.shape[a] for a in sharding.AXES) == shape:
    return mesh
  devices = np.asarray(mesh.devices).reshape(shape)
  return Mesh(devices, sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rollout_params(params: Any, model_config: Any, train_mesh: Mesh, mesh: Mesh) -> Any:
  """The params as the rollout on `mesh` (`rollout_mesh`) takes them: cast to the compute
  dtype (`transformer.compute_params`) on the training mesh's shards, so the move is in
  the narrow dtype, then laid out by their partition specs on `mesh`. Jit it.

  The output head stays vocabulary-split over `tensor` there: each device holds a
  quarter of the 1.1 GB head of 7B (measured on 16 devices: -0.9 GB), and the sampler
  works on each device's slice of the logits (`filters.sample_with_logps`; top-k/top-p
  gather the [rows, V] logits every step instead).

  In steps that XLA's partitioner can each do with one collective (asked to go from
  "model width over all 16 devices" to "heads over 4, replicated over 4" at once, it
  replicates the whole float32 tensor on every device first): a dimension split over
  every device of the training mesh is the same split over the rollout mesh's axes in
  order (no data moves), is gathered over `data` (kept over `tensor`), then moved to its
  own dimensions by an all-to-all within each tensor group. A leaf split over only some of
  the training mesh's axes goes straight to its target.
  """
  from egpo_jax.models import transformer
  params = transformer.compute_params(params, model_config)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  source = sharding.param_partition_specs(abstract, train_mesh)
  target = sharding.param_partition_specs(abstract, mesh)
  every = tuple(a for a in sharding.AXES if train_mesh.shape[a] > 1)
  constrain = lambda x, spec: jax.lax.with_sharding_constraint(   # noqa: E731
      x, NamedSharding(mesh, spec))

  def move(x, src, dst):
    split = [tuple(a for a in ((e,) if isinstance(e, str) else e or ())
                   if train_mesh.shape[a] > 1) for e in src]
    if all(not axes or axes == every for axes in split):
      x = constrain(x, P(*(sharding.AXES if axes else None for axes in split)))
      x = constrain(x, P(*("tensor" if axes else None for axes in split)))
    return constrain(x, dst)

  return jax.tree.map(move, params, source, target)   # specs: leaves up to params'


class RolloutOnMesh:
  """A host-mode rollout (`host_loop.RolloutFn`) run on its own mesh (`rollout_mesh`).

  `prepare_params` reshards the training params there once per iteration (host_loop
  calls it before its tries); `__call__` also accepts unprepared params (it prepares
  them), moves the prompts and the key onto the rollout mesh, runs the wrapped rollout under it, and
  returns the generation batch-sharded on the training mesh. `streams` and `last_stats`
  are the wrapped rollout's; keywords (caps_N, on_finished) pass through to it.
  """

  def __init__(self, rollout: Any, train_mesh: Mesh, mesh: Mesh, model_config: Any):
    self.rollout, self.train_mesh, self.mesh = rollout, train_mesh, mesh
    self.streams = getattr(rollout, "streams", False)
    self._reshard = jax.jit(functools.partial(rollout_params, model_config=model_config,
                                              train_mesh=train_mesh, mesh=mesh))

  @property
  def last_stats(self) -> dict[str, Any]:
    return getattr(self.rollout, "last_stats", {})

  def _on_mesh(self, params: Any) -> bool:
    leaf = jax.tree.leaves(params)[0]
    return isinstance(leaf, jax.Array) and getattr(leaf.sharding, "mesh", None) == self.mesh

  def prepare_params(self, params: Any) -> Any:
    return params if self._on_mesh(params) else self._reshard(params)

  def __call__(self, params, prompt_ids_BxP, prompt_mask_BxP, rng, **kwargs):
    params = self.prepare_params(params)
    ids, mask = (put(x, batch_sharding(x.shape, self.mesh))
                 for x in (prompt_ids_BxP, prompt_mask_BxP))
    rng = put(rng, replicated(self.mesh))
    with jax.set_mesh(self.mesh):
      gen = self.rollout(params, ids, mask, rng, **kwargs)
    return put(gen, jax.tree.map(lambda x: batch_sharding(x.shape, self.train_mesh), gen))


def is_metrics_writer() -> bool:
  """Only process 0 writes metrics, summaries and plots (every process checkpoints)."""
  return jax.process_index() == 0


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _params_like(tree: Any, params: Any) -> Any:
  """Is `tree` a pytree with the params' structure (e.g. an AdamW moment)?"""
  return jax.tree.structure(tree) == jax.tree.structure(params)


def tree_shardings(tree: Any, params: Any, mesh: Mesh) -> Any:
  """Shardings for any pytree holding params-shaped subtrees (the params themselves, optax
  moments): those follow the params' specs, every other leaf is replicated."""
  param_sh = sharding.param_shardings(params, mesh)
  rep = replicated(mesh)

  def one(sub):
    if _params_like(sub, params):
      shapes_match = all(a.shape == b.shape for a, b in zip(jax.tree.leaves(sub),
                                                            jax.tree.leaves(params)))
      if shapes_match:
        return param_sh
    return jax.tree.map(lambda _: rep, sub)

  return jax.tree.map(one, tree, is_leaf=lambda x: _params_like(x, params))


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings of a TrainState (params, optimizer state, counters) on `mesh`."""
  return tree_shardings(state, state.params, mesh)


def put(tree: Any, shardings: Any) -> Any:
  """Places `tree` on `shardings` (a matching pytree, or one sharding for every leaf).

  Leaves already spread over processes are resharded on device; other leaves must be
  identical on every process and go through host memory when there are several
  processes, since a process cannot address another process's devices.
  """
  is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)
  # Expand a prefix of shardings (one for a whole subtree) to the full tree.
  shardings = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, tree,
                           is_leaf=is_sharding)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_equivalent_to(s, x.ndim):
        if getattr(x.sharding, "mesh", None) == getattr(s, "mesh", None):
          return x
        # The same shards on another mesh of the same devices (`rollout_mesh`): relabelled
        # in place, since a jit mixes no meshes.
        return jax.make_array_from_single_device_arrays(
            x.shape, s, [shard.data for shard in x.addressable_shards])
      return jax.jit(lambda a: a, out_shardings=s)(x)
    if jax.process_count() > 1:
      x = np.asarray(x)
    return jax.device_put(x, s)

  return jax.tree.map(one, tree, shardings)


def batch_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Batch-leading arrays: rows split over (data, fsdp) where they divide."""
  return NamedSharding(mesh, sharding.batch_spec(tuple(shape), mesh))


class BatchPlacement:
  """This process's rows of a global batch <-> a global array sharded over the mesh.

  Rows of a global batch of R rows are split over processes in contiguous blocks: the
  process of index p holds rows [p R / n, (p + 1) R / n). The mesh's batch axes must
  span the processes for that (a mesh whose batch axes live inside one process would
  replicate the rows on every process); `to_global` checks it.

  `state_shardings` (optional): the train state's shardings, which the host loop's update
  keeps, so every iteration reuses one compilation. Hashed by identity (a jit static).
  """

  def __init__(self, mesh: Mesh, state_shardings: Any = None):
    self.mesh = mesh
    self.state_shardings = state_shardings
    self.num_processes = jax.process_count()
    self.index = jax.process_index()

  def _sharding(self, global_shape) -> NamedSharding:
    return batch_sharding(global_shape, self.mesh)

  def local_range(self, global_rows: int) -> tuple[int, int]:
    """[start, stop) of the global rows this process holds."""
    if global_rows % self.num_processes:
      raise ValueError(f"{global_rows} rows do not split over {self.num_processes} processes; "
                       "make rollout.prompts_per_batch divisible by the process count")
    n = global_rows // self.num_processes
    return self.index * n, (self.index + 1) * n

  def to_global(self, local: Any) -> Any:
    """Process-local numpy rows (a pytree) -> global arrays of num_processes x the rows."""
    def one(x):
      x = np.asarray(x)
      shape = (x.shape[0] * self.num_processes,) + x.shape[1:]
      sh = self._sharding(shape)
      if self.num_processes == 1:
        return jax.device_put(x, sh)
      self._check_blocks(sh, shape)
      return jax.make_array_from_process_local_data(sh, x, shape)
    return jax.tree.map(one, local)

  def _check_blocks(self, sh: NamedSharding, shape) -> None:
    start, stop = self.local_range(shape[0])
    rows = set()
    for idx in sh.addressable_devices_indices_map(shape).values():
      rows.update(range(*idx[0].indices(shape[0])))
    if rows != set(range(start, stop)):
      raise ValueError(
          f"on mesh {dict(self.mesh.shape)} process {self.index} would hold batch rows other "
          f"than its own block [{start}, {stop}) of {shape[0]}: use a config.mesh whose "
          "data x fsdp axes span the processes (e.g. data = number of processes)")

  def local_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a global batch-sharded array, in order."""
    if self.num_processes == 1:
      return np.asarray(x)
    start, stop = self.local_range(x.shape[0])
    lo, rows = sharding.addressable_rows(x)
    if (lo, lo + len(rows)) != (start, stop):
      raise ValueError(f"process {self.index} holds rows [{lo}, {lo + len(rows)}), not its "
                       f"block [{start}, {stop}); see BatchPlacement's docstring")
    return rows

  def gather(self, x: jax.Array) -> np.ndarray:
    """Every row of a global array, on every process."""
    if self.num_processes == 1 or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def jit_iterations(mesh: Mesh, state: Any, ref_params: Any, *, task: iteration.JaxTask,
                   model_config, optimizer, settings: iteration.IterationSettings):
  """`iteration.run_iterations` jitted on `mesh`: the train state keeps its shardings (and
  is donated), rng, algo and metrics are replicated; ref_params follow the params.

  Returns run(state, rng, algo, ref_params, num_iterations) -> (state, rng, metrics);
  call it under `jax.set_mesh(mesh)` so the sampler constrains its cache, and the model its
  activations (`models.sharding.constrain`), to the mesh.
  """
  state_sh = state_shardings(state, mesh)
  ref_sh = (sharding.param_shardings(ref_params, mesh) if ref_params is not None
            else replicated(mesh))
  rep = replicated(mesh)

  @functools.lru_cache(maxsize=None)
  def compiled(num_iterations: int):
    def fn(state, rng, algo, ref_params):
      return iteration.run_iterations(state, rng, algo, num_iterations=num_iterations,
                                      task=task, model_config=model_config,
                                      optimizer=optimizer, settings=settings,
                                      ref_params=ref_params)
    return jax.jit(fn, in_shardings=(state_sh, rep, rep, ref_sh),
                   out_shardings=(state_sh, rep, rep), donate_argnums=(0,))

  def run(state, rng, algo, ref_params, num_iterations: int):
    args = put((state, rng, algo, ref_params), (state_sh, rep, rep, ref_sh))
    return compiled(int(num_iterations))(*args)
  return run


def global_masked_mean(values_NxT: jax.Array, mask_NxT: jax.Array, mesh: Mesh) -> jax.Array:
  """sum(values * mask) / max(sum(mask), 1) over the whole batch, written per device.

  Each device reduces its rows; psum over the batch axes makes the sums global, so the
  result is the token mean over the global token count (not a mean of device means).
  """
  chex.assert_rank([values_NxT, mask_NxT], 2)
  chex.assert_equal_shape([values_NxT, mask_NxT])
  spec = sharding.batch_spec(values_NxT.shape, mesh)
  rows = spec[0] if len(spec) else None
  axes = (rows,) if isinstance(rows, str) else tuple(rows or ())

  def per_device(v, m):
    m = m.astype(jnp.float32)
    sums = jnp.stack([jnp.sum(v.astype(jnp.float32) * m), jnp.sum(m)])
    sums = jax.lax.psum(sums, axes) if axes else sums
    return sums[0] / jnp.maximum(sums[1], 1.0)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=P())(
      values_NxT, mask_NxT)
