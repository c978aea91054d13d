"""Ablations as one compiled program: algorithms x seeds vmapped through the jitted loop.

    setup = ablation.setup(config)                 # build + supervised warm start, once
    algos = ablation.algorithms()                   # {"grpo": AlgoArrays, ..., "c6": ...}
    result = ablation.run(setup, algos, seeds=(0, 1, 2), num_iterations=40, eval_every=10)
    summary = stats.summarize(result["val"]["accuracy"][:, :, -1], result["names"])  # evaluation.stats

Every algorithm is an `iteration.AlgoArrays` with all switches set, so GRPO, Dr.GRPO,
RLOO, DAPO, EDGE-GRPO, EGPO and C1-C6 (paper Table 2) differ only in array values and
train in ONE compiled `lax.scan`, vmapped over runs = algorithms x seeds. What each name
means here (docs/METHOD.md, "Baselines"), on top of the config's shared settings
(token-mean aggregation, clip 0.2/0.2, +1/-1 rewards, no KL):

  grpo       GRPO z-score (Eq. 2); degenerate groups get 0.
  dr_grpo    r - mean(r) (no std division) and the seq-mean-token-sum-norm loss.
  rloo       r_i minus the mean of the other responses' rewards.
  dapo       GRPO z-score + clip-higher (eps_high 0.28) + soft overlong shaping (buffer
             `overlong_buffer`) + dynamic sampling: with `oversample` k > 1 EVERY run
             samples k * B prompts (one static shape); DAPO keeps the first B mixed groups
             (slots it cannot fill are masked), the others use the first B groups. With
             k = 1 "dapo" is DAPO without dynamic sampling.
  edge_grpo  z-score x mean(P) / P_i, P the mean Shannon entropy, clamped to
             `IterationSettings.edge_clamp` (the EGPO authors' (0.5, 2.0)); without
             EDGE-GRPO's guided error correction (hint regeneration).
  egpo, c1..c6  EGPO (Eqs. 6-11) and its Table 2 variants (c3 is "lock_one").
  egpo_no_nsr   EGPO with all-wrong groups at A = 0 (no Eq. 10 NSR; the study's ablation).
  any other registered estimator that traces as arrays (`iteration.estimator_codes()`):
             that estimator with the shared loss. `iteration.host_only_estimators()`
             names those that do not, and why; `algorithm` refuses them with that reason.

Runs of one seed share the warm-started model, the RL random stream (prompts and
sampling keys) and the validation prompts, so differences between algorithms at one
seed are paired; `evaluation.stats` holds the intervals and paired tests over seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from egpo_jax.core import advantages as adv_lib
from egpo_jax.core import entropy as entropy_lib
from egpo_jax.evaluation import calibration
from egpo_jax.models import transformer
from egpo_jax.models.config import ModelConfig
from egpo_jax.sampling import engine
from egpo_jax.training import experiment as experiment_lib, iteration, warmup
from egpo_jax.types import TrainState

# The baselines, then EGPO and its Table 2 variants (egpo, c1..c6).
ALGORITHMS = ("grpo", "dr_grpo", "rloo", "dapo", "edge_grpo") + adv_lib.EGPO_PRESETS
STUDY_ARMS = ("egpo", "grpo", "egpo_no_nsr")   # the study's primary comparison
DAPO_EPS_HIGH = 0.28
VALIDATION_METRICS = ("accuracy", "auroc", "entropy_gap", "mean_entropy_correct",
                      "mean_entropy_wrong", "ece", "overconfident_wrong")
# Confidence exp(-H~) at or above which a wrong response is an overconfident failure.
OVERCONFIDENT_AT = 0.9


def algorithm(name: str, *, lam_min: float = 0.8, lam_max: float = 2.0,
              eps_high: float = 0.2, dapo_eps_high: float = DAPO_EPS_HIGH
              ) -> iteration.AlgoArrays:
  """The named algorithm (see the module doc) as fully switched `AlgoArrays`.

  Args:
    name: one of `ALGORITHMS`, "egpo_no_nsr" (or "lock_one" for c3), or a registered
      estimator of `iteration.estimator_codes()`; case-insensitive.
    lam_min, lam_max: EGPO's clamp bounds (Eq. 8) for egpo and c1-c6.
    eps_high: the upper ratio clip of every algorithm but DAPO (the config's 0.2).
    dapo_eps_high: DAPO's clip-higher.
  """
  key = name.lower()
  key = "c3" if key == "lock_one" else key
  create = functools.partial(iteration.AlgoArrays.create_switched, lam_min=lam_min,
                             lam_max=lam_max, eps_high=eps_high)
  if key == "dr_grpo":
    return create(estimator="dr_grpo", calibrate=False, nsr=False, seq_sum_norm=True)
  if key == "dapo":
    return create(estimator="grpo", calibrate=False, nsr=False, eps_high=dapo_eps_high,
                  overlong=True, dynamic_sampling=True)
  if key in adv_lib.EGPO_PRESETS:
    return create(key, estimator="egpo")
  if key == "egpo_no_nsr":
    return create(estimator="egpo", nsr=False)
  if key in iteration.estimator_codes():   # grpo, rloo, edge_grpo, a user's estimator
    return create(estimator=key, calibrate=False, nsr=False)
  why = iteration.host_only_estimators().get(key)
  if why:
    raise ValueError(f"algorithm {name!r}: the registered estimator does not trace as "
                     f"arrays ({why}), so it cannot join a vmapped ablation")
  raise ValueError(f"unknown algorithm {name!r}; known: {list(ALGORITHMS)}, 'egpo_no_nsr' "
                   f"(or 'lock_one'), or an estimator of {list(iteration.estimator_codes())}")


def algorithms(names: Sequence[str] = ALGORITHMS, **kwargs) -> dict[str, iteration.AlgoArrays]:
  """{name: algorithm(name, **kwargs)}, in the given order."""
  if len(set(names)) != len(names):
    raise ValueError(f"algorithm names must be unique, got {list(names)}")
  return {n: algorithm(n, **kwargs) for n in names}


def stack(algos: Sequence[iteration.AlgoArrays]) -> iteration.AlgoArrays:
  """Stacks fully switched AlgoArrays along a new leading (run) axis."""
  if not algos:
    raise ValueError("stack needs at least one AlgoArrays")
  for a in algos:
    if any(x is None for x in a):
      raise ValueError("every AlgoArrays of an ablation needs all switches set; build "
                       "them with ablation.algorithm(...) or AlgoArrays.create_switched")
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *algos)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every run of an ablation shares: the experiment, the warm-started state, the
  optimizer, the shared iteration settings and the validation settings."""
  experiment: experiment_lib.Experiment
  settings: iteration.IterationSettings
  optimizer: optax.GradientTransformation
  state: TrainState
  warmup: dict[str, Any]
  eval_spec: engine.SamplingSpec
  eval_prompts: int
  eval_rng: jax.Array
  overconfident_at: float = OVERCONFIDENT_AT


def setup(c: ml_collections.ConfigDict, *, oversample: int = 2,
          overlong_buffer: int | None = None, eval_prompts: int | None = None,
          eval_samples: int = 4, overconfident_at: float = OVERCONFIDENT_AT) -> Setup:
  """Builds the experiment of config `c` (synthetic task) and warm-starts its model once.

  Args:
    c: a trainer config (e.g. experiments/configs/default.py); its model, task, rollout,
      loss and optimizer settings are shared by all runs; its algo fields are ignored
      (each run's algorithm is an AlgoArrays).
    oversample: prompts sampled per iteration = oversample x rollout.prompts_per_batch,
      for DAPO's dynamic sampling (1: DAPO without it).
    overlong_buffer: DAPO's soft overlong buffer in tokens; default a quarter of
      rollout.max_new_tokens.
    eval_prompts: fixed validation prompts (default config.train.eval_prompts).
    eval_samples: samples per validation prompt (at the rollout temperature).
    overconfident_at: confidence exp(-H~) from which a wrong response counts as an
      overconfident failure (validation metric `overconfident_wrong`).
  """
  if c.task.name != "synthetic":
    raise ValueError(f"config.task.name={c.task.name!r}: ablations run the jitted loop, "
                     "which needs the synthetic (jnp) task")
  if oversample < 1:
    raise ValueError(f"oversample={oversample} must be >= 1")
  if not 0 < overconfident_at < 1:
    raise ValueError(f"overconfident_at={overconfident_at} must be a confidence in (0, 1)")
  if overlong_buffer is None:
    overlong_buffer = max(1, c.rollout.max_new_tokens // 4)
  if not 0 < overlong_buffer <= c.rollout.max_new_tokens:
    raise ValueError(f"overlong_buffer={overlong_buffer} must be in [1, "
                     f"rollout.max_new_tokens={c.rollout.max_new_tokens}]")
  exp = experiment_lib.build(c)
  sampling = dataclasses.replace(exp.settings.sampling, return_entropy=True)
  settings = dataclasses.replace(exp.settings, sampling=sampling, advantage="egpo",
                                 dynamic_sampling_oversample=oversample,
                                 overlong_buffer=overlong_buffer)
  optimizer = experiment_lib.rl_optimizer(c, int(c.train.iterations))
  # The trainer's key split, so the warm start is the one `train.train` makes.
  k_init, k_warm, k_eval, _ = jax.random.split(jax.random.PRNGKey(c.seed), 4)
  params = transformer.init_params(exp.model_config, k_init)
  state = TrainState.create(params, optimizer.init(params))
  info: dict[str, Any] = {}
  if c.warmup.steps > 0:
    state, info = warmup.sft_warm_up(state, k_warm, exp, c)
    state = TrainState.create(state.params, optimizer.init(state.params))
  eval_spec = dataclasses.replace(sampling, group_size=eval_samples, return_entropy=False)
  return Setup(exp, settings, optimizer, state, info, eval_spec,
               int(eval_prompts or c.train.eval_prompts), k_eval, float(overconfident_at))


def validation_metrics(params: Any, rng: jax.Array, *, task: iteration.JaxTask,
                       model_config: ModelConfig, spec: engine.SamplingSpec,
                       num_prompts: int, overconfident_at: float = OVERCONFIDENT_AT
                       ) -> dict[str, jax.Array]:
  """Sampled accuracy and calibration of exp(-H~) on `num_prompts` prompts; pure.

  The same quantities as `evaluation.calibration` (AUROC of confidence for correct, the
  entropy gap wrong - correct of the Eq. 5 proxy, ECE); NaN where a class is empty.
  `overconfident_wrong` is the fraction of ALL responses that are wrong with confidence
  exp(-H~) >= overconfident_at (a fixed threshold, so it is comparable across runs).
  """
  k_prompts, k_sample = jax.random.split(rng)
  ids, mask, answers = task.sample_prompts(k_prompts, num_prompts)
  gen = engine.rollout(params, ids, mask, k_sample, jnp.arange(num_prompts),
                       config=model_config, spec=spec)
  answers_n = jax.tree.map(lambda a: jnp.repeat(a, spec.group_size, axis=0), answers)
  correct_n = task.verify(gen.completion_ids_NxT, gen.completion_mask_NxT, answers_n)
  h_n = entropy_lib.entropy_proxy(gen.logps_NxT, gen.completion_mask_NxT)
  conf_n, correct_n = jnp.exp(-h_n), correct_n.astype(bool)
  out = calibration.calibration_stats(conf_n, correct_n, h_n)
  out["overconfident_wrong"] = jnp.mean(~correct_n & (conf_n >= overconfident_at))
  return {k: out[k] for k in VALIDATION_METRICS}


def run(s: Setup, algos: Mapping[str, iteration.AlgoArrays], seeds: Sequence[int], *,
        num_iterations: int, eval_every: int, progress: bool = True,
        eval_batch: int | None = None) -> dict[str, Any]:
  """Trains every algorithm x seed from the warm start as one vmapped, jitted program.

  Validation on the fixed prompts runs before RL and after every `eval_every` iterations
  (vmapped; with `eval_batch`, over that many runs at a time, which bounds its memory:
  many runs x a large validation set would not fit at once). One compilation serves all
  runs; a chunk is `eval_every` iterations.

  Returns:
    {"names": [A], "seeds": [S], "iterations": int array [I] (1..I),
     "eval_iterations": [E] (0, eval_every, ...), "train": {metric: float [A, S, I]},
     "val": {metric: float [A, S, E]}, "seconds": wall time, "warmup": s.warmup}.
  """
  names = list(algos)
  if not names or not seeds:
    raise ValueError("run needs at least one algorithm and one seed")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct, got {list(seeds)}")
  if eval_batch is not None and eval_batch < 1:
    raise ValueError(f"eval_batch={eval_batch} must be a positive number of runs (or None)")
  if eval_every < 1 or num_iterations < eval_every or num_iterations % eval_every:
    raise ValueError(f"num_iterations={num_iterations} must be a positive multiple of "
                     f"eval_every={eval_every}")
  a, n_s = len(names), len(seeds)
  algo_r = stack([algos[n] for n in names for _ in seeds])
  rng_r = jnp.stack([jax.random.PRNGKey(int(seed)) for _ in names for seed in seeds])
  state_r = jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (a * n_s,) + x.shape)),
                         s.state)
  chunk = jax.jit(jax.vmap(functools.partial(
      iteration.run_iterations, num_iterations=eval_every, task=s.experiment.task,
      model_config=s.experiment.model_config, optimizer=s.optimizer,
      settings=s.settings)), donate_argnums=(0,))
  one = functools.partial(
      validation_metrics, rng=s.eval_rng, task=s.experiment.task,
      model_config=s.experiment.model_config, spec=s.eval_spec, num_prompts=s.eval_prompts,
      overconfident_at=s.overconfident_at)
  validate = jax.jit(functools.partial(jax.lax.map, one, batch_size=eval_batch)
                     if eval_batch else jax.vmap(one))

  t0 = time.perf_counter()
  val = [jax.device_get(validate(state_r.params))]
  train_rows = []
  for done in range(eval_every, num_iterations + 1, eval_every):
    state_r, rng_r, metrics = chunk(state_r, rng_r, algo_r)
    train_rows.append(jax.device_get(metrics))
    val.append(jax.device_get(validate(state_r.params)))
    if progress:
      acc = np.asarray(val[-1]["accuracy"]).reshape(a, n_s).mean(1)
      best = names[int(np.nanargmax(acc))]
      print(f"iteration {done}/{num_iterations}: {time.perf_counter() - t0:.0f}s, "
            f"val accuracy mean {np.nanmean(acc):.3f} (best {best} {np.nanmax(acc):.3f})",
            flush=True)

  def shape(x, axis_len):
    return np.asarray(x, np.float64).reshape(a, n_s, axis_len)

  train_metrics = {k: shape(np.concatenate([r[k] for r in train_rows], axis=1),
                            num_iterations)
                   for k in train_rows[0] if np.ndim(train_rows[0][k]) == 2}
  val_metrics = {k: shape(np.stack([v[k] for v in val], axis=1), len(val)) for k in val[0]}
  return {"names": names, "seeds": [int(x) for x in seeds],
          "iterations": np.arange(1, num_iterations + 1),
          "eval_iterations": np.arange(0, num_iterations + 1, eval_every),
          "train": train_metrics, "val": val_metrics,
          "seconds": time.perf_counter() - t0, "warmup": s.warmup}
