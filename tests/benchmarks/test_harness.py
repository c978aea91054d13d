"""Tests for the benchmark harness's rates and the rollout's FLOP and byte counts."""

import numpy as np
import pytest

from benchmarks import harness
from benchmarks.scenarios import rollout
from egpo_jax.models import config as model_config


def test_rollout_bytes_by_hand():
  # tiny: D 64, 2 layers, 4/2 heads of 16, MLP 128, V 512.
  config = model_config.get_config("tiny")
  weights = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 512  # 106,496
  slot = 2 * 32 * 2  # keys + values of 2 kv heads x 16, 2 layers
  # Over the 63 decode steps each prompt's 16 slots are read once per group of 8 rows and
  # each row's own 1..63 (2,016 in all).
  reads = 64 * weights + (8 * 16 * 63 + 64 * 2016) * slot
  writes = (8 * 16 + 64 * 63) * slot  # the prefill's slots, then one per row and step
  assert rollout.rollout_bytes(config, 8, 8, 16, 64) == 4 * (reads + writes) == 99_581_952


def test_copy_calls_moves_what_it_counts():
  fn, moved = harness.copy_calls(nbytes=4 << 20, calls=3)
  out = np.asarray(fn())
  assert moved == 2 * 3 * (4 << 20)
  assert out.shape == ((4 << 20) // 4,) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:5], 3.0)  # three passes over the same buffer
  np.testing.assert_array_equal(np.asarray(fn())[-5:], 6.0)
  assert harness.copy_gbps(nbytes=4 << 20, repeats=2) > 0


def test_peaks_on_cpu_use_the_cpu_sizes():
  if harness.on_accelerator():
    pytest.skip("JAX runs on an accelerator here")
  assert harness.dot_size() == 1024
  _, flops = harness.matmul_calls(calls=2)
  assert flops == 2 * 2 * 1024**3


@pytest.mark.slow
def test_rollout_rows_on_an_accelerator_drop_the_cpu_baseline(monkeypatch, tmp_path):
  """The accelerator path on CPU: no transformers row, bandwidth columns on every model
  row, and `benchmarks.run` writes the section under the backend's name."""
  from benchmarks import run as bench_run
  monkeypatch.setattr(harness, "on_accelerator", lambda: True)
  # The card's sizes (8192^3, 2 GiB) would take minutes on a CPU.
  dot, copy = harness.matmul_calls, harness.copy_calls
  monkeypatch.setattr(harness, "matmul_calls", lambda: dot(256, calls=2))
  monkeypatch.setattr(harness, "copy_calls", lambda: copy(4 << 20, calls=2))
  monkeypatch.setattr(harness, "dot_size", lambda: 256)
  config = model_config.get_config("tiny")
  rows = rollout._model_rows("tiny", config, 8, repeats=1, with_naive=False)
  names = [r.name for r in rows]
  assert not any("transformers" in n for n in names)
  model_rows = [r for r in rows if r.seconds is not None]
  assert {r.baseline for r in model_rows} == {"tiny: egpo_jax generate (KV cache)"}
  for r in model_rows:
    if "weight matmuls only" not in r.name:
      assert r.extra["GB/s"] > 0 and r.extra["x bandwidth floor"] > 0
  assert "256^3" in names[-2]

  monkeypatch.setattr(harness, "machine_info", lambda: {
      "cpu": "x", "cores": "1", "devices": "fake", "backend": "gpu", "python": "3",
      "versions": ""})
  monkeypatch.setattr(rollout, "run", lambda quick: rows)
  out = tmp_path / "B.md"
  out.write_text("# Benchmarks\n\n<!-- scenario:rollout -->\nCPU section\n"
                 "<!-- /scenario:rollout -->\n")
  assert bench_run.main(["--only", "rollout", "--output", str(out)]) == 0
  doc = out.read_text()
  assert "CPU section" in doc and "<!-- scenario:rollout-gpu -->" in doc
  assert "## rollout-gpu" in doc and rollout.NOTES.strip()[:40] not in doc

