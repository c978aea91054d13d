"""The policy update: per-token log-probs of the responses, the clipped surrogate, and a
`lax.scan` over PPO epochs x minibatches with gradient accumulation over micro-batches.

Token-mean (and seq-mean) normalisation always uses the counts of the whole minibatch,
so one update with 1 or k micro-batches is the same update. Passes over a whole batch
without gradients (old or reference log-probs) run in micro-batches too
(`batch_logprobs`), so no pass ever holds the activations of more rows than one
micro-batch.

Under a mesh (`jax.set_mesh`), every micro-batch is split over the batch axes (data x
fsdp): the scan runs over micro-batches on all devices at once, each device computing
its rows of each (`_split`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from egpo_jax.core import logprobs as logprobs_lib
from egpo_jax.core import losses  # noqa: F401  (registers "ppo_clip")
from egpo_jax.core import registry
from egpo_jax.models import sharding, transformer
from egpo_jax.models.config import ModelConfig
from egpo_jax.training.optimizer import apply_gradients
from egpo_jax.types import RolloutBatch, TrainState


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
  """Static settings of the update (hashable, so they can be jit static arguments)."""
  ppo_epochs: int = 1
  minibatches: int = 1
  micro_batches: int = 1
  temperature: float = 1.0
  eps_low: float = 0.2
  eps_high: float = 0.2
  dual_clip: float | None = None
  aggregation: str = "token-mean"
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  logprob_chunk: int = 1024
  loss: str = "ppo_clip"   # a name in egpo_jax.core.registry.policy_losses
  # The loss's own hyperparameters ((name, value) pairs), from config.loss by name.
  loss_hparams: tuple[tuple[str, Any], ...] = ()
  sort_by_length: bool = True
  # Run each prompt once per micro-batch for its G responses (`transformer.response_hidden`)
  # when `update` is given group_size > 1 and micro-batches hold whole groups.
  share_prompts: bool = True

  def __post_init__(self):
    for field in ("ppo_epochs", "minibatches", "micro_batches", "logprob_chunk"):
      if getattr(self, field) < 1:
        raise ValueError(f"update.{field}={getattr(self, field)} must be >= 1")


class LossSwitches(NamedTuple):
  """Per-run (traced) overrides of the loss, so that runs of DAPO (clip-higher) and
  Dr.GRPO (its aggregation) vmap with the others; None keeps `UpdateSettings`.

  Attributes:
    eps_high: float32 upper ratio clip, replacing settings.eps_high.
    seq_sum_norm: bool; True aggregates with "seq-mean-token-sum-norm" (Dr.GRPO),
      False with settings.aggregation. Both losses are computed and one is selected.
  """
  eps_high: jax.Array | None = None
  seq_sum_norm: jax.Array | None = None


def response_logprobs(params: Any, prompt_ids_NxP: jax.Array, prompt_mask_NxP: jax.Array,
                      completion_ids_NxT: jax.Array, completion_mask_NxT: jax.Array, *,
                      model_config: ModelConfig, temperature: float = 1.0,
                      chunk_size: int = 1024, group_size: int = 1) -> jax.Array:
  """log softmax(logits / temperature) of each completion token, teacher-forced (float32).

  The hidden state at position P-1+t predicts completion token t; logits are computed in
  chunks from the hidden states, so [N, T, V] float32 logits never exist at once. With
  group_size G > 1, rows b*G .. b*G+G-1 must share their prompt, which then runs once
  (`transformer.response_hidden`): the same values up to float rounding.
  """
  chex.assert_rank([prompt_ids_NxP, completion_ids_NxT], 2)
  if group_size > 1:
    hidden_NxTxD = transformer.response_hidden(
        params, prompt_ids_NxP[::group_size], prompt_mask_NxP[::group_size],
        completion_ids_NxT, completion_mask_NxT, config=model_config)
  else:
    p, t = prompt_ids_NxP.shape[1], completion_ids_NxT.shape[1]
    ids = jnp.concatenate([prompt_ids_NxP, completion_ids_NxT], axis=1)
    mask = jnp.concatenate([prompt_mask_NxP.astype(bool), completion_mask_NxT.astype(bool)],
                           1)
    hidden = transformer.forward(params, ids, mask, config=model_config, return_hidden=True)
    hidden_NxTxD = hidden[:, p - 1:p - 1 + t]
  return logprobs_lib.token_logprobs(
      hidden_NxTxD, transformer.output_embedding(params, model_config), completion_ids_NxT,
      temperature=temperature, chunk_size=chunk_size)


def _micro_loss(params, batch: RolloutBatch, num_tokens, num_seqs, *, model_config,
                settings: UpdateSettings, switches: LossSwitches | None = None,
                group_size: int = 1):
  logps = response_logprobs(params, batch.prompt_ids_NxP, batch.prompt_mask_NxP,
                            batch.completion_ids_NxT, batch.completion_mask_NxT,
                            model_config=model_config, temperature=settings.temperature,
                            chunk_size=settings.logprob_chunk, group_size=group_size)
  switches = switches or LossSwitches()
  # Each keyword reaches the loss only if its signature declares it (`registry.call`).
  loss_fn = functools.partial(
      registry.call, registry.policy_losses.get(settings.loss),
      logps, batch.old_logps_NxT, batch.adv_N, batch.completion_mask_NxT,
      eps_low=settings.eps_low,
      eps_high=settings.eps_high if switches.eps_high is None else switches.eps_high,
      dual_clip=settings.dual_clip, num_tokens=num_tokens, num_seqs=num_seqs,
      max_len=batch.completion_ids_NxT.shape[1],
      ref_logps_NxT=batch.ref_logps_NxT if settings.kl_coef else None,
      kl_coef=settings.kl_coef, kl_estimator=settings.kl_estimator,
      is_weights_NxT=batch.is_weights_NxT, **dict(settings.loss_hparams))
  if switches.seq_sum_norm is None:
    return loss_fn(agg=settings.aggregation)
  # A select, not a branch: the unselected loss contributes an exact zero gradient.
  return jax.tree.map(lambda norm, base: jnp.where(switches.seq_sum_norm, norm, base),
                      loss_fn(agg="seq-mean-token-sum-norm"),
                      loss_fn(agg=settings.aggregation))


def _split(tree: Any, parts: int) -> Any:
  """[rows, ...] -> [parts, rows / parts, ...]: contiguous micro-batches (groups and a
  length order stay together), each split over the batch axes under a mesh.

  The scan axis (parts) stays unsplit: were it to take the batch sharding, as a plain
  reshape of a row-sharded batch gives it, every device would compute every row of a
  micro-batch. Moving the rows costs one exchange of the (small) integer/float batch.
  """
  def one(x):
    x = x.reshape((parts, x.shape[0] // parts) + x.shape[1:])
    return sharding.constrain(x, ("micro_batches", "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(one, tree)


def batch_logprobs(params: Any, prompt_ids_NxP: jax.Array, prompt_mask_NxP: jax.Array,
                   completion_ids_NxT: jax.Array, completion_mask_NxT: jax.Array, *,
                   model_config: ModelConfig, micro_batches: int, temperature: float = 1.0,
                   chunk_size: int = 1024, group_size: int = 1) -> jax.Array:
  """`response_logprobs` of all N rows, in `micro_batches` sequential passes (lax.map).

  For passes without gradients over a whole batch (old log-probs, Eq. 4's pi_old, and the
  reference policy's): one pass over N rows would hold N rows' activations at once
  (attention scores grow with rows x length^2). Rows b*G .. b*G+G-1 share their prompt
  (group_size G) as in `response_logprobs`; a micro-batch that would cut a group runs
  without sharing. Returns float32 [N, T], stop-gradient.
  """
  chex.assert_rank([prompt_ids_NxP, prompt_mask_NxP, completion_ids_NxT,
                    completion_mask_NxT], 2)
  n = completion_ids_NxT.shape[0]
  if micro_batches < 1 or n % micro_batches:
    raise ValueError(f"batch_logprobs: {n} rows do not split into micro_batches="
                     f"{micro_batches}; use a divisor of the rows (update.micro_batches)")
  if (n // micro_batches) % group_size:
    group_size = 1
  fn = functools.partial(response_logprobs, params, model_config=model_config,
                         temperature=temperature, chunk_size=chunk_size,
                         group_size=group_size)
  rows = _split((prompt_ids_NxP, prompt_mask_NxP, completion_ids_NxT, completion_mask_NxT),
                micro_batches)
  logps = jax.lax.map(lambda mb: fn(*mb), rows)
  return jax.lax.stop_gradient(logps.reshape(completion_ids_NxT.shape))


def minibatch_step(state: TrainState, minibatch: RolloutBatch, *,
                   optimizer: optax.GradientTransformation, model_config: ModelConfig,
                   settings: UpdateSettings, switches: LossSwitches | None = None,
                   group_size: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a minibatch, its gradient accumulated over micro-batches.

  group_size > 1: each micro-batch holds whole groups, rows b*G+g (see `update`).
  """
  mask = minibatch.completion_mask_NxT.astype(jnp.float32)
  num_tokens = jnp.maximum(mask.sum(), 1.0)
  num_seqs = jnp.maximum((mask.sum(-1) > 0).sum().astype(jnp.float32), 1.0)
  grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

  def micro(carry, mb):
    loss_acc, grad_acc = carry
    (loss, aux), grads = grad_fn(state.params, mb, num_tokens, num_seqs,
                                 model_config=model_config, settings=settings,
                                 switches=switches, group_size=group_size)
    return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), aux

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (loss, grads), aux = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                    _split(minibatch, settings.micro_batches))
  # policy_loss normalises its token means by the minibatch's counts: sums are the means.
  aux = jax.tree.map(lambda a: a.sum(0), aux)
  state, opt_metrics = apply_gradients(state, grads, loss, optimizer)
  return state, {"loss": loss, **aux, **opt_metrics}


