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
import numpy as np
import optax

from egpo_jax.core import logprobs as logprobs_lib
from egpo_jax.core import losses  # noqa: F401  (registers "ppo_clip")
from egpo_jax.core import registry
from egpo_jax.models import sharding, transformer
from egpo_jax.models.config import ModelConfig
from egpo_jax.sampling import engine
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
  # > 0: host mode trims each micro-batch to one of this many response-length buckets
  # (`bucketed_update`); the jitted loop, one static program, always pads (0).
  length_buckets: int = 0

  def __post_init__(self):
    for field in ("ppo_epochs", "minibatches", "micro_batches", "logprob_chunk"):
      if getattr(self, field) < 1:
        raise ValueError(f"update.{field}={getattr(self, field)} must be >= 1")
    if self.length_buckets < 0:
      raise ValueError(f"update.length_buckets={self.length_buckets} must be >= 0")


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
                group_size: int = 1, max_len: int | None = None):
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
      # The full response length T, also when the batch is trimmed to a length bucket.
      max_len=batch.completion_ids_NxT.shape[1] if max_len is None else max_len,
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


def epoch_order(key: jax.Array, lengths_N: jax.Array, *, minibatches: int,
                sort: bool) -> jax.Array:
  """One epoch's row order without shared prompts: a permutation of the N rows, each of
  its `minibatches` consecutive slices sorted longest first when `sort`."""
  perm = jax.random.permutation(key, lengths_N.shape[0])
  if sort:
    perm_MxR = perm.reshape(minibatches, -1)
    perm = jnp.take_along_axis(perm_MxR, jnp.argsort(-lengths_N[perm_MxR], axis=-1,
                                                     stable=True), -1).reshape(-1)
  return perm


def _responses_per_step(n: int, settings: UpdateSettings) -> int:
  """minibatches x micro_batches, checked to divide the batch's n responses."""
  per_step = settings.minibatches * settings.micro_batches
  if n % per_step:
    raise ValueError(f"{n} responses do not split into update.minibatches="
                     f"{settings.minibatches} x update.micro_batches={settings.micro_batches}"
                     "; make prompts_per_batch * group_size divisible by their product")
  return per_step


def check_master_params(params: Any, caller: str) -> None:
  """Refuses trained params narrower than float32 (the one check `update` and
  `bucketed_update` share)."""
  narrow = sorted({str(x.dtype) for x in jax.tree.leaves(params)
                   if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})
  if narrow:
    raise ValueError(f"{caller}: the trained params are {'/'.join(narrow)}; train float32 "
                     "master params (ModelConfig.param_dtype='float32', model.dtype sets the "
                     "compute dtype): at lr 1e-6 a bfloat16 param rounds every Adam step away")


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
  check_master_params(state.params, "update")
  n = batch.num_responses
  per_step = _responses_per_step(n, settings)
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
      # Longest first within each minibatch, folded into the one gather of the rows.
      perm = epoch_order(key, whole.completion_mask_NxT.sum(-1),
                         minibatches=settings.minibatches, sort=settings.sort_by_length)
    minis = _split(jax.tree.map(lambda x: x[perm], whole), settings.minibatches)
    step = lambda s, mb: minibatch_step(s, mb, optimizer=optimizer,
                                        model_config=model_config, settings=settings,
                                        switches=switches, group_size=group_size)
    return jax.lax.scan(step, state, minis)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, settings.ppo_epochs))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["padding_fraction"] = jnp.clip(1.0 - batch.completion_mask_NxT.mean(), 0.0, 1.0)
  return state, metrics


# ------------------------------------------------------------ length-bucketed update

