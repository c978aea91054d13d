"""The GPU check script's FLOP count by hand, and its CPU smoke run end to end."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from egpo_jax.models import config as model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_update_flops_by_hand():
  # tiny: D 64, 2 layers, 4 heads / 2 kv heads of 16, MLP 128, V 512.
  config = model_config.get_config("tiny")
  layer_weights = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128      # q, k, v, o, MLP
  rows, group, p, t = 4, 2, 8, 24
  tokens = 2 * 8 + 4 * 24                                              # prompts once
  pairs = 2 * (8 * 9 / 2) + 4 * (24 * 8 + 24 * 25 / 2)                 # causal contexts
  forward = (2 * 2 * layer_weights * tokens + 2 * 512 * 64 * 4 * 24
             + 4 * 64 * pairs * 2)
  got = gpu_check.update_flops(config, rows=rows, group_size=group, prompt_len=p,
                               response_len=t)
  assert got == pytest.approx(3 * forward, rel=1e-12)


def test_markdown_row_reports_out_of_memory_as_a_result():
  record = {"device": "NVIDIA H100", "model": "qwen2.5-math-1.5b", "rows": 16,
            "prompt_len": 1024, "response_len": 3072, "matmul_tflops": 700.0,
            "error": "out of memory: RESOURCE_EXHAUSTED", "dry_run_estimate_bytes": 4e10}
  row = gpu_check.markdown_row(record)
  assert row.count("|") == len(gpu_check.COLUMNS) + 1
  assert "out of memory" in row and "| 40.0 |" in row


@pytest.mark.slow
def test_smoke_run_on_cpu_prints_a_json_line_and_a_row():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if os.environ.get("EGPO_JAX_COMPILATION_CACHE"):   # the suite's cache, as conftest sets it
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["EGPO_JAX_COMPILATION_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  record = json.loads(lines[-3])
  assert record["model"] == "tiny" and record["rows"] == 4
  assert record["seconds"] > 0 and 0 < record["mfu"]
  assert record["dry_run_estimate_bytes"] == record["compiled_estimate_bytes"] > 0
  assert lines[-1].startswith("| cpu | tiny | 4 x 32 |")


def test_decode_check_smoke_rows():
  """`--decode --smoke` in process: three rows, the bounded reads fewer own slots than
  "full", both equal to it to rounding (pallas interpreted on CPU, its time unreported
  as a speed)."""
  records = {r["decode_attention"]: r
             for r in gpu_check.decode_attention_check(**gpu_check.DECODE_SMOKE)}
  assert set(records) == {"full", "bounded", "pallas"}
  assert not any("error" in r for r in records.values())
  full = records["full"]["own_slots_read_per_row"]
  assert records["bounded"]["own_slots_read_per_row"] == records["pallas"][
      "own_slots_read_per_row"] < full == 32
  assert records["pallas"]["max_abs_diff_vs_full"] < 1e-5
  assert records["bounded"]["max_abs_diff_vs_full"] < 1e-5
  assert "meaningless" in records["pallas"]["note"]
