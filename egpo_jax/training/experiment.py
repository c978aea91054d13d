"""What a training job is made of, derived from its config: the model, tokenizer, task and
settings (`build`), the RL optimizer (`rl_optimizer`), the starting train state
(`initial_state`), and, for a finished run, its saved train state (`read_train_state`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from egpo_jax.evaluation import loading
from egpo_jax.models import hf_io, transformer
from egpo_jax.models.config import ModelConfig
from egpo_jax.training import checkpointing
from egpo_jax.training import config as config_lib
from egpo_jax.training import distributed, iteration, tasks
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import TrainState

log = logging.getLogger(__name__)

BYTE_SPECIAL_TOKENS = loading.BYTE_SPECIAL_TOKENS


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything static that the job derives from the config."""
  model_config: ModelConfig
  tokenizer: Any
  task: iteration.JaxTask | None   # None: a host-verified task (`tasks.JsonlTask`)
  settings: iteration.IterationSettings
  algo: iteration.AlgoArrays

  @property
  def jitted(self) -> bool:
    return self.task is not None


def build(c: ml_collections.ConfigDict) -> Experiment:
  """The model, tokenizer, task and settings of config `c` (checked; `train` has already
  checked that its input files exist, readers of a finished run do not need them)."""
  c = config_lib.checked(c, inputs_exist=False)
  model_config, tokenizer = loading.model_spec(c.model)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise config_lib.ConfigError(
        f"config.model: the model's vocabulary ({model_config.vocab_size}) is smaller than "
        f"the tokenizer's ({tokenizer.vocab_size})")
  task = tasks.synthetic_task(c) if c.task.name == "synthetic" else None
  delimiter = tuple(tokenizer.encode(c.algo.segment_delimiter))
  settings = config_lib.iteration_settings(c, eos_ids=tokenizer.eos_ids,
                                           pad_id=tokenizer.pad_id, delimiter_ids=delimiter)
  algo = iteration.AlgoArrays.create(c.algo.variant, lam_min=c.algo.lam_min,
                                     lam_max=c.algo.lam_max)
  return Experiment(model_config, tokenizer, task, settings, algo)


def continuous_spec(c: ml_collections.ConfigDict, sampling) -> Any:
  """Host mode's continuous-batching spec (`sampling.continuous.ContinuousSpec`) from
  config.rollout (slots, decode_attention, read_block, table_entries), None when
  rollout.slots is 0. The one builder: `train.host_rollout` runs and the dry run compiles
  what it returns."""
  from egpo_jax.sampling import continuous
  r = c.rollout
  slots = int(r.get("slots", 0))
  if not slots:
    return None
  return continuous.ContinuousSpec(sampling=sampling, slots=slots,
                                   decode_attention=r.get("decode_attention", "bounded"),
                                   attention_block=int(r.get("read_block", 64)),
                                   table_entries=int(r.get("table_entries", 0)))


def rl_optimizer(c: ml_collections.ConfigDict, total: int):
  """The RL optimizer of config `c` for a run of `total` iterations (its schedule length;
  `optim.warmup_steps` is the learning-rate warm-up, in optimizer steps)."""
  return make_optimizer(lr=c.optim.lr, schedule=c.optim.schedule,
                        warmup_steps=c.optim.warmup_steps,
                        total_steps=max(1, total * c.ppo.epochs * c.ppo.minibatches),
                        weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2,
                        grad_clip=c.optim.grad_clip,
                        moment_dtype=c.optim.get("moment_dtype", "float32"))


def initial_params(c: ml_collections.ConfigDict, exp: Experiment, key: jax.Array,
                   mesh: jax.sharding.Mesh):
  """The policy before any training: the Hugging Face checkpoint of `model.path`, or
  random weights from `key` (a named preset, or model.name's shapes for a dry run)."""
  if loading.loads_hf_checkpoint(c.model):
    return hf_io.load_hf_params(c.model.path, exp.model_config, mesh=mesh)
  if c.model.preset == "hf":
    log.warning("model.path is empty: %s's shapes with random weights (a dry run, not "
                "fine-tuning)", c.model.name)
  return transformer.init_params(exp.model_config, key)


def on_mesh(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """The train state placed on the mesh: params and AdamW moments sharded alike."""
  return distributed.put(state, distributed.state_shardings(state, mesh))


def fresh_state(params, optimizer, mesh: jax.sharding.Mesh) -> TrainState:
  """A train state at step 0 with `optimizer`'s initial state, on the mesh."""
  return on_mesh(TrainState.create(params, optimizer.init(params)), mesh)


def saved_tree(state: TrainState, rng: jax.Array, ref_params: Any) -> dict[str, Any]:
  """The pytree a checkpoint holds: the train state, the RL key and, with a KL term, the
  reference policy's params."""
  return {"train": state, "rng": rng, **({"ref": ref_params} if ref_params is not None else {})}


def read_train_state(workdir: str, c: ml_collections.ConfigDict | None = None,
                     step: int | None = None) -> tuple[int, TrainState, dict[str, Any]]:
  """(step, train state, extra) of a run's checkpoint (the newest step folder, or `step`),
  read-only, onto this process's first device whatever mesh and process count wrote it.

  The config defaults to the run's own `config.json`. A damaged step is an error naming
  the other steps (`checkpointing.read_step`); nothing in the workdir is changed.
  """
  if c is None:
    with open(os.path.join(workdir, "config.json")) as f:
      c = ml_collections.ConfigDict(json.load(f))
  exp = build(c)
  params = jax.eval_shape(lambda: transformer.init_params(exp.model_config,
                                                          jax.random.PRNGKey(0)))
  opt = rl_optimizer(c, int(c.train.iterations))
  ref = params if c.loss.kl_coef else None
  abstract = jax.eval_shape(lambda p, r: saved_tree(TrainState.create(p, opt.init(p)),
                                                    jax.random.PRNGKey(0), r), params, ref)
  abstract = checkpointing.on_first_device(abstract)
  step, (tree, extra) = checkpointing.read_step(
      os.path.join(workdir, "checkpoints"), step,
      lambda path: checkpointing.read_state(path, abstract))
  return step, tree["train"], extra
