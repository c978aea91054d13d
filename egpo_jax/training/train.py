"""The training job, top to bottom, for both modes (`train`):

  build      `start_job`: the experiment (`experiment.build`), mesh, optimizer, starting
             state, data and evaluation (`validation.validator`) of the config
  start      `resume_or_start`: the newest good checkpoint, or the SFT warm-up
             (`warmup.sft_warm_up`), the evaluation before RL and checkpoint 0
  run        chunks of iterations (`chunk_runner`: one jitted scan of `iteration.run_iterations`
             for a jnp task, `host_loop.host_iteration`s for a host-verified one), each
             followed by `evaluate_chunk`, `write_metrics`, `check_finite`, `checkpoint`,
             and a stop on a signal (`preemption`)
  summarise  `summarise`: the evaluation after RL, summary.json and curves.png

Chunk boundaries depend only on the absolute iteration index (`chunk_end`), so a
restarted run replays exactly the same computation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from egpo_jax.evaluation import calibration, report
from egpo_jax.models import attention
from egpo_jax.sampling import continuous
from egpo_jax.training import checkpointing
from egpo_jax.training import config as config_lib
from egpo_jax.training import distributed, experiment, host_loop, preemption, tasks
from egpo_jax.training import metrics as metrics_lib
from egpo_jax.training import validation, warmup
from egpo_jax.types import TrainState

log = logging.getLogger(__name__)

CURVES = ("accuracy", "val_accuracy", "val_auroc", "entropy_gap", "val_entropy_gap",
          "frac_all_wrong", "frac_nsr_only_adv", "mean_weight_correct", "mean_weight_wrong",
          "response_length", "clipfrac_high", "grad_norm")

# This process's share of the host-verified work (prompts read, responses decoded and
# verified), summed over the iterations of this call into the summary's "process_share".
PROCESS_SHARE = ("process_prompts", "process_rollouts", "process_verified")


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Job:
  """What stays fixed while the job runs."""
  c: ml_collections.ConfigDict
  workdir: str
  exp: experiment.Experiment
  mesh: jax.sharding.Mesh
  optimizer: Any
  checkpointer: checkpointing.Checkpointer
  host_task: tasks.JsonlTask | None   # None: a jnp task (jitted mode)
  evaluate: validation.Validator | None   # None: nothing to evaluate on
  sft_key: jax.Array

  @property
  def total(self) -> int:
    return int(self.c.train.iterations)


@dataclasses.dataclass
class Run:
  """What the job carries from chunk to chunk, and what a checkpoint holds."""
  iteration: int
  state: TrainState
  rng: jax.Array
  ref_params: Any = None       # the reference policy of the KL term (loss.kl_coef > 0)
  eval_before: dict[str, Any] = dataclasses.field(default_factory=dict)
  sft_warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
  resumed: bool = False
  seconds: list[float] = dataclasses.field(default_factory=list)   # per iteration
  share: dict[str, int] = dataclasses.field(default_factory=dict)


@preemption.honours_sigterm
def train(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          stop_at_iteration: int | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) the job in `workdir`; returns the summary it also writes as JSON.

  `stop_at_iteration` ends the run early after the checkpoint at that iteration (as a
  kill would, minus the lost work) and returns None; the next call resumes.
  """
  # Every field is checked before anything is written; the processes join before
  # anything touches a device.
  c = config_lib.checked(c)
  distributed.initialize(distributed.spec_from_config(c))
  job, fresh = start_job(c, workdir)
  run = resume_or_start(job, fresh)
  # Metrics after the resumed iteration are recomputed: the writer drops them (JSONL)
  # or hides them (TensorBoard) so that no iteration is logged twice.
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=c.train.tensorboard,
                                     resume_after=run.iteration if run.resumed else None)
  run_chunk = chunk_runner(job, run)
  bar = tqdm.tqdm(total=job.total, initial=run.iteration, desc="RL", disable=not progress,
                  unit="it")
  eval_after = None
  try:
    while run.iteration < job.total:
      end = chunk_end(run.iteration, job.total, c.train.iterations_per_call,
                      c.train.checkpoint_every, c.train.eval_every if job.evaluate else 0)
      rows = run_chunk(run, end - run.iteration)
      val = evaluate_chunk(job, run, end, rows)
      if end == job.total:   # the last validation is the evaluation after RL
        eval_after = val if val is not None and "skipped" not in val else None
      write_metrics(writer, run, rows)
      run.iteration = end
      bar.update(end - bar.n)
      bar.set_postfix(acc=f"{float(rows[-1]['accuracy']):.3f}")
      check_finite(job, run)
      checkpoint(job, run)
      if run.iteration < job.total and preemption.stop_requested(run.iteration):
        preemption.checkpoint_and_raise(run.iteration, job.checkpointer, saved_tree(run),
                                        checkpoint_extra(job, run))
      if stop_at_iteration is not None and stop_at_iteration <= run.iteration < job.total:
        return None
  finally:
    bar.close()
    writer.close()
    job.checkpointer.close()
  return summarise(job, run, eval_after, writer.path)