def length_buckets(max_len: int, count: int) -> tuple[int, ...]:
  """`count` response lengths, evenly spaced up to max_len: ceil(max_len * k / count)."""
  if count < 1 or max_len < 1:
    raise ValueError(f"length_buckets: update.length_buckets={count} and max_len={max_len} "
                     "must be >= 1")
  return tuple(sorted({-(-max_len * k // count) for k in range(1, count + 1)}))


def _bucket_of(length: int, buckets: tuple[int, ...]) -> int:
  return next(b for b in buckets if b >= max(length, 1))


_BUCKET_TRACES: dict[str, int] = {}


def bucket_compilation_counts() -> dict[str, int]:
  """How often `bucketed_update`'s jitted pieces were traced, by name and shape."""
  return dict(_BUCKET_TRACES)


@functools.partial(jax.jit, static_argnames=("prompt_len", "length"))
def _take_rows(batch: RolloutBatch, rows_R: jax.Array, *, prompt_len: int, length: int
               ) -> RolloutBatch:
  """Rows `rows_R` of the batch, prompts cut to their last prompt_len columns (left
  padding) and responses to their first `length` (right padding)."""
  key = f"take[R={rows_R.shape[0]},P={prompt_len},T={length}]"
  _BUCKET_TRACES[key] = _BUCKET_TRACES.get(key, 0) + 1
  p = batch.prompt_ids_NxP.shape[1]
  take = lambda x, cut: (None if x is None else cut(x[rows_R]))
  prompt = lambda x: x[:, p - prompt_len:]
  resp = lambda x: x[:, :length]
  return RolloutBatch(
      prompt_ids_NxP=take(batch.prompt_ids_NxP, prompt),
      prompt_mask_NxP=take(batch.prompt_mask_NxP, prompt),
      completion_ids_NxT=take(batch.completion_ids_NxT, resp),
      completion_mask_NxT=take(batch.completion_mask_NxT, resp),
      old_logps_NxT=take(batch.old_logps_NxT, resp), adv_N=batch.adv_N[rows_R],
      ref_logps_NxT=take(batch.ref_logps_NxT, resp),
      is_weights_NxT=take(batch.is_weights_NxT, resp))


@functools.partial(jax.jit, static_argnames=("model_config", "settings", "max_len"),
                   donate_argnames=("acc",))
def _accumulate(params, acc, micro: RolloutBatch, num_tokens, num_seqs, switches, *,
                model_config, settings, max_len):
  """acc + (loss, aux, grads) of one trimmed micro-batch (compiled once per shape)."""
  key = (f"grad[R={micro.completion_ids_NxT.shape[0]},P={micro.prompt_ids_NxP.shape[1]},"
         f"T={micro.completion_ids_NxT.shape[1]}]")
  _BUCKET_TRACES[key] = _BUCKET_TRACES.get(key, 0) + 1
  micro = jax.tree.map(
      lambda x: sharding.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1)), micro)
  (loss, aux), grads = jax.value_and_grad(_micro_loss, has_aux=True)(
      params, micro, num_tokens, num_seqs, model_config=model_config, settings=settings,
      switches=switches, max_len=max_len)
  return jax.tree.map(jnp.add, acc, (loss, aux, grads))


def _apply(state, grads, loss, *, optimizer):
  _BUCKET_TRACES["apply"] = _BUCKET_TRACES.get("apply", 0) + 1
  return apply_gradients(state, grads, loss, optimizer)


_apply_jit = jax.jit(_apply, static_argnames=("optimizer",))
# For states this module made (or the caller gave up): updated in place.
_apply_donated = jax.jit(_apply, static_argnames=("optimizer",), donate_argnames=("state",))


@jax.jit
def _lengths(mask_NxT):
  return mask_NxT.sum(-1).astype(jnp.int32)


@jax.jit
def _minibatch_counts(mask_NxT, rows_M):
  """Eq. 4's normalisers over the minibatch's rows (all its micro-batches)."""
  mask = mask_NxT[rows_M].astype(jnp.float32)
  return (jnp.maximum(mask.sum(), 1.0),
          jnp.maximum((mask.sum(-1) > 0).sum().astype(jnp.float32), 1.0))


_epoch_order = jax.jit(epoch_order, static_argnames=("minibatches", "sort"))


@functools.partial(jax.jit, static_argnames=("model_config", "settings", "max_len"))
def _zero_acc(params, micro, switches, *, model_config, settings, max_len):
  """Zeros shaped like (loss, aux, grads) of `_micro_loss` (traced once per shape)."""
  one = jnp.ones((), jnp.float32)
  (loss, aux), grads = jax.eval_shape(
      lambda p: jax.value_and_grad(_micro_loss, has_aux=True)(
          p, micro, one, one, model_config=model_config, settings=settings,
          switches=switches, max_len=max_len), params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, aux, grads))


def _loss_settings(settings: UpdateSettings) -> UpdateSettings:
  """The settings the micro-batch gradient reads (the batch split is the driver's), so
  that its compilations do not depend on minibatches or micro_batches."""
  return dataclasses.replace(settings, ppo_epochs=1, minibatches=1, micro_batches=1)


def _prompt_columns(prompt_mask_NxP, prompt_bucket_min: int) -> int:
  longest = int(np.asarray(prompt_mask_NxP).astype(bool).sum(1).max())
  return min(prompt_mask_NxP.shape[1], engine.bucket_length(longest, prompt_bucket_min))


def compile_bucketed_update(state: TrainState, batch: RolloutBatch, *,
                            optimizer: optax.GradientTransformation,
                            model_config: ModelConfig, settings: UpdateSettings,
                            switches: LossSwitches | None = None,
                            length_buckets_count: int = 8, prompt_bucket_min: int = 16,
                            prompt_len: int | None = None) -> int:
  """Compiles (ahead of time, from shapes) every piece `bucketed_update` may run on a
  batch of this shape: one gradient per length bucket. Returns how many gradient shapes.

  So that a first iteration (or a benchmark) does not compile mid-run; prompt_len: the
  prompt columns to compile for (default: this batch's prompt bucket).
  """
  n, total_len = batch.completion_ids_NxT.shape
  rows_mb = n // settings.minibatches
  rows_micro = rows_mb // settings.micro_batches
  if prompt_len is None:
    prompt_len = _prompt_columns(batch.prompt_mask_NxP, prompt_bucket_min)
  switches = switches or LossSwitches()
  loss_settings = _loss_settings(settings)
  lengths_N = jax.ShapeDtypeStruct((n,), jnp.int32)
  _epoch_order.lower(jax.random.PRNGKey(0), lengths_N, minibatches=settings.minibatches,
                     sort=settings.sort_by_length).compile()
  mask_NxT = jax.ShapeDtypeStruct((n, total_len), batch.completion_mask_NxT.dtype)
  _lengths.lower(mask_NxT).compile()
  _minibatch_counts.lower(mask_NxT, jax.ShapeDtypeStruct((rows_mb,), jnp.int32)).compile()
  rows_R = jax.ShapeDtypeStruct((rows_micro,), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  grads = None
  for length in length_buckets(total_len, length_buckets_count):
    _take_rows.lower(batch, rows_R, prompt_len=prompt_len, length=length).compile()
    micro = jax.eval_shape(functools.partial(_take_rows, prompt_len=prompt_len,
                                             length=length), batch, rows_R)
    acc = jax.eval_shape(lambda p, b, c: jax.value_and_grad(_micro_loss, has_aux=True)(
        p, b, c, c, model_config=model_config, settings=loss_settings,
        switches=switches, max_len=total_len), state.params, micro, scalar)
    acc = (acc[0][0], acc[0][1], acc[1])
    _accumulate.lower(state.params, acc, micro, scalar, scalar, switches,
                      model_config=model_config, settings=loss_settings,
                      max_len=total_len).compile()
    # The first micro-batch of a minibatch may be in any bucket.
    _zero_acc.lower(state.params, micro, switches, model_config=model_config,
                    settings=loss_settings, max_len=total_len).compile()
    grads = acc
  for apply in (_apply_jit, _apply_donated):
    apply.lower(state, grads[2], grads[0], optimizer=optimizer).compile()
  return len(length_buckets(total_len, length_buckets_count))


def bucketed_update(state: TrainState, batch: RolloutBatch, rng: jax.Array, *,
                    optimizer: optax.GradientTransformation, model_config: ModelConfig,
                    settings: UpdateSettings, switches: LossSwitches | None = None,
                    length_buckets_count: int = 8, prompt_bucket_min: int = 16,
                    donate: bool = False) -> tuple[TrainState, dict[str, float]]:
  """`update` with each micro-batch trimmed to a length bucket (host-driven, not jittable).

  The same epochs, permutation, longest-first order within each minibatch
  (settings.sort_by_length) and micro-batches as `update` with shared prompts off, and
  the same loss (Eq. 4's token sums normalised by the whole minibatch's counts, Dr.GRPO's
  constant max_len = T): only the padding differs. Each micro-batch keeps the response
  columns up to the smallest of `length_buckets(T, length_buckets_count)` that holds its
  longest response, and the prompt columns of the batch's power-of-two prompt bucket;
  every trimmed shape is one compilation (`bucket_compilation_counts`), so the number of
  compilations is at most the bucket count, whatever the length histogram. Sorting is
  what makes buckets pay: the micro-batches of a minibatch hold responses of similar
  length (with sort_by_length off, each is cut to its own longest response, still exact).

  Shared prompts (`response_hidden`, one prompt pass per group) are off here: a length
  order breaks groups apart, and running a group's prompt once would force its responses
  into one micro-batch at the longest one's bucket. Padded positions are masked, so the
  result equals `update`'s up to float rounding (the trimmed matmuls sum in another
  order): loss and gradients within ~1e-5 relative on float32 (tests/training).

  donate: the caller's `state` may be updated in place (its buffers are then invalid).
  Returns (state, metrics): metrics as `update`'s (means over optimizer steps), with
  padding_fraction the padded share of the response slots actually computed.
  """
  check_master_params(state.params, "bucketed_update")
  n = batch.num_responses
  per_step = _responses_per_step(n, settings)
  total_len = batch.completion_ids_NxT.shape[1]
  buckets = length_buckets(total_len, length_buckets_count)
  prompt_len = _prompt_columns(batch.prompt_mask_NxP, prompt_bucket_min)
  lengths_N = _lengths(batch.completion_mask_NxT)
  lengths_host = np.asarray(lengths_N)
  switches = switches or LossSwitches()
  loss_settings = _loss_settings(settings)
  rows_mb = n // settings.minibatches
  rows_micro = rows_mb // settings.micro_batches
  valid, computed = 0, 0
  step_metrics = []
  for key in jax.random.split(rng, settings.ppo_epochs):
    perm = np.asarray(_epoch_order(key, lengths_N, minibatches=settings.minibatches,
                                   sort=settings.sort_by_length))
    for m in range(settings.minibatches):
      rows = perm[m * rows_mb:(m + 1) * rows_mb]
      num_tokens, num_seqs = _minibatch_counts(batch.completion_mask_NxT,
                                               np.asarray(rows, np.int32))
      acc = None
      for j in range(settings.micro_batches):
        micro_rows = rows[j * rows_micro:(j + 1) * rows_micro]
        length = _bucket_of(int(lengths_host[micro_rows].max()), buckets)
        valid += int(lengths_host[micro_rows].sum())
        computed += length * len(micro_rows)
        micro = _take_rows(batch, jnp.asarray(micro_rows, jnp.int32), prompt_len=prompt_len,
                           length=length)
        if acc is None:
          acc = _zero_acc(state.params, micro, switches, model_config=model_config,
                          settings=loss_settings, max_len=total_len)
        acc = _accumulate(state.params, acc, micro, num_tokens, num_seqs, switches,
                          model_config=model_config, settings=loss_settings,
                          max_len=total_len)
      loss, aux, grads = acc
      apply = _apply_donated if donate or step_metrics else _apply_jit
      state, opt_metrics = apply(state, grads, loss, optimizer=optimizer)
      step_metrics.append({"loss": loss, **aux, **opt_metrics})
  metrics = {k: float(np.mean([jax.device_get(s[k]) for s in step_metrics]))
             for k in step_metrics[0]}
  metrics["padding_fraction"] = 1.0 - valid / max(computed, 1)
  metrics["padding_fraction_untrimmed"] = float(1.0 - lengths_host.sum() / (n * total_len))
  return state, metrics
