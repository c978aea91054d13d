"""The trainer on meshes of 8 fake CPU devices computes what it computes on one device.

Layouts (data, fsdp, tensor): (8, 1, 1), (2, 4, 1), (2, 2, 2). Tolerances: one update on
fixed rollouts agrees to atol 1e-6 (SGD, so parameter differences are gradient
differences: float32 sums in another order, ~1e-7 relative); two full iterations
(rollout with per-response keys, verify, advantages, AdamW update) agree to atol 1e-5,
and their sampled responses (hence accuracy and rewards) are identical.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.sharding import PartitionSpec as P

from egpo_jax.core import advantages, losses
from egpo_jax.models import sharding, transformer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import engine
from egpo_jax.training import config as config_lib
from egpo_jax.training import distributed, iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import RolloutBatch, TrainState
from experiments.configs import tiny

CFG = get_config("tiny")
LAYOUTS = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
SGD = optax.sgd(0.5, momentum=0.9)   # linear in the gradient; its trace is sharded too
ADAMW = make_optimizer(lr=1e-3)


def _sample_prompts(rng, b):
  toks = jax.random.randint(rng, (b, 4), 10, 14)
  return toks, jnp.ones((b, 4), bool), toks[:, 0]


def _verify(ids, mask, answer):
  """Correct iff the first response token has the parity of the first prompt token (about
  half the responses of the untrained model, so groups are mixed)."""
  return (ids[:, 0] % 2 == answer % 2) & mask[:, 0]


TASK = iteration.JaxTask(_sample_prompts, _verify)
SETTINGS = iteration.IterationSettings(
    prompts_per_batch=8, sampling=engine.SamplingSpec(group_size=4, max_new_tokens=5,
                                                      eos_ids=(2,)),
    update=update.UpdateSettings(micro_batches=2))


@functools.lru_cache(maxsize=None)
def _mesh(layout):
  return sharding.make_mesh(sharding.MeshConfig(*LAYOUTS[layout]))


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.PRNGKey(0))


def _batch(n=32, p=4, t=6):
  """Fixed rollouts with very uneven lengths, so that a mean of per-device token means
  would differ from the global token mean."""
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  lengths = jnp.where(jnp.arange(n) < n // 4, t, 1)
  mask = jnp.arange(t)[None] < lengths[:, None]
  return RolloutBatch(
      prompt_ids_NxP=jax.random.randint(k[0], (n, p), 3, 300),
      prompt_mask_NxP=jnp.ones((n, p), bool),
      completion_ids_NxT=jax.random.randint(k[1], (n, t), 3, 300),
      completion_mask_NxT=mask,
      old_logps_NxT=-jax.random.uniform(k[2], (n, t), minval=4.0, maxval=8.0) * mask,
      adv_N=jax.random.normal(k[3], (n,)),
      ref_logps_NxT=jnp.zeros((n, t)), is_weights_NxT=jnp.ones((n, t)))


_UPDATE = functools.partial(update.update, optimizer=SGD, model_config=CFG,
                            settings=update.UpdateSettings(micro_batches=2))


@pytest.fixture(scope="module")
def single_update(params):
  state = TrainState.create(params, SGD.init(params))
  return jax.jit(_UPDATE)(state, _batch(), jax.random.PRNGKey(7))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_update_on_fixed_rollouts_equals_single_device(params, single_update, layout):
  mesh = _mesh(layout)
  state = TrainState.create(params, SGD.init(params))
  state_sh = distributed.state_shardings(state, mesh)
  batch = _batch()
  batch_sh = jax.tree.map(lambda x: distributed.batch_sharding(x.shape, mesh), batch)
  rep = distributed.replicated(mesh)
  step = jax.jit(_UPDATE, in_shardings=(state_sh, batch_sh, rep),
                 out_shardings=(state_sh, rep))
  with jax.set_mesh(mesh):
    state = distributed.put(state, state_sh)
    new_state, metrics = step(state, distributed.put(batch, batch_sh), jax.random.PRNGKey(7))
  ref_state, ref_metrics = single_update
  chex.assert_trees_all_close(new_state.params, ref_state.params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(new_state.opt_state, ref_state.opt_state, atol=1e-6, rtol=0)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], atol=1e-6)
  # The result stays on the mesh: params and the momentum split like the params.
  q = new_state.params["layers"]["q_proj"]["kernel"]
  assert q.sharding.spec == sharding.param_partition_specs(params, mesh)["layers"][
      "q_proj"]["kernel"]
  trace = new_state.opt_state[0].trace["layers"]["q_proj"]["kernel"]
  assert trace.sharding.is_equivalent_to(q.sharding, q.ndim)


def test_train_state_shardings():
  """AdamW's moments are split like their params; counters and the schedule replicated."""
  mesh = _mesh("data2_fsdp2_tensor2")
  params = jax.eval_shape(lambda: transformer.init_params(CFG, jax.random.PRNGKey(0)))
  state = jax.eval_shape(lambda p: TrainState.create(p, ADAMW.init(p)), params)
  sh = distributed.state_shardings(state, mesh)
  want = sharding.param_shardings(params, mesh)
  adam = sh.opt_state[1].inner_state[0]
  assert adam.mu == want and adam.nu == want and sh.params == want
  for leaf in (sh.step, sh.nonfinite_streak, adam.count, sh.opt_state[1].count):
    assert leaf.spec == P()
  assert want["layers"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_fsdp8_train_state_memory_per_device():
  """Qwen2.5-Math-1.5B's params + AdamW moments (12 bytes a parameter in float32) take an
  eighth per device on fsdp=8 (docs/LAUNCHING.md's table); abstract shapes, no compile."""
  config = get_config("qwen2.5-math-1.5b")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
  params = sharding.abstract_params(config)
  state = jax.eval_shape(lambda p: TrainState.create(p, ADAMW.init(p)), params)
  placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state, distributed.state_shardings(state, mesh))
  total = 12 * config.num_params()
  assert sharding.per_device_bytes(placed) == pytest.approx(total / 8, rel=0.01)


