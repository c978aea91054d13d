"""Config validation and conversion: the only place that reads the ml_collections config.

Everything past this module takes plain arguments or frozen settings dataclasses.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from egpo_jax.core import registry
from egpo_jax.sampling import engine
from egpo_jax.training import iteration, update

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")
SEGMENTS = ("joint", "thinking", "answer")


class ConfigError(ValueError):
  """A config field has a value the trainer cannot use; the message names the field."""


def _need(cond: bool, field: str, value: Any, fix: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: {fix}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks every field the trainer reads, with messages that name the field and the fix."""
  r, a, lo, u, o, t = c.rollout, c.algo, c.loss, c.ppo, c.optim, c.train
  _need(c.task.name in ("synthetic", "jsonl"), "task.name", c.task.name,
        "use 'synthetic' (jnp task, jitted loop) or 'jsonl' (host-verified math problems)")
  _need(c.model.preset != "hf" or bool(c.model.path), "model.path", c.model.path,
        "model.preset='hf' needs the Hugging Face checkpoint folder")
  _need(c.warmup.steps == 0 or c.task.name == "synthetic", "warmup.steps", c.warmup.steps,
        "the supervised warm-up uses the synthetic task's worked solutions; set it to 0")
  _need(r.prompts_per_batch >= 1, "rollout.prompts_per_batch", r.prompts_per_batch, "use >= 1")
  _need(r.group_size >= 2, "rollout.group_size", r.group_size,
        "group statistics need at least 2 responses per prompt")
  _need(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "use >= 1")
  _need(r.temperature >= 0, "rollout.temperature", r.temperature, "use >= 0 (0 = greedy)")
  _need(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "use a value in (0, 1]")
  _need(r.top_k >= 0, "rollout.top_k", r.top_k, "use >= 0 (0 = off)")
  _need(r.cache_phases >= 1, "rollout.cache_phases", r.cache_phases,
        "use >= 1 (1 = one decode loop on the whole cache)")
  _need(r.shared_prompt_min_len >= 0, "rollout.shared_prompt_min_len",
        r.shared_prompt_min_len, "use >= 0 (0 = always share the prompt's cache slots)")
  _need(a.advantage in registry.advantage_estimators, "algo.advantage", a.advantage,
        f"use one of {registry.advantage_estimators.names()}")
  _need(0 < a.lam_min <= 1 <= a.lam_max, "algo.lam_min/lam_max", (a.lam_min, a.lam_max),
        "EGPO needs 0 < lam_min <= 1 <= lam_max (Eq. 8)")
  _need(a.entropy_segment in SEGMENTS, "algo.entropy_segment", a.entropy_segment,
        f"use one of {SEGMENTS}")
  _need(lo.name in registry.policy_losses, "loss.name", lo.name,
        f"use one of {registry.policy_losses.names()}")
  _need(lo.aggregation in AGGREGATIONS, "loss.aggregation", lo.aggregation,
        f"use one of {AGGREGATIONS}")
  _need(lo.eps_low >= 0 and lo.eps_high >= 0, "loss.eps_low/eps_high",
        (lo.eps_low, lo.eps_high), "clip ranges must be >= 0")
  _need(lo.old_logps in ("sampler", "recompute"), "loss.old_logps", lo.old_logps,
        "use 'sampler' or 'recompute'")
  _need(lo.kl_coef >= 0, "loss.kl_coef", lo.kl_coef, "use >= 0 (0 = no KL term)")
  _need(lo.kl_estimator in ("k1", "k2", "k3"), "loss.kl_estimator", lo.kl_estimator,
        "use k1, k2 or k3")
  n = r.prompts_per_batch * r.group_size
  _need(n % (u.minibatches * u.micro_batches) == 0, "ppo.minibatches/micro_batches",
        (u.minibatches, u.micro_batches),
        f"prompts_per_batch * group_size = {n} must divide into minibatches x micro_batches")
  _need(u.epochs >= 1, "ppo.epochs", u.epochs, "use >= 1")
  _need(o.lr > 0, "optim.lr", o.lr, "use a positive learning rate")
  _need(t.iterations >= 0, "train.iterations", t.iterations, "use >= 0")
  _need(t.iterations_per_call >= 1, "train.iterations_per_call", t.iterations_per_call,
        "use >= 1")
  _need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "use >= 1")
  _need(c.dynamic_sampling.oversample >= 1, "dynamic_sampling.oversample",
        c.dynamic_sampling.oversample, "use >= 1")
  if "mesh" in c:
    sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    _need(all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes)
          and sizes.count(-1) <= 1, "mesh (data, fsdp, tensor)", sizes,
          "use positive sizes, at most one of them -1 (= the remaining devices)")
  if "distributed" in c:
    d = c.distributed
    _need(d.mode in ("auto", "on", "off"), "distributed.mode", d.mode,
          "use 'auto' (join when num_processes > 1), 'on' or 'off'")
    _need(d.num_processes >= 0, "distributed.num_processes", d.num_processes,
          "use >= 1, or 0 to read $EGPO_NUM_PROCESSES")
    _need(d.process_id >= -1, "distributed.process_id", d.process_id,
          "use an id in [0, num_processes), or -1 to read $EGPO_PROCESS_ID")
    _need(d.timeout_s > 0, "distributed.timeout_s", d.timeout_s, "use a positive timeout")


