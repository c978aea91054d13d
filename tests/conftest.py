"""Test-wide setup: 8 fake CPU devices, the persistent compilation cache, hypothesis profiles,
and a bound on the compiled code a test worker keeps mapped.

The persistent cache is opt-in (EGPO_JAX_COMPILATION_CACHE=folder): faster reruns on a
developer's machine; a cold one saved a fresh run of the suite ~10%.

XLA_FLAGS must be set before jax is imported anywhere, which is why this happens at the top
of the root conftest (subprocess tests inherit them). Single-device tests use device 0;
multi-device tests use all 8. The suite compiles at LLVM optimisation level 0: its tiny
models make it compile-bound (28% less time on two test files), and what it checks is
decided before LLVM (HLO passes, sharding, buffer assignment); float rounding differs
from -O2, so a comparison must not compound it (test_update_buckets compares each update
from the same params). A flag already in XLA_FLAGS wins.
"""

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_CACHE = os.environ.get("EGPO_JAX_COMPILATION_CACHE")
if _CACHE:
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATA = os.environ.get(
    "EGPO_SHARED_DATA",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data_dir():
  """The paper's benchmarks as JSONL (read-only); skips where they are absent."""
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip(f"benchmark data not found at {path}; set EGPO_SHARED_DATA to its folder")
  return path


@pytest.fixture(scope="session")
def num_devices():
  n = jax.device_count()
  assert n == 8, f"tests expect 8 fake CPU devices, got {n}: XLA_FLAGS was set too late"
  return n


@pytest.fixture(scope="session")
def write_user_files():
  """write(root, num_problems) -> (model_dir, train_file): a tiny random Qwen2 saved as a
  Hugging Face folder with the byte tokenizer, and a synthetic-arithmetic training JSONL
  (the files a user brings to the host-verified trainer)."""
  import json  # pylint: disable=import-outside-toplevel

  from egpo_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from egpo_jax.models import hf_io, transformer  # pylint: disable=import-outside-toplevel
  from egpo_jax.models.byte_tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
  from egpo_jax.models.config import get_config  # pylint: disable=import-outside-toplevel

  def write(root, num_problems):
    model_dir = str(root / "model")
    cfg = get_config("tiny")
    hf_io.save_hf_checkpoint(transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg,
                             model_dir, dtype="float32")
    ByteTokenizer().save_hf(model_dir)
    train_file = root / "train.jsonl"
    with open(train_file, "w") as f:
      for rec in synthetic.host_problems(jax.random.PRNGKey(1), num_problems, difficulty=1):
        f.write(json.dumps({"problem": rec["problem"], "answer": rec["answer"]}) + "\n")
    return model_dir, str(train_file)
  return write


def _mapped_regions() -> tuple[int, int]:
  """(memory mappings of this process, the kernel's limit vm.max_map_count); (0, 1) where
  /proc does not tell (not Linux)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      used = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      return used, int(f.read())
  except OSError:
    return 0, 1


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
  """After each test file (its own fixtures already torn down), drops jax's compilation
  caches once the worker holds half of vm.max_map_count memory mappings.

  XLA:CPU keeps each compiled executable's machine code in mappings of its own (about 13
  for a small jit) and unmaps them only when the executable is freed; jax caches every
  executable for the life of the process. A worker of the full suite reached 48,000
  mappings, and at the kernel's default limit of 65,530 LLVM fails ("Cannot allocate
  memory") and XLA:CPU segfaults in `backend_compile` (reproduced by filling the map
  table): the worker crashes that failed CI late in the run. `jax.clear_caches()` frees
  them. Below the threshold nothing is cleared, so files keep sharing compiled functions.
  """
  yield
  used, limit = _mapped_regions()
  if used > limit // 2:
    jax.clear_caches()
    gc.collect()

