"""Kernels lower for the devices the traced code compiles for (`sharding.target_platform`),
not JAX's host backend: a TPU topology's mesh in the deviceless dry run compiles Mosaic
kernels, and each Pallas kernel runs per device under a mesh (XLA cannot partition one).

The per-device splash wrapper is checked on fake CPU devices in the Pallas interpreter;
the TPU compiles need libtpu (`pip install -e ".[tpu-aot]"`) and skip without it.
"""

import functools
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.models import attention, sharding

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="libtpu not installed (pip install -e '.[tpu-aot]')")


def _inputs(b=4, t=100, h=4, g=2, hd=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, hd))
  k, v = (jax.random.normal(x, (b, t, g, hd)) for x in ks[1:])
  mask = jnp.arange(t)[None] >= jnp.array([0, 30, 5, 60])[:b, None]   # left pads
  return q, k, v, mask


def test_target_platform_is_the_host_backend_without_a_mesh_and_the_mesh_devices_with_one():
  assert sharding.target_platform() == jax.default_backend()
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  with jax.set_mesh(mesh):
    assert sharding.target_platform() == mesh.devices.flat[0].platform == "cpu"


def test_splash_per_device_equals_splash_whole_values_and_grads(num_devices):
  """Rows over data x fsdp, heads over tensor: each device's splash call on its block
  gives the whole call's outputs and gradients (valid query rows)."""
  q, k, v, mask = _inputs()
  valid = (mask[:, :, None, None]).astype(jnp.float32)
  whole = functools.partial(attention.attend_splash, interpret=True)
  split = functools.partial(attention._splash_per_device, interpret=True)
  loss = lambda fn, *a: jnp.sum((fn(*a, mask) * valid) ** 2)   # noqa: E731
  want = (whole(q, k, v, mask) * valid, jax.grad(functools.partial(loss, whole),
                                                 argnums=(0, 1, 2))(q, k, v))
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  with jax.set_mesh(mesh):
    run = jax.jit(lambda q, k, v: (split(q, k, v, mask) * valid,
                                   jax.grad(functools.partial(loss, split),
                                            argnums=(0, 1, 2))(q, k, v)))
    got = run(q, k, v)
    hlo = run.lower(q, k, v).compile().as_text()
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  # Per device: no device gathers another's rows or heads of q, k or v.
  from egpo_jax.training import dry_run
  assert not [c for c in dry_run.parse_hlo(hlo).collectives if c.kind == "all-gather"]


def test_splash_refuses_a_mesh_that_splits_rows_or_heads_differently(num_devices):
  q, k, v, mask = _inputs(b=4, h=2, g=1)   # 1 kv head cannot split over tensor 2
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"^model.attention='splash'"):
    attention._splash_per_device(q, k, v, mask, interpret=True)


@needs_libtpu
def test_splash_and_the_pallas_decode_kernel_compile_for_a_tpu_topology():
  """Under a v5e:2x2 mesh both Mosaic kernels compile (before `target_platform`, the
  host's CPU backend refused splash and ran the decode kernel in the interpreter; before
  the per-device wrapper, XLA refused to partition the splash kernel)."""
  from egpo_jax.training import dry_run
  devices = dry_run.tpu_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 2, 2), sharding.AXES)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  sd = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(   # noqa: E731
      shape, dtype, sharding=rows)
  b, t, h, g, hd, s = 4, 256, 8, 2, 128, 512
  with jax.set_mesh(mesh):
    assert sharding.target_platform() == "tpu"
    prefill = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, implementation="splash"))
    hlo = prefill.lower(sd(b, t, h, hd), sd(b, t, g, hd), sd(b, t, g, hd),
                        sd(b, t, dtype=jnp.bool_)).compile().as_text()
    assert "tpu_custom_call" in hlo
    decode = jax.jit(lambda q, k, v, m, r: attention.attend(
        q, k, v, m, read_slots_B=r, read_block=128, read_kernel="pallas"))
    hlo = decode.lower(sd(b, h, hd), sd(b, g, hd, s), sd(b, g, s, hd),
                       sd(b, s, dtype=jnp.bool_), sd(b, dtype=jnp.int32)).compile().as_text()
    assert "tpu_custom_call" in hlo
