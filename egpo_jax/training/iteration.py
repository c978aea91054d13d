"""One RL iteration as pure functions, readable as the algorithm:

    prompts -> rollout G responses each -> verify -> rewards -> entropy proxy (Eq. 5)
      -> advantages (GRPO family / EGPO, Eqs. 2, 6-11) -> update (Eq. 12) -> metrics

For a task whose prompt generator and verifier are jnp functions (`JaxTask`, e.g. the
synthetic arithmetic task), `rl_iteration` is one pure function of (state, rng, algo),
so K iterations run as one `lax.scan` inside jit (`run_iterations`), and that can be
vmapped over seeds or over calibration variants given as arrays (`AlgoArrays`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from egpo_jax.core import advantages as adv_lib
from egpo_jax.core import diagnostics
from egpo_jax.core import entropy as entropy_lib
from egpo_jax.core import losses
from egpo_jax.core import registry
from egpo_jax.models.config import ModelConfig
from egpo_jax.sampling import engine
from egpo_jax.training import update as update_lib
from egpo_jax.types import RolloutBatch, TrainState


class JaxTask(NamedTuple):
  """A verifiable task written in jnp, so whole iterations run inside jit.

  sample_prompts(rng, batch_size) -> (prompt_ids_BxP int32 left-padded, prompt_mask_BxP
  bool, answers_B...): a pytree of per-prompt answers whose leading axis is B.
  verify(completion_ids_NxT, completion_mask_NxT, answers_N) -> correct_N bool.
  """
  sample_prompts: Callable[..., tuple[jax.Array, jax.Array, Any]]
  verify: Callable[[jax.Array, jax.Array, Any], jax.Array]


def estimator_codes() -> tuple[str, ...]:
  """The estimators an `AlgoArrays.estimator` code selects: every registered one that is
  expressible as arrays (`host_only_estimators` lists the others and why), in
  registration order, so registering one more never renumbers the others."""
  return tuple(n for n in registry.advantage_estimators.in_order()
               if _array_reason(registry.advantage_estimators.get(n)) is None)


def host_only_estimators() -> dict[str, str]:
  """{name: why}: registered estimators that do not trace under jit, so the vmapped
  ablation cannot select them (the host-mode trainer still can)."""
  out = {}
  for name in registry.advantage_estimators.in_order():
    why = _array_reason(registry.advantage_estimators.get(name))
    if why is not None:
      out[name] = why
  return out


@functools.lru_cache(maxsize=None)
def _array_reason(fn: Callable) -> str | None:
  """None when `fn` traces on abstract [2, 2] inputs (its hyperparameters at their
  defaults), else the first line of the error."""
  f32, b = jax.ShapeDtypeStruct((2, 2), jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.bool_)
  algo = AlgoArrays.create()
  try:
    out = jax.eval_shape(lambda r, c, v, e, s, a: registry.call(
        fn, r, correct_BxG=c, valid_BxG=v, entropy_BxG=e, shannon_BxG=s,
        variant=a.variant, nsr=a.nsr, calibrate=a.calibrate), f32, b, b, f32, f32, algo)
  except Exception as err:  # pylint: disable=broad-except
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
  if not isinstance(out, adv_lib.AdvantageOutput) or any(x.shape != (2, 2) for x in out):
    return "it does not return an AdvantageOutput of [B, G] arrays"
  return None


class AlgoArrays(NamedTuple):
  """The parts of the algorithm that may differ between vmapped runs, as arrays.

  With calibrate=False and nsr=False, EGPO's advantage is GRPO's, so GRPO, EGPO and the
  C1-C6 variants can share one compiled training loop. The optional switches below
  extend that to Dr.GRPO, DAPO and EDGE-GRPO; a switch left None keeps the behaviour of
  the static `IterationSettings` (so `create(...)` runs exactly as before):

    estimator: int32 index into `estimator_codes()`, the advantage of this run (all are
      computed and one is selected; "edge_grpo" needs SamplingSpec.return_entropy).
    eps_high: float32 upper ratio clip (DAPO's clip-higher: 0.28).
    seq_sum_norm: bool, Dr.GRPO's "seq-mean-token-sum-norm" loss aggregation instead of
      `settings.update.aggregation`.
    overlong: bool, DAPO's soft overlong penalty (needs settings.overlong_buffer > 0).
    dynamic_sampling: bool, DAPO's dynamic sampling. With
      settings.dynamic_sampling_oversample = k > 1 every run samples k * B prompts; a run
      with this switch keeps the first B mixed groups, the others the first B groups.
  """
  variant: adv_lib.EGPOVariant
  calibrate: jax.Array
  nsr: jax.Array
  estimator: jax.Array | None = None
  eps_high: jax.Array | None = None
  seq_sum_norm: jax.Array | None = None
  overlong: jax.Array | None = None
  dynamic_sampling: jax.Array | None = None

  @classmethod
  def create(cls, variant: str = "egpo", *, lam_min: float = 0.8, lam_max: float = 2.0,
             calibrate: bool = True, nsr: bool = True) -> "AlgoArrays":
    v = adv_lib.egpo_variant(variant, lam_min=lam_min, lam_max=lam_max)
    return cls(v, jnp.asarray(calibrate), jnp.asarray(nsr))

  @classmethod
  def create_switched(cls, variant: str = "egpo", *, estimator: str = "egpo",
                      lam_min: float = 0.8, lam_max: float = 2.0, calibrate: bool = True,
                      nsr: bool = True, eps_high: float = 0.2, seq_sum_norm: bool = False,
                      overlong: bool = False, dynamic_sampling: bool = False
                      ) -> "AlgoArrays":
    """Every switch set, so that runs of different algorithms stack and vmap together."""
    codes = estimator_codes()
    if estimator not in codes:
      why = host_only_estimators().get(estimator)
      raise ValueError(f"AlgoArrays.estimator={estimator!r}: " + (
          f"it does not trace as arrays ({why}); train it with the host loop" if why
          else f"use one of {list(codes)}"))
    if eps_high < 0:
      raise ValueError(f"AlgoArrays.eps_high={eps_high} must be >= 0")
    base = cls.create(variant, lam_min=lam_min, lam_max=lam_max, calibrate=calibrate,
                      nsr=nsr)
    return base._replace(
        estimator=jnp.int32(codes.index(estimator)),
        eps_high=jnp.float32(eps_high), seq_sum_norm=jnp.asarray(seq_sum_norm),
        overlong=jnp.asarray(overlong), dynamic_sampling=jnp.asarray(dynamic_sampling))

  def loss_switches(self) -> update_lib.LossSwitches | None:
    """The switches the update reads (None when neither is set)."""
    if self.eps_high is None and self.seq_sum_norm is None:
      return None
    return update_lib.LossSwitches(self.eps_high, self.seq_sum_norm)


# Where the old log-probs of the ratio come from (config loss.old_logps).
OLD_LOGPS = ("sampler", "recompute")


def needs_shannon(advantage: str) -> bool:
  """Whether the estimator was registered as requiring the sampler's Shannon entropy."""
  return "shannon_BxG" in registry.advantage_estimators.requires(advantage)


@dataclasses.dataclass(frozen=True)
class IterationSettings:
  """Static settings of one iteration (hashable jit arguments)."""
  prompts_per_batch: int
  sampling: engine.SamplingSpec
  update: update_lib.UpdateSettings
  advantage: str = "egpo"
  eps_h: float = 1e-5
  nsr_advantage: float = -1.0
  ddof: int = 1
  std_eps: float = 1e-6
  edge_clamp: tuple[float, float] | None = (0.5, 2.0)
  entropy_segment: str = "joint"
  segment_delimiter: tuple[int, ...] | None = None
  reward_correct: float = 1.0
  reward_wrong: float = -1.0
  overlong_buffer: int = 0
  mask_truncated: bool = False
  dynamic_sampling_oversample: int = 1
  old_logps: str = "sampler"
  tis_cap: float = 0.0
  # A registered estimator's own hyperparameters ((name, value) pairs: hashable), read
  # from config.algo under their parameter names (`registry.hyperparameters`).
  advantage_hparams: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.old_logps not in OLD_LOGPS:
      raise ValueError(f"loss.old_logps={self.old_logps!r}: use one of {list(OLD_LOGPS)}")
    if self.advantage not in registry.advantage_estimators:
      raise ValueError(f"algo.advantage={self.advantage!r} is not registered; known: "
                       f"{registry.advantage_estimators.names()}")
    if self.dynamic_sampling_oversample < 1:
      raise ValueError("dynamic_sampling.oversample must be >= 1")
    if needs_shannon(self.advantage) and not self.sampling.return_entropy:
      raise ValueError(f"algo.advantage={self.advantage!r} needs the sampler's Shannon "
                       "entropy: build the SamplingSpec with return_entropy=True")

  @property
  def group_size(self) -> int:
    return self.sampling.group_size


def compute_advantages(rewards_BxG, correct_BxG, valid_BxG, entropy_BxG, shannon_BxG,
                       algo: AlgoArrays, settings: IterationSettings
                       ) -> adv_lib.AdvantageOutput:
  """Calls the registered estimator with the inputs and hyperparameters it declares.

  With `algo.estimator` set, every estimator of `estimator_codes()` is evaluated (each is
  [B, G] arithmetic) and the run's is selected, so the choice can be traced.
  """
  inputs = {"correct_BxG": correct_BxG, "valid_BxG": valid_BxG, "entropy_BxG": entropy_BxG,
            "shannon_BxG": shannon_BxG, **estimator_hparams(algo, settings)}
  if algo.estimator is None:
    return registry.call(registry.advantage_estimators.get(settings.advantage), rewards_BxG,
                         **inputs)
  codes = estimator_codes()
  if shannon_BxG is None and any(map(needs_shannon, codes)):
    raise ValueError(f"AlgoArrays.estimator may select {[c for c in codes if needs_shannon(c)]}"
                     ", which need the sampler's Shannon entropy: build the SamplingSpec "
                     "with return_entropy=True")
  outs = [registry.call(registry.advantage_estimators.get(name), rewards_BxG, **inputs)
          for name in codes]
  return jax.tree.map(lambda *x: jnp.stack(x)[algo.estimator], *outs)


def estimator_hparams(algo: AlgoArrays, settings: IterationSettings) -> dict[str, Any]:
  """Every hyperparameter the trainer has for an estimator, by parameter name; each
  estimator receives those it declares. EGPO's calibration (variant, nsr, calibrate) is
  traced, from `algo`; `clamp` is config algo.edge_clamp (EDGE-GRPO's factor bounds)."""
  return {"variant": algo.variant, "nsr": algo.nsr, "calibrate": algo.calibrate,
          "eps_h": settings.eps_h, "nsr_advantage": settings.nsr_advantage,
          "ddof": settings.ddof, "std_eps": settings.std_eps, "clamp": settings.edge_clamp,
          **dict(settings.advantage_hparams)}


class GroupBatch(NamedTuple):
  """One iteration's responses in group layout (leading axes [B, G]) before advantages."""
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  gen: dict[str, jax.Array]
  correct: jax.Array
  rewards: jax.Array
  valid: jax.Array


def shaped_rewards(correct_N: jax.Array, lengths_N: jax.Array,
                   settings: IterationSettings, overlong: jax.Array | None = None,
                   caps_N: jax.Array | None = None) -> jax.Array:
  """+1/-1 by correctness (Eq. 1), plus DAPO's soft overlong penalty when enabled.

  `overlong` (a traced bool, `AlgoArrays.overlong`) switches the penalty off per run.
  `caps_N` (int [N]): each response's own cap (per-record caps), DAPO's L_max of that
  response (`losses.overlong_penalty`); None: every response's is T = max_new_tokens.
  """
  chex.assert_rank([correct_N, lengths_N], 1)
  rewards_N = jnp.where(correct_N, settings.reward_correct, settings.reward_wrong)
  if settings.overlong_buffer > 0:
    penalty_N = losses.overlong_penalty(
        lengths_N, max_len=settings.sampling.max_new_tokens if caps_N is None else caps_N,
        cache_len=settings.overlong_buffer)
    if overlong is not None:
      penalty_N = jnp.where(overlong, penalty_N, 0.0)
    rewards_N = rewards_N + penalty_N
  return rewards_N


def group_batch(prompt_ids_BxP, prompt_mask_BxP, gen: engine.Generation, correct_N,
                settings: IterationSettings, overlong: jax.Array | None = None,
                caps_N: jax.Array | None = None) -> GroupBatch:
  """Rewards and the [B, G] layout of a rollout (rows of `gen` are b * G + g).

  `caps_N`: the responses' own caps (the host loop's per-record caps; the jitted loop has
  none: T), which the overlong penalty measures each response against (`shaped_rewards`).
  """
  g = settings.group_size
  b = prompt_ids_BxP.shape[0]
  fields = _fields(gen)
  rewards_N = shaped_rewards(correct_N, fields["lengths_N"], settings, overlong, caps_N)
  return GroupBatch(
      prompt_ids=jnp.repeat(prompt_ids_BxP, g, 0).reshape(b, g, -1),
      prompt_mask=jnp.repeat(prompt_mask_BxP, g, 0).reshape(b, g, -1),
      gen=jax.tree.map(lambda x: x.reshape((b, g) + x.shape[1:]), fields),
      correct=correct_N.reshape(b, g), rewards=rewards_N.reshape(b, g),
      valid=jnp.ones((b, g), bool))


def select_mixed_groups(groups: GroupBatch, keep: int) -> tuple[GroupBatch, jax.Array]:
  """DAPO dynamic sampling in jit: the first `keep` mixed groups of an over-sampled batch.

  Slots that no mixed group could fill are marked invalid. Returns the fill rate too.
  """
  kept_B = losses.dynamic_sampling_filter(groups.correct, groups.valid).any(-1)
  idx_K, found_K = losses.select_groups(kept_B, keep)
  picked = jax.tree.map(lambda x: x[idx_K], groups)
  valid = picked.valid & found_K[:, None]
  return picked._replace(valid=valid), found_K.mean()


def prepare_batch(params, ref_params, groups: GroupBatch, algo: AlgoArrays, *,
                  model_config: ModelConfig, settings: IterationSettings
                  ) -> tuple[RolloutBatch, dict[str, jax.Array]]:
  """Old log-probs, entropy proxy (Eq. 5), advantages (Eqs. 2, 6-11) -> the update's batch.

  `ref_params` (a frozen reference policy) is only read when the KL coefficient is set.
  With `settings.mask_truncated` (DAPO's overlong filter) truncated responses, those that
  reached their cap without a stop token (T, or their record's own cap), are left out
  of the advantages and the loss.
  Trainer passes (old log-probs with `old_logps="recompute"` or TIS, reference
  log-probs) run in the update's micro-batches (`update.batch_logprobs`).
  """
  b, g = groups.correct.shape
  flat = jax.tree.map(lambda x: x.reshape((b * g,) + x.shape[2:]), groups._asdict())
  gen_n = flat["gen"]
  prompt_ids_NxP, prompt_mask_NxP = flat["prompt_ids"], flat["prompt_mask"]
  ids_NxT, mask_NxT = gen_n["completion_ids_NxT"], gen_n["completion_mask_NxT"]
  valid_BxG = groups.valid
  if settings.mask_truncated:
    # DAPO's overlong filter. A response cut at its record's own cap (no stop token
    # before it) is truncated as one cut at T is: unfinished, its verdict reflects the
    # cap, not the reasoning (the reward noise the filter removes).
    valid_BxG = valid_BxG & ~gen_n["truncated_N"].reshape(b, g)
  # Passes over the whole batch run in the update's micro-batches (same rows per pass).
  logprob_fn = functools.partial(
      update_lib.batch_logprobs, prompt_ids_NxP=prompt_ids_NxP,
      prompt_mask_NxP=prompt_mask_NxP, completion_ids_NxT=ids_NxT,
      completion_mask_NxT=mask_NxT, model_config=model_config,
      micro_batches=settings.update.minibatches * settings.update.micro_batches,
      temperature=settings.sampling.logp_temperature,
      chunk_size=settings.update.logprob_chunk,
      group_size=g if settings.update.share_prompts else 1)

  # Old log-probs: free from the sampler, or recomputed by the trainer's forward pass.
  sampler_logps_NxT = gen_n["logps_NxT"]
  need_trainer = settings.old_logps == "recompute" or settings.tis_cap > 0
  trainer_logps_NxT = logprob_fn(params) if need_trainer else sampler_logps_NxT
  old_logps_NxT = trainer_logps_NxT if settings.old_logps == "recompute" else sampler_logps_NxT
  maskf = mask_NxT.astype(jnp.float32)
  mismatch = (jnp.abs(trainer_logps_NxT - sampler_logps_NxT) * maskf).sum() / jnp.maximum(
      maskf.sum(), 1.0)
  is_weights_NxT = jnp.ones_like(sampler_logps_NxT)
  if settings.tis_cap > 0:
    is_weights_NxT = losses.truncated_is_weights(trainer_logps_NxT, sampler_logps_NxT,
                                                 cap=settings.tis_cap)
  ref_logps_NxT = jnp.zeros_like(old_logps_NxT)
  if settings.update.kl_coef:
    ref_logps_NxT = logprob_fn(ref_params)

  # Entropy proxy over the configured segment, with the whole-response fallback.
  seg = entropy_lib.segment_mask(ids_NxT, mask_NxT, segment=settings.entropy_segment,
                                 delimiter=settings.segment_delimiter,
                                 span_Nx2=gen_n.get("delimiter_span_Nx2"))
  entropy_BxG = entropy_lib.entropy_proxy(old_logps_NxT, seg.mask_NxT).reshape(b, g)
  shannon_BxG = None
  if "entropy_NxT" in gen_n:
    shannon_BxG = entropy_lib.masked_sequence_mean(gen_n["entropy_NxT"], mask_NxT
                                                   ).reshape(b, g)

  out = compute_advantages(groups.rewards, groups.correct, valid_BxG, entropy_BxG,
                           shannon_BxG, algo, settings)
  batch = RolloutBatch(
      prompt_ids_NxP=prompt_ids_NxP, prompt_mask_NxP=prompt_mask_NxP,
      completion_ids_NxT=ids_NxT,
      completion_mask_NxT=mask_NxT & valid_BxG.reshape(-1)[:, None],
      old_logps_NxT=old_logps_NxT, adv_N=out.advantages.reshape(-1),
      ref_logps_NxT=ref_logps_NxT, is_weights_NxT=is_weights_NxT)
  nvalid = jnp.maximum(valid_BxG.sum(), 1)
  metrics = {
      "reward": (groups.rewards * valid_BxG).sum() / nvalid,
      "accuracy": (groups.correct & valid_BxG).sum() / nvalid,
      "response_length": gen_n["lengths_N"].astype(jnp.float32).mean(),
      "truncation_rate": gen_n["truncated_N"].astype(jnp.float32).mean(),
      "segment_fallbacks": seg.fallback_N.sum(),
      "logp_mismatch": mismatch,
      "rollout_tokens": maskf.sum(),
      **diagnostics.group_diagnostics(out.advantages, out.weights, entropy_BxG,
                                      groups.correct, valid_BxG),
  }
  return batch, metrics


def rl_iteration(state: TrainState, rng: jax.Array, algo: AlgoArrays, *, task: JaxTask,
                 model_config: ModelConfig, optimizer: optax.GradientTransformation,
                 settings: IterationSettings, ref_params: Any = None
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One iteration: sample -> rollout -> verify -> advantages -> update -> metrics."""
  b = settings.prompts_per_batch
  b_sample = b * settings.dynamic_sampling_oversample
  k_prompts, k_rollout, k_update = jax.random.split(rng, 3)

  # 1. Prompts and G responses each, from the current (= old) policy.
  prompt_ids_BxP, prompt_mask_BxP, answers_B = task.sample_prompts(k_prompts, b_sample)
  gen = engine.rollout(state.params, prompt_ids_BxP, prompt_mask_BxP, k_rollout,
                       jnp.arange(b_sample), config=model_config, spec=settings.sampling)

  # 2. Verify and reward.
  answers_N = jax.tree.map(lambda a: jnp.repeat(a, settings.group_size, axis=0), answers_B)
  correct_N = task.verify(gen.completion_ids_NxT, gen.completion_mask_NxT, answers_N)
  groups = group_batch(prompt_ids_BxP, prompt_mask_BxP, gen, correct_N, settings,
                       algo.overlong)

  # 3. DAPO dynamic sampling (jitted: a fixed over-sampling factor and masks).
  fill_rate = jnp.ones((), jnp.float32)
  if settings.dynamic_sampling_oversample > 1:
    mixed, fill_rate = select_mixed_groups(groups, b)
    if algo.dynamic_sampling is None:
      groups = mixed
    else:   # per run: the mixed groups, or the first B groups as sampled
      first = jax.tree.map(lambda x: x[:b], groups)
      groups = jax.tree.map(lambda m, f: jnp.where(algo.dynamic_sampling, m, f), mixed,
                            first)
      fill_rate = jnp.where(algo.dynamic_sampling, fill_rate, 1.0)

  # 4. Old log-probs, entropy proxy, advantages; 5. the update.
  batch, metrics = prepare_batch(state.params, ref_params, groups, algo,
                                 model_config=model_config, settings=settings)
  state, update_metrics = update_lib.update(state, batch, k_update, optimizer=optimizer,
                                            model_config=model_config,
                                            settings=settings.update,
                                            switches=algo.loss_switches(),
                                            group_size=settings.group_size)
  return state, {**metrics, **update_metrics, "dynamic_sampling_fill_rate": fill_rate}


def _fields(gen: engine.Generation) -> dict[str, jax.Array]:
  """The per-response arrays of a Generation (scalars and absent fields dropped)."""
  out = {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}
  return {k: v for k, v in out.items() if v is not None and jnp.ndim(v) > 0}


def run_iterations(state: TrainState, rng: jax.Array, algo: AlgoArrays, *, num_iterations: int,
                   task: JaxTask, model_config: ModelConfig,
                   optimizer: optax.GradientTransformation, settings: IterationSettings,
                   ref_params: Any = None
                   ) -> tuple[TrainState, jax.Array, dict[str, jax.Array]]:
  """`num_iterations` RL iterations as one `lax.scan`; metrics stacked per iteration.

  Pure in (state, rng, algo): jit it with the keyword arguments static, and vmap it over
  seeds (rng, and state if the initial models differ) or over `algo` (variants).
  """
  def body(carry, _):
    state, rng = carry
    rng, key = jax.random.split(rng)
    state, metrics = rl_iteration(state, key, algo, task=task, model_config=model_config,
                                  optimizer=optimizer, settings=settings,
                                  ref_params=ref_params)
    return (state, rng), metrics

  (state, rng), metrics = jax.lax.scan(body, (state, rng), None, length=num_iterations)
  return state, rng, metrics