def start_job(c: ml_collections.ConfigDict, workdir: str) -> tuple[Job, Run]:
  """The job of the checked config `c` in `workdir` (config.json written there), and the
  run it starts from when there is no checkpoint: the policy before training, step 0."""
  exp = experiment.build(c)
  try:   # a kernel this backend lacks fails here, not at the first compile
    attention.check_implementation(exp.model_config.attention, dtype=exp.model_config.dtype,
                                   head_dim=exp.model_config.head_size,
                                   field="config.model.attention")
  except ValueError as err:
    raise config_lib.ConfigError(str(err)) from None
  mesh = distributed.mesh_from_config(c)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_metrics_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  optimizer = experiment.rl_optimizer(c, int(c.train.iterations))
  k_init, k_sft, k_eval, k_rl = jax.random.split(jax.random.PRNGKey(c.seed), 4)
  params = experiment.initial_params(c, exp, k_init, mesh)
  state = experiment.fresh_state(params, optimizer, mesh)
  host_task = None if exp.jitted else tasks.JsonlTask(
      c, exp.tokenizer, seed=c.seed, max_positions=exp.model_config.max_position_embeddings)
  if host_task is not None and distributed.is_metrics_writer():
    host_task.save_report(workdir)   # what the JSONL reader kept and skipped, by file line
  # The same prompts and samples at every evaluation (a fixed key): calibration as it evolves.
  evaluate = validation.validator(c, exp, k_eval, host_task)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=c.train.keep_checkpoints)
  job = Job(c, workdir, exp, mesh, optimizer, checkpointer, host_task, evaluate, k_sft)
  rng = distributed.put(k_rl, distributed.replicated(mesh))
  return job, Run(0, state, rng, ref_params=state.params if c.loss.kl_coef else None)


def saved_tree(run: Run) -> dict[str, Any]:
  return experiment.saved_tree(run.state, run.rng, run.ref_params)


def checkpoint_extra(job: Job, run: Run) -> dict[str, Any]:
  """The JSON a checkpoint carries next to the arrays (its key names are kept stable:
  older workdirs resume)."""
  extra = {"eval_before": run.eval_before, "warmup": run.sft_warmup,
           "iteration": run.iteration, "config": json.loads(job.c.to_json_best_effort())}
  if job.host_task is not None:
    extra["data"] = job.host_task.get_state()
  return extra


def resume_or_start(job: Job, fresh: Run) -> Run:
  """The newest good checkpoint's run; without one, `fresh` after the SFT warm-up, with
  its evaluation before RL, saved as checkpoint 0."""
  restored = job.checkpointer.restore_latest(saved_tree(fresh))
  if restored is not None:
    step, saved, extra = restored
    if job.host_task is not None:
      job.host_task.set_state(extra["data"])
    if distributed.is_metrics_writer():
      print(f"resumed at iteration {step} of {job.total} from "
            f"{job.checkpointer.step_path(step)}", file=sys.stderr, flush=True)
    return Run(step, saved["train"], saved["rng"], saved.get("ref"),
               eval_before=extra["eval_before"], sft_warmup=extra.get("warmup", {}),
               resumed=True)
  run = fresh
  if job.c.warmup.steps > 0:
    state, run.sft_warmup = warmup.sft_warm_up(run.state, job.sft_key, job.exp, job.c)
    run.state = experiment.fresh_state(state.params, job.optimizer, job.mesh)
  # A copy: the RL loop donates the train state's buffers.
  run.ref_params = (jax.tree.map(jnp.copy, run.state.params) if job.c.loss.kl_coef
                    else None)
  run.eval_before = job.evaluate(run.state.params) if job.evaluate else {}
  job.checkpointer.save(0, saved_tree(run), checkpoint_extra(job, run), force=True)
  if job.total > 0 and preemption.stop_requested(0):   # a signal during the first evaluation
    preemption.checkpoint_and_raise(0, job.checkpointer, saved_tree(run),
                                    checkpoint_extra(job, run))
  return run


