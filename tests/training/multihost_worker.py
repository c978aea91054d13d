"""One process of `test_multihost.py`: trains the host-verified task on fake CPU devices.

    python tests/training/multihost_worker.py SPEC.json

SPEC holds: devices (fake CPU devices of this process), num_processes, process_id, port,
model_dir, train_file, workdir, out, and optionally overrides (config
fields over the defaults below). With num_processes > 1 the process joins the others
through `config.distributed` (coordinator 127.0.0.1:port). It writes to `out` what it
saw and did: process index and count, its device counts and its share of the work
(prompts read, responses decoded and verified).
"""

import json
import os
import sys
import time


def main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  # Before jax is imported: this process's fake devices.
  os.environ["XLA_FLAGS"] = " ".join(
      [f"--xla_force_host_platform_device_count={spec['devices']}"]
      + [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")])
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("EGPO_JAX_COMPILATION_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  from egpo_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import default  # pylint: disable=g-import-not-at-top

  overrides = {
      "model.preset": "hf", "model.path": spec["model_dir"], "task.name": "jsonl",
      "task.train_file": spec["train_file"], "task.reward": "synthetic",
      "task.template": "plain", "task.max_prompt_len": 24, "rollout.prompts_per_batch": 4,
      "rollout.group_size": 4, "rollout.max_new_tokens": 6, "warmup.steps": 0,
      "train.iterations": 2, "train.iterations_per_call": 1, "train.checkpoint_every": 2,
      "train.tensorboard": False, "mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 1,
      "distributed.timeout_s": 60}
  overrides.update(spec.get("overrides", {}))
  if spec["num_processes"] > 1:
    overrides.update({
        "distributed.coordinator_address": f"127.0.0.1:{spec['port']}",
        "distributed.num_processes": spec["num_processes"],
        "distributed.process_id": spec["process_id"]})
  c = config_lib.with_overrides(default.get_config(), overrides)
  t0 = time.perf_counter()
  summary = train_lib.train(c, spec["workdir"], progress=False)
  with open(spec["out"], "w") as f:
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
               "device_count": jax.device_count(),
               "local_device_count": jax.local_device_count(),
               "share": summary["process_share"],
               "train_seconds": time.perf_counter() - t0}, f)


if __name__ == "__main__":
  main(sys.argv[1])
