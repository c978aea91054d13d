"""The conftest's bound on compiled code (`_release_compiled_code`) relies on two facts of
this jax: each compiled XLA:CPU executable holds memory mappings of its own, and
`jax.clear_caches()` frees them. A jax upgrade that broke either would bring back the
worker crashes at vm.max_map_count without failing anything else. Measured in a fresh
interpreter: in a busy test worker, executables freed by earlier tests move the count."""

import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import _mapped_regions
import jax, jax.numpy as jnp
used0, limit = _mapped_regions()
fns = [jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum(0)) for i in range(30)]
for i, f in enumerate(fns):
  f(jnp.ones((4 + i, 8))).block_until_ready()      # a distinct shape: a new executable
used1, _ = _mapped_regions()
jax.clear_caches()
gc.collect()
used2, _ = _mapped_regions()
print(json.dumps([used0, used1, used2, limit]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_compiled_code_is_mapped_until_the_caches_are_cleared():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(__file__)],
                       capture_output=True, text=True, env=env, timeout=300, check=True)
  used0, used1, used2, limit = json.loads(out.stdout.strip().splitlines()[-1])
  assert 0 < used0 < limit
  assert used1 - used0 >= 30, (used0, used1)
  assert used1 - used2 >= 0.5 * (used1 - used0), (used0, used1, used2)
