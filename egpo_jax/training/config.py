"""Config validation and conversion: the only place that reads the ml_collections config.

Everything past this module takes plain arguments or frozen settings dataclasses.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import ml_collections

from egpo_jax.core import registry
from egpo_jax.data import synthetic
from egpo_jax.models import config as model_config_lib
from egpo_jax.sampling import engine
from egpo_jax.training import config_domains as domains
from egpo_jax.training import iteration, update

class ConfigError(ValueError):
  """A config field has a value the trainer cannot use; the message names the field."""


def _need(cond: bool, field: str, value: Any, fix: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: {fix}")


def _leaves(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'train.iterations': 100, ...}: the config's fields by dotted name."""
  out = {}
  for k, v in c.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_leaves(v, name + "."))
    else:
      out[name] = v
  return out


# Config sections whose extra fields may be the chosen registered function's own
# hyperparameters: section -> (the field naming the function, its registry).
_HPARAM_SECTIONS = {"algo": ("advantage", registry.advantage_estimators),
                    "loss": ("name", registry.policy_losses),
                    "task": ("reward", registry.reward_functions)}


def _own_hparams(c: ml_collections.ConfigDict, section: str | None = None
                 ) -> dict[str, Any]:
  """{'algo.adv_scale': 3.0, ...}: fields without a domain row that the chosen estimator,
  loss or reward function declares as a parameter (`registry.hyperparameters`); they
  pass to it by name."""
  out = {}
  for sec, (field, reg) in _HPARAM_SECTIONS.items():
    node = c.get(sec)
    if (section not in (None, sec) or node is None or not isinstance(node.get(field), str)
        or node.get(field) not in reg):
      continue
    declared = registry.hyperparameters(reg.get(node[field]))
    out.update({f"{sec}.{k}": v for k, v in node.items()
                if f"{sec}.{k}" not in domains.BY_NAME and k in declared})
  return out


def hparam_pairs(c: ml_collections.ConfigDict, section: str) -> tuple[tuple[str, Any], ...]:
  """`_own_hparams` of one section as hashable (name, value) pairs, for static settings."""
  return tuple(sorted((k.partition(".")[2], tuple(v) if isinstance(v, list) else v)
                      for k, v in _own_hparams(c, section).items()))


def unknown_field_error(name: str) -> ConfigError:
  near = difflib.get_close_matches(name, domains.BY_NAME, n=1, cutoff=0.6)
  hint = f"did you mean {near[0]}? " if near else ""
  return ConfigError(f"config.{name}: there is no such field; {hint}"
                     "docs/CONFIG.md lists every field")


def validate(c: ml_collections.ConfigDict, *, inputs_exist: bool = True) -> None:
  """Checks every field against its domain (config_domains.FIELDS) and the rules that tie
  fields together; the first problem raises a one-line ConfigError naming the field, the
  value and the fix. Reads nothing but the config and, for model.preset='hf', the
  checkpoint's config.json; writes nothing.

  `inputs_exist=False` skips the existence of the training inputs (task.train_file, ...):
  a tool that reads a finished run's config.json does not need them."""
  leaves = _leaves(c)
  for name in leaves:
    if name not in domains.BY_NAME and name not in _own_hparams(c):
      raise unknown_field_error(name)
  for f in domains.FIELDS:
    if f.name not in leaves:
      _need(f.optional, f.name, "<missing>", f"add it (default {f.default!r})")
      continue
    value = leaves[f.name]
    ok = (f.domain.ok(value) if inputs_exist or f.domain.input_kind is None
          else isinstance(value, str))
    _need(ok, f.name, value, f"{f.fix} (domain: {f.domain.text})")
  _validate_across(c)