def chunk_end(it: int, total: int, per_call: int, *every: int) -> int:
  """The iteration after which the chunk starting at `it` stops (absolute, deterministic):
  the next multiple of `per_call` or of any of `every` (0 = none), or `total`."""
  return min([(it // n + 1) * n for n in (per_call, *every) if n > 0] + [total])


def chunk_runner(job: Job, run: Run):
  """Returns run_chunk(run, num_iterations) -> [per-iteration metrics], which advances
  `run.state` and `run.rng`: one jitted scan for a jnp task, else host-verified
  iterations one at a time (`host_rollout` samples); both on the job's mesh (state
  sharded, batches split over its data x fsdp axes, state donated)."""
  exp, mesh = job.exp, job.mesh
  if exp.jitted:
    scan = distributed.jit_iterations(mesh, run.state, run.ref_params, task=exp.task,
                                      model_config=exp.model_config,
                                      optimizer=job.optimizer, settings=exp.settings)

    def run_jitted(run, num_iterations):
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        run.state, run.rng, chunk = scan(run.state, run.rng, exp.algo, run.ref_params,
                                         num_iterations)
      chunk = jax.device_get(chunk)
      dt = (time.perf_counter() - t0) / num_iterations
      rows = [{k: v[i] for k, v in chunk.items()} for i in range(num_iterations)]
      for row in rows:
        row["seconds_per_iteration"] = dt
        row["rollout_tokens_per_s"] = float(row["rollout_tokens"]) / dt
      return rows
    return run_jitted

  placement = distributed.BatchPlacement(mesh, distributed.state_shardings(run.state, mesh))
  rollout = host_rollout(job)

  def run_host(run, num_iterations):
    rows = []
    for _ in range(num_iterations):
      t0 = time.perf_counter()
      run.rng, key = jax.random.split(run.rng)
      with jax.set_mesh(mesh):
        run.state, row = host_loop.host_iteration(
            run.state, key, exp.algo, task=job.host_task.host_task(),
            model_config=exp.model_config, optimizer=job.optimizer, settings=exp.settings,
            ref_params=run.ref_params, max_tries=job.c.dynamic_sampling.max_tries,
            placement=placement, donate=True, rollout=rollout)
      row["seconds_per_iteration"] = time.perf_counter() - t0
      rows.append(row)
    return rows
  return run_host


def host_rollout(job: Job) -> host_loop.RolloutFn:
  """The sampler of host mode's iterations: the place to plug in another rollout engine.
  rollout.slots > 0: continuous batching (`sampling.continuous.HostRollout`);
  rollout.tensor: on its own mesh (`distributed.RolloutOnMesh`)."""
  spec = experiment.continuous_spec(job.c, job.exp.settings.sampling)
  if spec is not None:
    rollout = continuous.HostRollout(job.exp.model_config, spec,
                                     chunk_steps=job.c.rollout.get("chunk_steps", 32))
  else:
    rollout = host_loop.jitted_rollout(job.exp.model_config, job.exp.settings)
  cfg = job.exp.model_config
  mesh = distributed.rollout_mesh(job.mesh, job.c.rollout.get("tensor", 0),
                                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
  return (rollout if mesh is job.mesh
          else distributed.RolloutOnMesh(rollout, job.mesh, mesh, cfg))


def evaluate_chunk(job: Job, run: Run, end: int, rows: list[dict[str, Any]]
                   ) -> dict[str, Any] | None:
  """The evaluation after the chunk ending at iteration `end`, when one is due there
  (multiples of `train.eval_every`, and the last iteration), as val_* metrics of its
  last row; {"skipped": 1} when the params have diverged."""
  c = job.c
  if not (job.evaluate and c.train.eval_every
          and int(run.state.nonfinite_streak) < c.train.max_consecutive_nonfinite
          and (end % c.train.eval_every == 0 or end == job.total)):
    return None
  try:
    val = job.evaluate(run.state.params)
  except ValueError as err:   # e.g. non-finite log-probs from diverged parameters
    log.warning("validation at iteration %d skipped: %s", end, err)
    val = {"skipped": 1}
  rows[-1].update({f"val_{k}": v for k, v in calibration.numeric(val).items()})
  return val


def write_metrics(writer: metrics_lib.MetricsWriter, run: Run,
                  rows: list[dict[str, Any]]) -> None:
  """One metrics row per iteration after `run.iteration`; tallies time and work."""
  for i, row in enumerate(rows):
    writer.write(run.iteration + i + 1, row)
    run.seconds.append(row["seconds_per_iteration"])
    for k in PROCESS_SHARE:
      run.share[k] = run.share.get(k, 0) + int(row.get(k, 0))


def check_finite(job: Job, run: Run) -> None:
  """Raises NonFiniteError once `train.max_consecutive_nonfinite` updates in a row were
  skipped as non-finite (each left the params unchanged)."""
  streak, limit = int(run.state.nonfinite_streak), job.c.train.max_consecutive_nonfinite
  if streak >= limit:
    raise NonFiniteError(
        f"{streak} consecutive updates had a non-finite loss or gradient (limit "
        f"train.max_consecutive_nonfinite={limit}); params were left unchanged by them. "
        "Lower optim.lr or check the rewards.")


def checkpoint(job: Job, run: Run) -> None:
  """Saves the run on multiples of `train.checkpoint_every` and at the end (async)."""
  if run.iteration % job.c.train.checkpoint_every == 0 or run.iteration == job.total:
    job.checkpointer.save(run.iteration, saved_tree(run), checkpoint_extra(job, run))


def summarise(job: Job, run: Run, eval_after: dict[str, Any] | None,
              metrics_path: str) -> dict[str, Any]:
  """The evaluation after RL (unless the last validation was it), summary.json and the
  curves; returns the summary."""
  if eval_after is None:
    eval_after = job.evaluate(run.state.params) if job.evaluate else {}
  summary = {"eval_before_rl": run.eval_before, "eval_after_rl": eval_after,
             "warmup": run.sft_warmup, "iterations": job.total,
             "nonfinite_skipped": int(run.state.nonfinite_total),
             "median_seconds_per_iteration": (float(np.median(run.seconds)) if run.seconds
                                              else None),
             "process_share": {"process_index": jax.process_index(), **run.share},
             "data": job.host_task.report_json() if job.host_task is not None else None}
  if distributed.is_metrics_writer():
    with open(os.path.join(job.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    metrics_lib.plot_curves(metrics_lib.read_jsonl(metrics_path), CURVES,
                            os.path.join(job.workdir, "curves.png"),
                            title=f"{job.c.algo.advantage} ({job.c.algo.variant})")
  return summary


# Names that moved out of this module: still importable from here, with a warning.
_MOVED = {
    "load_checkpoint": (experiment, "read_train_state"),
    "warm_up": (warmup, "sft_warm_up"),
    "format_summary": (report, "before_after_table"),
    "build": (experiment, "build"),
    "rl_optimizer": (experiment, "rl_optimizer"),
    "Experiment": (experiment, "Experiment"),
    "BYTE_SPECIAL_TOKENS": (experiment, "BYTE_SPECIAL_TOKENS"),
    "WARMUP_STEPS_PER_CALL": (warmup, "SFT_STEPS_PER_CALL"),
}


def _evaluate(params, rng, exp, *, num_prompts: int, samples: int = validation.EVAL_SAMPLES):
  """The old `train.evaluate`: the jnp task's evaluation at the rollout's settings."""
  spec = dataclasses.replace(exp.settings.sampling, group_size=samples, return_entropy=False)
  return validation.evaluate_jax_task(params, rng, task=exp.task,
                                      model_config=exp.model_config, spec=spec,
                                      num_prompts=num_prompts)


def __getattr__(name: str):
  if name == "evaluate":
    warnings.warn("egpo_jax.training.train.evaluate is deprecated; use "
                  "egpo_jax.training.validation.evaluate_jax_task (or .validator)",
                  DeprecationWarning, stacklevel=2)
    return _evaluate
  if name in _MOVED:
    module, new = _MOVED[name]
    warnings.warn(f"egpo_jax.training.train.{name} is deprecated; use "
                  f"{module.__name__}.{new}", DeprecationWarning, stacklevel=2)
    return getattr(module, new)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
