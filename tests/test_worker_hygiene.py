"""The conftest's bound on compiled code (`_release_compiled_code`) relies on two facts of
this jax: each compiled XLA:CPU executable holds memory mappings of its own, and
`jax.clear_caches()` frees them. A jax upgrade that broke either would bring back the
worker crashes at vm.max_map_count without failing anything else."""

import gc
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import _mapped_regions  # pylint: disable=import-error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_compiled_code_is_mapped_until_the_caches_are_cleared():
  used0, limit = _mapped_regions()
  assert 0 < used0 < limit
  fns = [jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum(0)) for i in range(30)]
  for i, f in enumerate(fns):
    f(jnp.ones((4 + i, 8))).block_until_ready()     # a distinct shape: a new executable
  used1, _ = _mapped_regions()
  assert used1 - used0 >= 30, (used0, used1)
  jax.clear_caches()
  gc.collect()
  used2, _ = _mapped_regions()
  assert used1 - used2 >= 0.5 * (used1 - used0), (used0, used1, used2)