def update(state: TrainState, batch: RolloutBatch, rng: jax.Array, *,
           optimizer: optax.GradientTransformation, model_config: ModelConfig,
           settings: UpdateSettings, switches: LossSwitches | None = None,
           group_size: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """PPO epochs x minibatches as one `lax.scan`; returns metrics averaged over steps.

  `switches` are per-run traced overrides of the loss (`LossSwitches`).

  Each epoch shuffles the responses; within a minibatch they are ordered by length so
  that micro-batches hold responses of similar length (`padding_fraction` reports the
  share of padded response slots).

  group_size: G when the batch's rows are b*G+g, G responses to each prompt. With
  settings.share_prompts and micro-batches of whole groups (rows per micro-batch a
  multiple of G), epochs shuffle whole groups, keep each group's rows together (no
  length sort), and each prompt runs once per micro-batch instead of G times
  (`response_logprobs`).
  """
  narrow = sorted({str(x.dtype) for x in jax.tree.leaves(state.params)
                   if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})
  if narrow:
    raise ValueError(f"update: the trained params are {'/'.join(narrow)}; train float32 "
                     "master params (ModelConfig.param_dtype='float32', model.dtype sets the "
                     "compute dtype): at lr 1e-6 a bfloat16 param rounds every Adam step away")
  n = batch.num_responses
  per_step = settings.minibatches * settings.micro_batches
  if n % per_step:
    raise ValueError(f"{n} responses do not split into update.minibatches="
                     f"{settings.minibatches} x update.micro_batches={settings.micro_batches}"
                     "; make prompts_per_batch * group_size divisible by their product")
  share = (settings.share_prompts and group_size > 1 and (n // per_step) % group_size == 0)
  group_size = group_size if share else 1

  # The shuffle gathers rows from every device: all-gather the (integer and per-token
  # float) batch once, rather than let GSPMD all-reduce a masked gather per field.
  whole = jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), batch)

  def epoch(state, key):
    if share:
      # A permutation of the groups, each group's rows kept in order.
      groups = jax.random.permutation(key, n // group_size)
      perm = (groups[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
    else:
      perm = jax.random.permutation(key, n)
      if settings.sort_by_length:
        # Longest first within each minibatch, folded into the one gather of the rows.
        perm_MxR = perm.reshape(settings.minibatches, -1)
        lengths_MxR = whole.completion_mask_NxT.sum(-1)[perm_MxR]
        perm = jnp.take_along_axis(perm_MxR, jnp.argsort(-lengths_MxR, axis=-1,
                                                         stable=True), -1).reshape(-1)
    minis = _split(jax.tree.map(lambda x: x[perm], whole), settings.minibatches)
    step = lambda s, mb: minibatch_step(s, mb, optimizer=optimizer,
                                        model_config=model_config, settings=settings,
                                        switches=switches, group_size=group_size)
    return jax.lax.scan(step, state, minis)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, settings.ppo_epochs))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["padding_fraction"] = jnp.clip(1.0 - batch.completion_mask_NxT.mean(), 0.0, 1.0)
  return state, metrics
