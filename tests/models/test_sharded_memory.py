"""Compile-only: per-device bytes of params + AdamW state under FSDP (nothing allocated).

One optimizer step of Qwen2.5-Math-1.5B (1.54 B params; params + two AdamW moments =
18.5 GB in float32, gradient 6.2 GB) compiled on the 8 fake CPU devices with the trainer's
shardings. Tolerance: 0.1 %. Every large tensor splits its width (1,536) over fsdp=8; the
slack is the leaves that stay replicated (RMSNorm scales, q/k/v biases, which only the
tensor axis splits, and scalar counters): about 1.5 MB of the 2.3 GB each device holds.
"""

import pytest

from egpo_jax.models import config as config_lib
from egpo_jax.models import sharding
from egpo_jax.training import memory


@pytest.fixture(scope="module")
def qwen15b_fsdp8(num_devices):
  config = config_lib.get_config("qwen2.5-math-1.5b")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=num_devices))
  return config, memory.update_memory(config, mesh)


def test_fsdp8_holds_an_eighth_of_params_and_adamw_state(qwen15b_fsdp8):
  config, m = qwen15b_fsdp8
  # The unsharded totals, from the parameter count: params, mu, nu (+ a few counters).
  assert m.grad_bytes == config.num_params() * 4
  assert 0 <= m.state_bytes - 3 * m.grad_bytes < 100
  # XLA's per-device argument buffers are exactly the shards of state + gradient + loss.
  assert m.argument_bytes == m.per_device_state_bytes + m.per_device_grad_bytes + 4
  assert m.per_device_state_bytes == pytest.approx(m.state_bytes / 8, rel=1e-3)
  assert m.per_device_grad_bytes == pytest.approx(m.grad_bytes / 8, rel=1e-3)
  assert m.state_fraction >= 1 / 8


def test_the_update_writes_the_state_in_place_and_never_unshards_it(qwen15b_fsdp8):
  _, m = qwen15b_fsdp8
  assert m.alias_bytes == m.per_device_state_bytes   # donated: new state in place
  # Temporaries stay per-device too: an unsharded gradient alone would be 6.2 GB.
  assert m.temp_bytes < m.per_device_state_bytes
  assert m.peak_bytes < (m.state_bytes + m.grad_bytes) / 4