def update_settings(c: ml_collections.ConfigDict) -> update.UpdateSettings:
  return update.UpdateSettings(
      ppo_epochs=c.ppo.epochs, minibatches=c.ppo.minibatches,
      micro_batches=c.ppo.micro_batches,
      temperature=c.rollout.temperature if c.rollout.temperature > 0 else 1.0,
      eps_low=c.loss.eps_low, eps_high=c.loss.eps_high,
      dual_clip=c.loss.dual_clip if c.loss.dual_clip > 0 else None,
      aggregation=c.loss.aggregation, kl_coef=c.loss.kl_coef,
      kl_estimator=c.loss.kl_estimator, logprob_chunk=c.loss.logprob_chunk,
      loss=c.loss.name, share_prompts=c.ppo.share_prompts)


def iteration_settings(c: ml_collections.ConfigDict, *, eos_ids: tuple[int, ...], pad_id: int,
                       delimiter_ids: tuple[int, ...] | None) -> iteration.IterationSettings:
  spec = engine.SamplingSpec(
      group_size=c.rollout.group_size, max_new_tokens=c.rollout.max_new_tokens,
      eos_ids=tuple(eos_ids), pad_id=pad_id, temperature=c.rollout.temperature,
      top_k=c.rollout.top_k, top_p=c.rollout.top_p, cache_phases=c.rollout.cache_phases,
      shared_prompt_min_len=c.rollout.shared_prompt_min_len,
      return_entropy=c.algo.advantage == "edge_grpo")
  oversample = c.dynamic_sampling.oversample if c.dynamic_sampling.enabled else 1
  return iteration.IterationSettings(
      prompts_per_batch=c.rollout.prompts_per_batch, sampling=spec,
      update=update_settings(c), advantage=c.algo.advantage, eps_h=c.algo.eps_h,
      nsr_advantage=c.algo.nsr_advantage, ddof=c.algo.ddof, std_eps=c.algo.std_eps,
      edge_clamp=tuple(c.algo.edge_clamp) if c.algo.edge_clamp else None,
      entropy_segment=c.algo.entropy_segment,
      segment_delimiter=delimiter_ids if c.algo.entropy_segment != "joint" else None,
      overlong_buffer=c.loss.overlong_buffer, mask_truncated=c.loss.mask_truncated,
      dynamic_sampling_oversample=oversample, old_logps=c.loss.old_logps,
      tis_cap=c.loss.tis_cap)


def with_overrides(c: ml_collections.ConfigDict, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  """A copy of `c` with dotted-path overrides, e.g. {"optim.lr": 1e-4}; unknown fields
  raise, naming the path (as command-line overrides do)."""
  c = ml_collections.ConfigDict(c.to_dict())
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      if p not in node:
        raise ConfigError(f"config.{key}: there is no field {p!r} here")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"config.{key}: there is no field {leaf!r} here")
    node[leaf] = value
  return c