def _validate_across(c: ml_collections.ConfigDict) -> None:
  """The rules of docs/CONFIG.md's "Checks across fields"."""
  m, r, u = c.model, c.rollout, c.ppo
  if m.preset == domains.HF_PRESET:
    _need(bool(m.path) or bool(m.name), "model.path", m.path,
          "model.preset='hf' needs the Hugging Face checkpoint folder (or model.name for "
          "its shapes with random weights)")
    if m.path and m.name and os.path.isdir(m.path):
      _check_shapes(m.name, model_config_lib.load_hf_config(m.path))
  elif m.name:
    _need(model_config_lib.get_config(m.name) == model_config_lib.get_config(m.preset),
          "model.name", m.name, f"it names another model than model.preset={m.preset!r}; "
          "set it to '' or to the preset")
  if c.task.name == "jsonl":
    _need(bool(c.task.train_file), "task.train_file", c.task.train_file,
          "task.name='jsonl' needs the training JSONL, e.g. "
          "--config.task.train_file=/data/train.jsonl")
  _need(c.warmup.steps == 0 or c.task.name == "synthetic", "warmup.steps", c.warmup.steps,
        "the supervised warm-up uses the synthetic task's worked solutions; set it to 0")
  if c.task.name == "synthetic":
    need = synthetic.max_prompt_len(c.task.difficulty)
    _need(c.task.max_prompt_len >= need, "task.max_prompt_len", c.task.max_prompt_len,
          f"task.difficulty={c.task.difficulty} has prompts of up to {need} tokens; use >= {need}")
    need = synthetic.max_response_len(c.task.difficulty)
    _need(c.warmup.steps == 0 or r.max_new_tokens >= need, "rollout.max_new_tokens",
          r.max_new_tokens, f"the warm-up's worked solutions of task.difficulty="
          f"{c.task.difficulty} take up to {need} tokens; use >= {need} or warmup.steps=0")
  for field, value in (("rollout.slots", r.get("slots", 0)),
                       ("ppo.length_buckets", u.get("length_buckets", 0))):
    _need(not value or c.task.name != "synthetic", field, value,
          "continuous batching and the length-bucketed update run in host mode only "
          "(task.name='jsonl'); set it to 0")
  _need(not r.get("tensor", 0) or c.task.name != "synthetic", "rollout.tensor",
        r.get("tensor", 0), "the rollout's own mesh is host mode's (task.name='jsonl'); "
        "set it to 0")
  _need(not c.task.get("max_new_tokens_field") or r.get("slots", 0) > 0,
        "task.max_new_tokens_field", c.task.get("max_new_tokens_field"),
        "per-record response caps need continuous batching: set rollout.slots > 0 (the "
        "static sampler decodes every row to rollout.max_new_tokens), or the field to ''")
  n = r.prompts_per_batch * r.group_size
  _need(n % (u.minibatches * u.micro_batches) == 0, "ppo.minibatches/micro_batches",
        (u.minibatches, u.micro_batches),
        f"prompts_per_batch * group_size = {n} must divide into minibatches x micro_batches")
  if "mesh" in c:
    sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    _need(sizes.count(-1) <= 1, "mesh (data, fsdp, tensor)", sizes,
          "use positive sizes, at most one of them -1 (= the remaining devices)")
  if "distributed" in c:
    d = c.distributed
    _need(d.num_processes == 0 or d.process_id < d.num_processes, "distributed.process_id",
          d.process_id, f"use an id in [0, {d.num_processes}), or -1 to read $EGPO_PROCESS_ID")


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_size", "tie_word_embeddings")


def _check_shapes(name: str, loaded: model_config_lib.ModelConfig) -> None:
  """model.name against the checkpoint it is meant to describe (a wrong folder is caught
  before any weights are read)."""
  named = model_config_lib.get_config(name)
  diff = [f"{k} {getattr(loaded, k)} != {getattr(named, k)}" for k in _SHAPE_FIELDS
          if getattr(loaded, k) != getattr(named, k)]
  _need(not diff, "model.name", name, "model.path's config.json is not this model ("
        + ", ".join(diff) + "); fix model.path or model.name")


def checked(c: ml_collections.ConfigDict, *, inputs_exist: bool = True
            ) -> ml_collections.ConfigDict:
  """`validate(c)`, then a copy with every missing optional field at its default (so the
  code past this point reads each field directly)."""
  validate(c, inputs_exist=inputs_exist)
  out = ml_collections.ConfigDict(c.to_dict())
  for f in domains.FIELDS:
    section, _, leaf = f.name.rpartition(".")
    node = out
    for p in filter(None, section.split(".")):
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    if leaf not in node:
      node[leaf] = f.default
  return out


def update_settings(c: ml_collections.ConfigDict) -> update.UpdateSettings:
  return update.UpdateSettings(
      ppo_epochs=c.ppo.epochs, minibatches=c.ppo.minibatches,
      micro_batches=c.ppo.micro_batches,
      temperature=c.rollout.temperature if c.rollout.temperature > 0 else 1.0,
      eps_low=c.loss.eps_low, eps_high=c.loss.eps_high,
      dual_clip=c.loss.dual_clip if c.loss.dual_clip > 0 else None,
      aggregation=c.loss.aggregation, kl_coef=c.loss.kl_coef,
      kl_estimator=c.loss.kl_estimator, logprob_chunk=c.loss.logprob_chunk,
      loss=c.loss.name, share_prompts=c.ppo.share_prompts,
      loss_hparams=hparam_pairs(c, "loss"),
      length_buckets=c.ppo.get("length_buckets", 0))


def iteration_settings(c: ml_collections.ConfigDict, *, eos_ids: tuple[int, ...], pad_id: int,
                       delimiter_ids: tuple[int, ...] | None) -> iteration.IterationSettings:
  spec = engine.SamplingSpec(
      group_size=c.rollout.group_size, max_new_tokens=c.rollout.max_new_tokens,
      eos_ids=tuple(eos_ids) + tuple(c.rollout.get("stop_token_ids", ())),
      pad_id=pad_id, temperature=c.rollout.temperature,
      top_k=c.rollout.top_k, top_p=c.rollout.top_p, cache_phases=c.rollout.cache_phases,
      shared_prompt_min_len=c.rollout.shared_prompt_min_len,
      return_entropy=iteration.needs_shannon(c.algo.advantage))
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
      tis_cap=c.loss.tis_cap, advantage_hparams=hparam_pairs(c, "algo"))


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
        raise unknown_field_error(key)
      node = node[p]
    if leaf not in node:
      raise unknown_field_error(key)
    node[leaf] = value
  return c
