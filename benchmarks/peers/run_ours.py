"""egpo_jax worker (the project's virtualenv; protocol in `spec`).

    python -m benchmarks.peers.run_ours --model tiny --scenario iteration

"iteration": one call of the jitted `run_iterations` (one GRPO iteration: rollout, jnp
reward, advantages, one AdamW step), built by `benchmarks.scenarios.grpo_iteration`;
its phases ("generation" = the rollout, "update" = old log-probs, advantages and the
optimizer step) are timed as separate jitted calls after each timed iteration, so they
do not add to its time. "rollout": `sampling.generate` (KV cache) for the B x G rows.
"""

from __future__ import annotations

import functools
import time

from benchmarks.peers import spec


def _time(fn) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  parser = spec.worker_parser(__doc__)
  args = parser.parse_args()

  import importlib.metadata as md

  import jax
  import jax.numpy as jnp

  from benchmarks.scenarios import grpo_iteration
  from egpo_jax import sampling

  w = spec.workload(args.quick)
  if args.scenario == "iteration":
    fns, _ = grpo_iteration.build(args.model, w)

    def run_once():
      seconds = _time(fns["iteration"])
      return seconds, {"generation": _time(fns["rollout"]), "update": _time(fns["update"])}

    def setup():
      for _ in range(2):
        run_once()
  else:
    params, config = grpo_iteration.load_model(args.model)
    prompt_ids = jnp.asarray(w.prompt_ids(), jnp.int32)
    generate = functools.partial(
        sampling.generate, params, prompt_ids, jnp.ones_like(prompt_ids), jax.random.key(0),
        config=config, group_size=w.group_size, max_new_tokens=w.new_tokens, eos_ids=(),
        temperature=w.temperature)

    def run_once():
      seconds = _time(generate)
      return seconds, {"generation": seconds}

    def setup():
      out = jax.device_get(generate())
      assert (out.lengths_N == w.new_tokens).all(), "not exactly new_tokens per row"
      run_once()

  info = {"system": "egpo_jax", "versions": {p: md.version(p) for p in ("jax", "flax",
                                                                        "optax")},
          "backend": jax.default_backend()}
  spec.serve(setup, run_once, info)


if __name__ == "__main__":
  main()