@pytest.fixture(scope="module")
def iterations_single(params):
  state = TrainState.create(params, ADAMW.init(params))
  run = jax.jit(functools.partial(iteration.run_iterations, task=TASK, model_config=CFG,
                                  optimizer=ADAMW, settings=SETTINGS),
                static_argnames="num_iterations")
  return run(state, jax.random.PRNGKey(11), iteration.AlgoArrays.create("egpo"),
             num_iterations=2)


def test_full_iterations_on_a_mesh_equal_single_device(params, iterations_single):
  mesh = _mesh("data2_fsdp2_tensor2")
  params = jax.tree.map(jnp.copy, params)   # run donates the state, params included
  state = TrainState.create(params, ADAMW.init(params))
  run = distributed.jit_iterations(mesh, state, None, task=TASK, model_config=CFG,
                                   optimizer=ADAMW, settings=SETTINGS)
  with jax.set_mesh(mesh):
    state, rng, metrics = run(state, jax.random.PRNGKey(11),
                              iteration.AlgoArrays.create("egpo"), None, 2)
  ref_state, ref_rng, ref_metrics = iterations_single
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(ref_rng))
  for key in ("accuracy", "reward", "response_length", "rollout_tokens"):
    np.testing.assert_array_equal(metrics[key], ref_metrics[key], err_msg=key)
  assert float(ref_metrics["frac_mixed"].min()) > 0   # mixed groups: a real update
  chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-5, rtol=0)
  assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


@pytest.fixture(scope="module")
def sharded_mean():
  return jax.jit(distributed.global_masked_mean, static_argnames="mesh")


@given(layout=st.sampled_from(sorted(LAYOUTS)), seed=st.integers(0, 2**16),
       density=st.sampled_from([0.0, 0.1, 0.7]))
