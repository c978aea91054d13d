"""The rollout on its own mesh (`distributed.rollout_mesh`, `RolloutOnMesh`): a host-mode
iteration whose rollout decodes on (4, 1, 2) while training on (1, 8, 1) samples the same
tokens and makes the same update as one that decodes on the training mesh; bad sizes
are refused naming rollout.tensor.

The tiny model computes in float32, so the reshard's cast is the identity and the two
runs differ only in the order of float32 sums of the tensor-split matmuls (~1e-7): the
sampled tokens are identical and the params agree to atol 1e-5.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.models import sharding, transformer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import distributed, host_loop, iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import TrainState

CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
SETTINGS = iteration.IterationSettings(
    prompts_per_batch=8, sampling=engine.SamplingSpec(group_size=2, max_new_tokens=5,
                                                      eos_ids=(2,)),
    update=update.UpdateSettings(micro_batches=2))


def _sample(rng, b):
  ids = np.asarray(jax.random.randint(rng, (b, 4), 10, 14))
  return ids, np.ones((b, 4), bool), list(ids[:, 0])


def _score(ids, mask, answers):
  return np.array([m[0] and i[0] % 2 == a % 2 for i, m, a in zip(ids, mask, answers)])


TASK = host_loop.HostTask(_sample, _score)


def test_rollout_mesh_is_data_parallel_tensor_groups_and_refuses_bad_sizes(num_devices):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1))
  heads = dict(num_heads=4, num_kv_heads=2)
  assert distributed.rollout_mesh(mesh, 0, **heads) is mesh
  r = distributed.rollout_mesh(mesh, 2, **heads)
  assert dict(r.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert list(r.devices.flat) == list(mesh.devices.flat)   # one reshard moves params
  assert dict(distributed.rollout_mesh(mesh, 1, **heads).shape) == {
      "data": 8, "fsdp": 1, "tensor": 1}
  dp = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=1, tensor=2))
  assert distributed.rollout_mesh(dp, 2, **heads) is dp
  for tensor, words in ((3, "divide the 8 devices"), (-1, "use >= 0"), (4, "KV heads")):
    with pytest.raises(ValueError, match=rf"^config\.rollout\.tensor={tensor}: .*{words}"):
      distributed.rollout_mesh(mesh, tensor, **heads)
  with pytest.raises(ValueError, match="query heads"):
    distributed.rollout_mesh(mesh, 8, num_heads=4, num_kv_heads=8)


def test_rollout_params_are_cast_then_placed_on_the_rollout_mesh(num_devices):
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  rmesh = distributed.rollout_mesh(mesh, 2, num_heads=4, num_kv_heads=2)
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  params = sharding.shard_params(transformer.init_params(CFG, jax.random.PRNGKey(0)), mesh)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p: distributed.rollout_params(p, cfg, mesh, rmesh))(params)
  want = sharding.param_partition_specs(params, rmesh)
  assert "tensor" in tuple(want["layers"]["q_proj"]["kernel"])
  for got, spec, orig in zip(jax.tree.leaves(out), jax.tree.leaves(
      want, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                             jax.tree.leaves(params)):
    assert got.dtype == jnp.bfloat16 and got.sharding.mesh == rmesh
    assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(rmesh, spec), got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(orig.astype(jnp.bfloat16)))


def _iteration(mesh, rollout):
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  state = TrainState.create(params, OPT.init(params))
  state = distributed.put(state, distributed.state_shardings(state, mesh))
  placement = distributed.BatchPlacement(mesh, distributed.state_shardings(state, mesh))
  seen = []

  def recording(params, *args, **kwargs):
    gen = rollout(params, *args, **kwargs)
    seen.append(np.asarray(gen.completion_ids_NxT))
    return gen
  recording.streams = getattr(rollout, "streams", False)
  with jax.set_mesh(mesh):
    state, metrics = host_loop.host_iteration(
        state, jax.random.PRNGKey(3), iteration.AlgoArrays.create("egpo"), task=TASK,
        model_config=CFG, optimizer=OPT, settings=SETTINGS, placement=placement,
        rollout=rollout if isinstance(rollout, distributed.RolloutOnMesh) else recording)
  return state, metrics, seen


def _make_rollout(slots):
  if slots:
    return continuous.HostRollout(
        CFG, continuous.ContinuousSpec(sampling=SETTINGS.sampling, slots=slots),
        chunk_steps=2)
  return host_loop.jitted_rollout(CFG, SETTINGS)


@pytest.mark.parametrize("slots", [0, 4])
def test_host_iteration_on_a_rollout_mesh_equals_the_training_mesh(num_devices, slots):
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  rmesh = distributed.rollout_mesh(mesh, 2, num_heads=4, num_kv_heads=2)
  make = lambda: _make_rollout(slots)   # noqa: E731
  base_state, base_metrics, base_ids = _iteration(mesh, make())

  inner = make()
  tokens = []

  def recording(params, ids, mask, rng, **kwargs):
    # Runs under the rollout mesh, on params resharded there.
    assert jax.tree.leaves(params)[0].sharding.mesh == rmesh
    gen = inner(params, ids, mask, rng, **kwargs)
    tokens.append(np.asarray(gen.completion_ids_NxT))
    return gen
  recording.streams = getattr(inner, "streams", False)
  on_mesh = distributed.RolloutOnMesh(recording, mesh, rmesh, CFG)
  state, metrics, _ = _iteration(mesh, on_mesh)
  np.testing.assert_array_equal(tokens[0], base_ids[0])
  chex.assert_trees_all_close(state.params, base_state.params, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], base_metrics["loss"], rtol=1e-5, atol=1e-7)
  # The state leaves on the training mesh.
  assert jax.tree.leaves(state.params)[0].sharding.mesh == mesh


@pytest.mark.parametrize("slots", [0, 4])
def test_caps_pass_through_the_rollout_mesh_or_are_refused(num_devices, slots):
  """Every rollout takes caps_N: RolloutOnMesh hands them to the wrapped rollout, which
  honours them (continuous batching) or refuses them in one line (the static sampler)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  rmesh = distributed.rollout_mesh(mesh, 2, num_heads=4, num_kv_heads=2)
  inner = _make_rollout(slots)
  seen = []

  def recording(params, ids, mask, rng, **kwargs):
    seen.append(kwargs)
    return inner(params, ids, mask, rng, **kwargs)
  on_mesh = distributed.RolloutOnMesh(recording, mesh, rmesh, CFG)
  params = sharding.shard_params(transformer.init_params(CFG, jax.random.PRNGKey(0)), mesh)
  ids, mask, _ = _sample(jax.random.PRNGKey(5), 8)
  caps_N = np.tile(np.arange(1, 5, dtype=np.int32), 4)   # 16 rows, caps 1..4 < T = 5
  call = lambda caps: on_mesh(params, ids, mask, jax.random.PRNGKey(6),   # noqa: E731
                              caps_N=caps)
  with jax.set_mesh(mesh):
    if not slots:
      with pytest.raises(ValueError, match=r"^per-record response caps \(config\.task\."
                                           r"max_new_tokens_field\) need continuous "
                                           r"batching: set rollout\.slots > 0"):
        call(caps_N)
      assert int(call(None).lengths_N.max()) <= 5   # no caps: the static sampler runs
      return
    gen = call(caps_N)
  np.testing.assert_array_equal(seen[-1]["caps_N"], caps_N)
  lengths = np.asarray(gen.lengths_N)
  ids_out = np.asarray(gen.completion_ids_NxT)
  last = ids_out[np.arange(16), lengths - 1]
  # Each row stops at its stop token (id 2) or at its own cap, never past it.
  assert (lengths <= caps_N).all() and ((lengths == caps_N) | (last == 2)).all()
  np.testing.assert_array_equal(np.asarray(gen.truncated_N), (lengths == caps_N) & (last != 2))


def test_rollout_tensor_is_host_mode_only():
  from egpo_jax.training import config as config_lib
  from experiments.configs import tiny
  c = tiny.get_config()
  c.rollout.tensor = 2
  with pytest.raises(config_lib.ConfigError, match=r"^config\.rollout\.tensor=2: .*host mode"):
    config_lib.validate(c)
