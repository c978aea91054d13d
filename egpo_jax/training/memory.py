"""Compile-only memory accounting of the optimizer update on a device mesh.

`update_memory(model_config, mesh)` builds the trainer's state (params + AdamW moments +
counters) from abstract shapes with the trainer's shardings (`distributed.state_shardings`),
compiles one optimizer step (`optimizer.apply_gradients`, the state donated) and reads
XLA's per-device buffer assignment. Nothing is allocated, so a 7B model can be checked on
a laptop with fake devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -c "
    from egpo_jax.models import config, sharding
    from egpo_jax.training import memory
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
    print(memory.update_memory(config.get_config('qwen2.5-math-7b'), mesh))"

It covers what persists across steps (params, optimizer state) and the gradients; the
activations of the forward/backward pass depend on batch and sequence sizes: the whole
iteration, activations included, is `dry_run` (`python -m experiments.main --dry_run`),
whose abstract state and buffer accounting this reuses.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from egpo_jax.models import sharding
from egpo_jax.models.config import ModelConfig
from egpo_jax.training import distributed, dry_run
from egpo_jax.training.optimizer import apply_gradients, make_optimizer


@dataclasses.dataclass(frozen=True)
class UpdateMemory:
  """Bytes of one optimizer step; `per_device_*` are what one device holds.

  Attributes:
    state_bytes: the whole train state (params + optimizer state + counters), unsharded.
    grad_bytes: the whole gradient (one params-shaped tree), unsharded.
    per_device_state_bytes: one device's share of the state, from its shardings.
    per_device_grad_bytes: one device's share of the gradient.
    argument_bytes: XLA's per-device argument buffers (state + gradient + loss).
    output_bytes: per-device outputs (the new state; aliased to the donated input).
    alias_bytes: outputs written in place of donated inputs.
    temp_bytes: per-device temporaries of the step.
    num_devices: devices of the mesh.
    compile_seconds: wall time to lower and compile.
  """
  state_bytes: int
  grad_bytes: int
  per_device_state_bytes: int
  per_device_grad_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  num_devices: int
  compile_seconds: float

  @property
  def state_fraction(self) -> float:
    """Per-device state bytes / unsharded state bytes (1/num_devices when fully split)."""
    return self.per_device_state_bytes / self.state_bytes

  @property
  def peak_bytes(self) -> int:
    """Per-device arguments + temporaries + outputs not written in place."""
    return dry_run.CompiledMemory(self.argument_bytes, self.output_bytes, self.alias_bytes,
                                  self.temp_bytes).peak_bytes


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def update_memory(model_config: ModelConfig, mesh: Mesh,
                  optimizer: optax.GradientTransformation | None = None) -> UpdateMemory:
  """Compiles (never runs) one optimizer step of `model_config` on `mesh`.

  Args:
    model_config: the model whose params (in `param_dtype`) are trained.
    mesh: a (data, fsdp, tensor) mesh from `models.sharding.make_mesh`.
    optimizer: defaults to the trainer's chain (global-norm clip -> AdamW).
  """
  optimizer = optimizer or make_optimizer(lr=1e-6, weight_decay=0.01)
  state_in = dry_run.abstract_state(model_config, optimizer, mesh)
  state_sh = jax.tree.map(lambda s: s.sharding, state_in)
  grads_in = state_in.params
  loss_in = jax.ShapeDtypeStruct((), jnp.float32, sharding=distributed.replicated(mesh))

  def step(state, grads, loss):
    return apply_gradients(state, grads, loss, optimizer)[0]

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, out_shardings=state_sh, donate_argnums=(0,)).lower(
        state_in, grads_in, loss_in).compile()
  seconds = time.perf_counter() - start
  stats = dry_run.CompiledMemory.of(compiled)
  return UpdateMemory(
      state_bytes=_nbytes(state_in), grad_bytes=_nbytes(grads_in),
      per_device_state_bytes=sharding.per_device_bytes(state_in),
      per_device_grad_bytes=sharding.per_device_bytes(grads_in),
      argument_bytes=stats.argument_bytes, output_bytes=stats.output_bytes,
      alias_bytes=stats.alias_bytes, temp_bytes=stats.temp_bytes,
      num_devices=mesh.size, compile_seconds=seconds)
