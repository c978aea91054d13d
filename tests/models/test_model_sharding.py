"""Sharding next to the model: the (data, fsdp, tensor) mesh, partition specs, sharded
parity on 8 fake CPU devices, a compile-only FSDP memory check, sharded import."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from egpo_jax.models import config as config_lib
from egpo_jax.models import hf_io
from egpo_jax.models import sharding
from egpo_jax.models import transformer as tr

TINY = config_lib.get_config("tiny")
forward = jax.jit(tr.forward, static_argnames=("config", "return_hidden"))


@pytest.fixture(scope="module")
def params():
  return tr.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def mesh(num_devices):
  return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))


def _batch():
  ids = jnp.asarray(np.random.RandomState(0).randint(3, 512, (8, 16)), jnp.int32)
  mask = jnp.asarray(np.arange(16)[None] >= np.array([0, 2, 5, 0, 9, 1, 0, 3])[:, None])
  return ids, mask


def test_mesh_config_resolution():
  assert sharding.MeshConfig().resolve(8) == (1, 8, 1)
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
  assert sharding.MeshConfig(data=-1, fsdp=1, tensor=4).resolve(8) == (2, 1, 4)
  with pytest.raises(ValueError, match="needs 6 devices but 8"):
    sharding.MeshConfig(data=3, fsdp=2, tensor=1).resolve(8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.MeshConfig(data=3, fsdp=-1).resolve(8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_mesh_axes(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_param_specs_by_hand(params, mesh):
  specs = sharding.param_partition_specs(params, mesh)
  layers = specs["layers"]
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  assert layers["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert layers["o_proj"]["kernel"] == P(None, "tensor", None, "fsdp")
  assert layers["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert layers["input_norm"]["scale"] == P()
  # 2 kv heads on a tensor axis of 4: that dimension stays replicated instead of failing.
  mesh4 = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
  k_spec = sharding.param_partition_specs(params, mesh4)["layers"]["k_proj"]["kernel"]
  assert k_spec == P(None, "fsdp")
  assert sharding.batch_spec((8, 16), mesh) == P(("data", "fsdp"))
  assert sharding.batch_spec((6, 16), mesh) == P("data")  # 6 rows do not split 4 ways
  assert sharding.logits_spec((8, 16, 512), mesh) == P(("data", "fsdp"), None, "tensor")


def test_unknown_parameter_has_no_spec(params, mesh):
  with pytest.raises(KeyError, match="no partition spec for parameter extra/w"):
    sharding.param_partition_specs({**params, "extra": {"w": jnp.zeros(3)}}, mesh)


def test_sharded_forward_and_decode_equal_single_device(params, mesh):
  ids, mask = _batch()
  ref = forward(params, ids, mask, config=TINY)
  data = NamedSharding(mesh, sharding.batch_spec(ids.shape, mesh))
  sharded = sharding.shard_params(params, mesh)
  assert sharded["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  with jax.set_mesh(mesh):
    out = forward(sharded, jax.device_put(ids, data), jax.device_put(mask, data), config=TINY)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # The KV cache with its own specs: prefill + one decode step.
    cache = tr.init_cache(TINY, 8, 18)
    cache = jax.device_put(cache, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                               sharding.cache_partition_specs(cache, mesh)))
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    prefill = jax.jit(tr.prefill, static_argnames="config")
    decode = jax.jit(tr.decode, static_argnames="config")
    logits, cache = prefill(sharded, ids[:, :12], mask[:, :12], cache, config=TINY)
    np.testing.assert_allclose(logits, ref[:, 11], atol=1e-5, rtol=1e-5)
    logits, cache = decode(sharded, ids[:, 12], cache, config=TINY)
    np.testing.assert_allclose(logits, ref[:, 12], atol=1e-5, rtol=1e-5)


def test_fsdp8_holds_an_eighth_of_the_params_per_device(num_devices):
  """Compile-only: Qwen2.5-Math-1.5B (6.2 GB in float32) is never allocated."""
  config = config_lib.get_config("qwen2.5-math-1.5b")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
  abstract = sharding.abstract_params(config, mesh)
  total = config.num_params() * 4
  assert sharding.per_device_bytes(abstract) == pytest.approx(total / 8, rel=0.01)
  data = NamedSharding(mesh, sharding.batch_spec((8, 32), mesh))
  ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=data)
  mask = jax.ShapeDtypeStruct((8, 32), jnp.bool_, sharding=data)
  compiled = jax.jit(functools.partial(tr.forward, config=config, return_hidden=True)).lower(
      abstract, ids, mask).compile()
  per_device_args = compiled.memory_analysis().argument_size_in_bytes
  assert per_device_args == pytest.approx(total / 8, rel=0.01)


def test_import_places_each_param_on_its_sharding(params, mesh, tmp_path):
  hf_io.save_hf_checkpoint(params, TINY, str(tmp_path), dtype="float32",
                           max_shard_bytes=100_000)
  loaded = hf_io.load_hf_params(str(tmp_path), TINY, mesh=mesh)
  want = sharding.param_shardings(params, mesh)
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(
      f"{a.sharding} != {s}"), loaded, want)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
