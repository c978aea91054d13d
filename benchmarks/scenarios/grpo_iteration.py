"""One full GRPO iteration of egpo_jax (rollout + reward + one optimizer step), seconds per
iteration, with its phases and EGPO's calibration cost at the same shapes.

Workload (`benchmarks.peers.spec.Workload`, the one TRL and Tunix run in
`benchmarks.peers.compare`): 8 prompts x 8 samples, 16-token prompts, exactly 64 new
tokens (EOS disabled, temperature 1), reward 1 if the completion contains token 7 else 0,
GRPO advantages, token-mean clipped surrogate (clip 0.2), no KL, one AdamW step. Models:
the shared random Qwen2 safetensors (`benchmarks.peers.model`), "tiny" (107k params) and
"small" (22.8M). The iteration is `training.iteration.run_iterations` with one iteration
per call, jitted whole (the jnp verifier runs inside); "rollout" and "update" are its
phases jitted alone. GFLOP/s counts the matmul FLOPs of the phase (rollout as in the
rollout scenario; update = forward + backward over prompt + response, attention as run,
plus the chunked head's recompute), next to the jnp.dot rate (1024^3 float32 calls, 8192^3
on an accelerator, timed round-robin with the rows); "x FLOP floor" is the time over FLOPs
/ dot rate, so "% of dot" is the model FLOPs utilisation against the measured peak. The
rollout phase's "GB/s" and "x bandwidth floor" are as in the rollout scenario (bytes it
must move; in-place copy rate, timed alike). The FLOPs are the workload's, as the peers
run it: egpo_jax's update runs each prompt once per group (`ppo.share_prompts`), about 17%
fewer FLOPs than counted here. "EGPO calibration" is the entropy proxy (Eq. 5) + weights
(Eqs. 6-9) + triage (Eq. 10) minus GRPO's advantage, timed alone on the iteration's
shapes, as a fraction of the GRPO iteration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.peers import spec
from benchmarks.scenarios import calibration, rollout
from egpo_jax.models import config as model_config
from egpo_jax.models import hf_io
from egpo_jax.sampling import engine
from egpo_jax.training import iteration
from egpo_jax.training import optimizer as optimizer_lib
from egpo_jax.training import update as update_lib
from egpo_jax.types import TrainState

NOTES = """No GPU was lent to this session: CPU times on 2 cores of an Intel Xeon
(earlier runs: an AMD EPYC, whose 1024^3 dot ran at 80-180 GFLOP/s against 170-280 here);
the machine's speed drifts by 10-20% between minutes, hence the round-robin dot rate. The
whole-iteration row is one jitted call; its phases are separate jitted calls, so they add
up to about the iteration (the iteration also verifies and computes advantages, which the
calibration row shows to be microseconds). EGPO's calibration is far below the 1% target.
--quick keeps tiny at the full workload and shrinks small's. Comparisons with TRL and
Tunix on the same workload and weights are in the "peers" section; where the update's time
goes is in its notes."""


def update_flops(config: model_config.ModelConfig, n: int, prompt_len: int,
                 new_tokens: int) -> float:
  """Matmul FLOPs of one optimizer step over n responses: forward + backward (2x) over
  prompt + response with full L x L attention scores (as run), and the log-prob head
  on the response positions run 4 times (forward, recompute, two backward matmuls)."""
  d, q = config.hidden_size, config.num_heads * config.head_size
  length = prompt_len + new_tokens
  per_token = 2 * harness.matmul_params(config)
  attention = 2 * 2 * config.num_layers * q * length * length
  head = 2 * d * config.vocab_size
  return n * (3 * (length * per_token + attention) + 4 * new_tokens * head)


def iteration_flops(config, w: spec.Workload) -> dict[str, float]:
  roll = rollout.rollout_flops(config, w.num_prompts, w.group_size, w.prompt_len,
                               w.new_tokens)
  upd = update_flops(config, w.num_responses, w.prompt_len, w.new_tokens)
  return {"rollout": roll, "update": upd, "iteration": roll + upd}


def _task(prompt_ids_BxP: jax.Array, target_id: int) -> iteration.JaxTask:
  """Fixed prompts; correct iff the completion contains `target_id` (spec.Workload)."""
  def sample_prompts(rng, batch_size):
    del rng
    ids = prompt_ids_BxP[:batch_size]
    return ids, jnp.ones_like(ids, bool), jnp.zeros((batch_size,), jnp.int32)

  def verify(ids_NxT, mask_NxT, answers_N):
    del answers_N
    return ((ids_NxT == target_id) & mask_NxT.astype(bool)).any(-1)

  return iteration.JaxTask(sample_prompts, verify)


def load_model(name: str) -> tuple[dict, model_config.ModelConfig]:
  """The shared safetensors of `name` (written on first use)."""
  from benchmarks.peers import model as peer_model
  path = peer_model.ensure_models((name,))[name]
  return hf_io.load_hf_checkpoint(path)


def build(name: str, w: spec.Workload, *, advantage: str = "grpo"
          ) -> tuple[dict[str, Callable[[], Any]], model_config.ModelConfig]:
  """Zero-argument callables for the iteration and its parts, on the shared weights.

  "iteration" advances its own train state on every call, as training does.
  """
  params, config = load_model(name)
  prompt_ids = jnp.asarray(w.prompt_ids(), jnp.int32)
  prompt_mask = jnp.ones_like(prompt_ids, bool)
  settings = iteration.IterationSettings(
      prompts_per_batch=w.num_prompts,
      sampling=engine.SamplingSpec(group_size=w.group_size, max_new_tokens=w.new_tokens,
                                   eos_ids=(), pad_id=w.pad_id, temperature=w.temperature),
      update=update_lib.UpdateSettings(eps_low=w.clip_eps, eps_high=w.clip_eps,
                                       aggregation="token-mean", kl_coef=0.0),
      advantage=advantage, reward_correct=1.0, reward_wrong=0.0)
  optimizer = optimizer_lib.make_optimizer(lr=w.learning_rate, grad_clip=1.0)
  algo = iteration.AlgoArrays.create()
  task = _task(prompt_ids, w.target_id)

  run = jax.jit(functools.partial(iteration.run_iterations, num_iterations=1, task=task,
                                  model_config=config, optimizer=optimizer,
                                  settings=settings), donate_argnums=(0,))
  # The iteration donates its state: give it its own copy of the weights.
  own = jax.tree.map(jnp.copy, params)
  carry = [TrainState.create(own, optimizer.init(own)), jax.random.key(w.seed)]

  def one_iteration():
    carry[0], carry[1], metrics = run(carry[0], carry[1], algo)
    return metrics["loss"]

  rollout_fn = jax.jit(functools.partial(engine.rollout, config=config,
                                         spec=settings.sampling))
  rng = jax.random.key(w.seed + 1)
  arange_b = jnp.arange(w.num_prompts)
  gen = rollout_fn(params, prompt_ids, prompt_mask, rng, arange_b)
  correct_n = task.verify(gen.completion_ids_NxT, gen.completion_mask_NxT, None)
  groups = iteration.group_batch(prompt_ids, prompt_mask, gen, correct_n, settings)

  @jax.jit
  def update_fn(state, groups):
    batch, _ = iteration.prepare_batch(state.params, None, groups, algo,
                                       model_config=config, settings=settings)
    return update_lib.update(state, batch, rng, optimizer=optimizer, model_config=config,
                             settings=settings.update, group_size=w.group_size)[0].params

  fixed_state = TrainState.create(params, optimizer.init(params))
  logps, mask = gen.logps_NxT, gen.completion_mask_NxT
  fns = {
      "iteration": one_iteration,
      "rollout": lambda: rollout_fn(params, prompt_ids, prompt_mask, rng, arange_b),
      "update": lambda: update_fn(fixed_state, groups),
      "grpo advantage": lambda: calibration._grpo(groups.rewards, groups.correct),
      "egpo advantage": lambda: calibration._egpo(groups.rewards, groups.correct, logps,
                                                  mask),
  }
  return fns, config


def _model_rows(name: str, w: spec.Workload, repeats: int) -> list[harness.Row]:
  fns, config = build(name, w)
  egpo_fns, _ = build(name, w, advantage="egpo")
  tag = f"{name}: "
  base = tag + "GRPO iteration (rollout + reward + update)"
  dots, dot_flops = harness.matmul_calls()
  copies, copy_bytes = harness.copy_calls()
  rows = harness.alternate_rows({
      base: fns["iteration"],
      tag + "EGPO iteration": egpo_fns["iteration"],
      tag + "rollout phase": fns["rollout"],
      tag + "update phase": fns["update"],
      "dot": dots,
      "copy": copies,
  }, warmup=2, repeats=repeats)
  gbps = copy_bytes / rows.pop().seconds / 1e9
  gflops = dot_flops / rows.pop().seconds / 1e9
  calib = harness.alternate_rows({"grpo": fns["grpo advantage"],
                                  "egpo": fns["egpo advantage"]}, warmup=3, repeats=50)
  flops = iteration_flops(config, w)
  for r, key in zip(rows, ("iteration", "iteration", "rollout", "update")):
    r.baseline = base
    r.extra["GFLOP"] = round(flops[key] / 1e9, 2)
    r.extra["GFLOP/s"] = round(flops[key] / r.seconds / 1e9, 2)
    r.extra["% of dot"] = round(100 * flops[key] / r.seconds / 1e9 / gflops, 1)
    r.extra["x FLOP floor"] = round(r.seconds * gflops * 1e9 / flops[key], 2)
  rows[1].baseline, rows[1].ratio = base, "fraction"
  rows[2].extra["new tokens/s"] = round(w.num_responses * w.new_tokens / rows[2].seconds)
  moved = rollout.rollout_bytes(config, w.num_prompts, w.group_size, w.prompt_len,
                                w.new_tokens)
  rows[2].extra["GB/s"] = round(moved / rows[2].seconds / 1e9, 2)
  rows[2].extra["x bandwidth floor"] = round(rows[2].seconds * gbps * 1e9 / moved, 2)
  calib_s = max(calib[1].seconds - calib[0].seconds, 0.0)
  rows.append(harness.Row(name=tag + "EGPO calibration (EGPO - GRPO advantage)",
                          seconds=calib_s, baseline=base, ratio="fraction",
                          times=calib[1].times,
                          extra={"GRPO advantage ms": round(1e3 * calib[0].seconds, 4)}))
  for r in rows[2:]:
    r.ratio = "fraction"
  rows.append(harness.Row(name=f"{tag}jnp.dot rate ({harness.dot_size()}^3 float32, timed "
                          f"with the rows above): {gflops:.1f} GFLOP/s; copy rate: "
                          f"{gbps:.1f} GB/s", seconds=None))
  return rows


def run(quick: bool) -> list[harness.Row]:
  rows = []
  # --quick keeps tiny at the full workload (about a second per iteration) and shrinks
  # only the small model's.
  for name in ("tiny", "small"):
    w = spec.workload(quick and name == "small")
    rows += _model_rows(name, w, repeats=3 if quick else (9 if name == "tiny" else 3))
    rows.append(harness.Row(name=f"{name}: B={w.num_prompts} G={w.group_size} "
                            f"P={w.prompt_len} T={w.new_tokens}", seconds=None))
  return rows