def test_shard_map_masked_mean_equals_plain(sharded_mean, layout, seed, density):
  rng = np.random.RandomState(seed)
  values = rng.randn(16, 6).astype(np.float32)
  mask = rng.rand(16, 6) < density
  mask[:2] = True   # uneven rows per device
  mesh = _mesh(layout)
  got = sharded_mean(jnp.asarray(values), jnp.asarray(mask), mesh=mesh)
  want = (values * mask).sum() / max(mask.sum(), 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_core_loss_under_pmap_uses_the_global_token_count(num_devices):
  """pmap over row shards: policy_loss with psum'd counts, summed over devices, is the
  loss of the whole batch (a per-device token mean would not be)."""
  rng = np.random.RandomState(0)
  n, t = 16, 5
  mask = np.arange(t)[None] < np.where(np.arange(n) < 4, t, 1)[:, None]
  logps = jnp.asarray(-rng.rand(n, t) * 3 * mask, jnp.float32)
  old = jnp.asarray(-rng.rand(n, t) * 3 * mask, jnp.float32)
  adv = jnp.asarray(rng.randn(n), jnp.float32)
  whole, _ = losses.policy_loss(logps, old, adv, jnp.asarray(mask))

  def per_device(lp, ol, ad, m):
    count = jax.lax.psum(m.sum().astype(jnp.float32), "d")
    loss, _ = losses.policy_loss(lp, ol, ad, m, num_tokens=count)
    return jax.lax.psum(loss, "d")

  split = lambda x: jnp.reshape(x, (num_devices, n // num_devices) + x.shape[1:])
  got = jax.pmap(per_device, axis_name="d")(split(logps), split(old), split(adv),
                                            split(jnp.asarray(mask)))
  np.testing.assert_allclose(got, whole, rtol=1e-6)
  # Group advantages are per group: the same under pmap over groups.
  rewards = jnp.asarray(rng.choice([-1.0, 1.0], (8, 4)), jnp.float32)
  adv_whole = advantages.grpo_advantages(rewards).advantages
  adv_pmap = jax.pmap(lambda r: advantages.grpo_advantages(r).advantages)(rewards[:, None])
  np.testing.assert_allclose(adv_pmap[:, 0], adv_whole, atol=1e-6)


def test_batch_placement_in_one_process():
  mesh = _mesh("data2_fsdp4")
  place = distributed.BatchPlacement(mesh)
  ids = np.arange(32).reshape(16, 2)
  glob = place.to_global(ids)
  assert glob.sharding.spec == P(("data", "fsdp")) and glob.shape == (16, 2)
  np.testing.assert_array_equal(place.local_rows(glob), ids)
  np.testing.assert_array_equal(place.gather(glob), ids)
  assert place.local_range(16) == (0, 16)


def test_distributed_spec_reads_the_environment_and_names_fields():
  env = {"EGPO_COORDINATOR_ADDRESS": "10.0.0.1:1234", "EGPO_NUM_PROCESSES": "4",
         "EGPO_PROCESS_ID": "3"}
  spec = distributed.DistributedSpec().resolve(env)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == (
      "10.0.0.1:1234", 4, 3)
  assert spec.wants_init
  # The config wins over the environment; one process needs nothing.
  spec = distributed.DistributedSpec(num_processes=1).resolve(env)
  assert not spec.wants_init
  assert not distributed.DistributedSpec(mode="off").resolve(env).wants_init
  assert not distributed.initialize(distributed.DistributedSpec(), environ={})
  with pytest.raises(ValueError, match="distributed.coordinator_address"):
    distributed.DistributedSpec(num_processes=2, process_id=0).resolve({})
  with pytest.raises(ValueError, match="distributed.process_id=-1"):
    distributed.DistributedSpec(num_processes=2, coordinator_address="h:1").resolve({})
  with pytest.raises(ValueError, match="EGPO_NUM_PROCESSES"):
    distributed.DistributedSpec().resolve({"EGPO_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="distributed.mode"):
    distributed.DistributedSpec(mode="yes").resolve({})


def test_config_mesh_and_distributed_fields_are_validated():
  ok = tiny.get_config()
  config_lib.validate(ok)
  assert dict(distributed.mesh_from_config(ok).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  for field, value in (("mesh.data", 0), ("mesh.fsdp", -2), ("distributed.mode", "yes"),
                       ("distributed.num_processes", -1), ("distributed.timeout_s", 0)):
    with pytest.raises(config_lib.ConfigError, match=field.split(".")[0]):
      config_lib.validate(config_lib.with_overrides(ok, {field: value}))
  bad = config_lib.with_overrides(ok, {"mesh.data": 3})
  with pytest.raises(ValueError, match="config.mesh"):
    distributed.mesh_from_config(bad)
