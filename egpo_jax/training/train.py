"""The training job, top to bottom: build -> (restore | warm-up) -> RL chunks -> summary.

The RL iterations run as jitted chunks of `train.iterations_per_call` (K) iterations
(`iteration.run_iterations`); between chunks this host loop writes metrics, checkpoints,
and stops a run whose updates keep being non-finite. Chunk boundaries depend only on the
absolute iteration index, so a restarted run replays exactly the same computation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from egpo_jax.data import synthetic
from egpo_jax.evaluation import calibration, runner
from egpo_jax.models import attention, hf_io, transformer
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import ModelConfig, get_config, load_hf_config
from egpo_jax.models.tokenizer import HFTokenizer
from egpo_jax.training import config as config_lib
from egpo_jax.training import distributed
from egpo_jax.training import host_loop, iteration, metrics as metrics_lib, tasks, warmup
from egpo_jax.training import preemption
from egpo_jax.training.checkpointing import Checkpointer
from egpo_jax.training.optimizer import make_optimizer
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
class Experiment:
  """Everything static that the job derives from the config."""
  model_config: ModelConfig
  tokenizer: Any
  task: iteration.JaxTask | None   # None: a host-verified task (built in `train`)
  settings: iteration.IterationSettings
  algo: iteration.AlgoArrays

  @property
  def jitted(self) -> bool:
    return self.task is not None


BYTE_SPECIAL_TOKENS = ("<think>", "</think>")


def _loads_hf_checkpoint(c: ml_collections.ConfigDict) -> bool:
  return c.model.preset == "hf" and bool(c.model.path)


def build(c: ml_collections.ConfigDict) -> Experiment:
  """The model, tokenizer, task and settings of config `c` (checked; `train` has already
  checked that its input files exist, readers of a finished run do not need them)."""
  c = config_lib.checked(c, inputs_exist=False)
  if _loads_hf_checkpoint(c):
    model_config = load_hf_config(c.model.path, dtype=c.model.dtype,
                                  remat=c.model.remat_policy or c.model.remat,
                                  attention=c.model.attention)
    tokenizer = HFTokenizer.from_pretrained(c.model.path)
  else:
    # A named preset; or "hf" without a checkpoint folder: model.name's shapes, random
    # weights and the byte tokenizer (a dry run of a paper config on its real shapes).
    name = c.model.name if c.model.preset == "hf" else c.model.preset
    tokenizer = ByteTokenizer(extra_special_tokens=BYTE_SPECIAL_TOKENS)
    model_config = get_config(name, dtype=c.model.dtype,
                              remat=c.model.remat_policy or c.model.remat,
                              attention=c.model.attention)
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


def evaluate(params, rng: jax.Array, exp: Experiment, *, num_prompts: int,
             samples: int = 4) -> dict[str, Any]:
  """Sampled accuracy and calibration (AUROC, ECE, entropy proxy of correct vs wrong) on
  `num_prompts` task prompts drawn from `rng`, at the rollout's sampling settings."""
  spec = dataclasses.replace(exp.settings.sampling, group_size=samples, return_entropy=False)
  return runner.evaluate_jax_task(params, rng, task=exp.task, model_config=exp.model_config,
                                  spec=spec, num_prompts=num_prompts)


def _chunk_end(it: int, total: int, per_call: int, *every: int) -> int:
  """The iteration after which the chunk starting at `it` stops (absolute, deterministic):
  the next multiple of `per_call` or of any of `every` (0 = none), or `total`."""
  return min([(it // n + 1) * n for n in (per_call, *every) if n > 0] + [total])


def _run_chunk_fn(exp: Experiment, optimizer, c: ml_collections.ConfigDict, ref_params,
                  host_task: tasks.JsonlTask | None, mesh: jax.sharding.Mesh, state):
  """Returns run(state, rng, num_iterations) -> (state, rng, [per-iteration metrics]):
  one jitted scan for a jnp task, else host-verified iterations one at a time; both on
  `mesh` (state sharded, batches split over its data x fsdp axes, state donated)."""
  if exp.jitted:
    run = distributed.jit_iterations(mesh, state, ref_params, task=exp.task,
                                     model_config=exp.model_config, optimizer=optimizer,
                                     settings=exp.settings)

    def run_jitted(state, rng, num_iterations):
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        state, rng, chunk = run(state, rng, exp.algo, ref_params, num_iterations)
      chunk = jax.device_get(chunk)
      dt = (time.perf_counter() - t0) / num_iterations
      rows = [{k: v[i] for k, v in chunk.items()} for i in range(num_iterations)]
      for row in rows:
        row["seconds_per_iteration"] = dt
        row["rollout_tokens_per_s"] = float(row["rollout_tokens"]) / dt
      return state, rng, rows
    return run_jitted

  placement = distributed.BatchPlacement(mesh, distributed.state_shardings(state, mesh))

  def run_host(state, rng, num_iterations):
    rows = []
    for _ in range(num_iterations):
      t0 = time.perf_counter()
      rng, key = jax.random.split(rng)
      with jax.set_mesh(mesh):
        state, row = host_loop.host_iteration(
            state, key, exp.algo, task=host_task.host_task(),
            model_config=exp.model_config, optimizer=optimizer, settings=exp.settings,
            ref_params=ref_params, max_tries=c.dynamic_sampling.max_tries,
            placement=placement, donate=True)
      row["seconds_per_iteration"] = time.perf_counter() - t0
      rows.append(row)
    return state, rng, rows
  return run_host


@preemption.honours_sigterm
def train(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          stop_at_iteration: int | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) the job in `workdir`; returns the summary it also writes as JSON.

  `stop_at_iteration` ends the run early after the checkpoint at that iteration (as a
  kill would, minus the lost work) and returns None; the next call resumes.
  """
  # Check every field before anything is written; join the other processes (before
  # anything touches a device); build the model, tokenizer, task, optimizer; the mesh.
  c = config_lib.checked(c)
  distributed.initialize(distributed.spec_from_config(c))
  exp = build(c)
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
  total = int(c.train.iterations)
  rl_opt = rl_optimizer(c, total)
  k_init, k_warm, k_eval, k_rl = jax.random.split(jax.random.PRNGKey(c.seed), 4)
  if _loads_hf_checkpoint(c):
    params = hf_io.load_hf_params(c.model.path, exp.model_config, mesh=mesh)
  else:
    if c.model.preset == "hf":
      log.warning("model.path is empty: %s's shapes with random weights (a dry run, not "
                  "fine-tuning)", c.model.name)
    params = transformer.init_params(exp.model_config, k_init)
  state = _on_mesh(TrainState.create(params, rl_opt.init(params)), mesh)
  params, k_rl = state.params, distributed.put(k_rl, distributed.replicated(mesh))
  host_task = None if exp.jitted else tasks.JsonlTask(c, exp.tokenizer, seed=c.seed)
  if host_task is not None and distributed.is_metrics_writer():
    host_task.save_report(workdir)   # what the JSONL reader kept and skipped, by file line
  use_ref = bool(c.loss.kl_coef)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.train.keep_checkpoints)

  def tree(state, rng, ref):
    return {"train": state, "rng": rng, **({"ref": ref} if use_ref else {})}

  # Resume from the newest good checkpoint, or warm up and evaluate the starting point.
  restored = ckpt.restore_latest(tree(state, k_rl, params))
  if restored is not None:
    start, saved, extra = restored
    state, k_rl, ref_params = saved["train"], saved["rng"], saved.get("ref")
    eval_before, warmup_info = extra["eval_before"], extra.get("warmup", {})
    if host_task is not None:
      host_task.set_state(extra["data"])
    if distributed.is_metrics_writer():
      print(f"resumed at iteration {start} of {total} from "
            f"{os.path.join(ckpt.directory, str(start))}", file=sys.stderr, flush=True)
  else:
    start, warmup_info = 0, {}
    if c.warmup.steps > 0:
      state, warmup_info = warm_up(state, k_warm, exp, c)
      state = _on_mesh(TrainState.create(state.params, rl_opt.init(state.params)), mesh)
    # A copy: the RL loop donates the train state's buffers.
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
    eval_before = (evaluate(state.params, k_eval, exp, num_prompts=c.train.eval_prompts)
                   if exp.jitted else {})
    ckpt.save(0, tree(state, k_rl, ref_params),
              _extra(c, eval_before, warmup_info, 0, host_task), force=True)
    if total > 0 and preemption.stop_requested(0):   # a signal during the first evaluation
      preemption.checkpoint_and_raise(0, ckpt, tree(state, k_rl, ref_params),
                                      _extra(c, eval_before, warmup_info, 0, host_task))

  # Metrics after `start` are recomputed: the writer drops them (JSONL) or hides them
  # (TensorBoard) so that no iteration is logged twice.
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=c.train.tensorboard,
                                     resume_after=start if restored is not None else None)

  # RL: chunks of iterations between host syncs; metrics, checkpoints, non-finite guard.
  run = _run_chunk_fn(exp, rl_opt, c, ref_params, host_task, mesh, state)
  it, times, share = start, [], {"process_index": jax.process_index()}
  bar = tqdm.tqdm(total=total, initial=start, desc="RL", disable=not progress, unit="it")
  eval_after = None
  while it < total:
    # Chunks also end at validations, so train.eval_every need not be a multiple of K.
    end = _chunk_end(it, total, c.train.iterations_per_call, c.train.checkpoint_every,
                     c.train.eval_every if exp.jitted else 0)
    state, k_rl, rows = run(state, k_rl, end - it)
    streak = int(state.nonfinite_streak)
    if (exp.jitted and c.train.eval_every and streak < c.train.max_consecutive_nonfinite
        and (end % c.train.eval_every == 0 or end == total)):
      # The same prompts every time (fixed key): calibration as it evolves.
      val = _validate(state.params, k_eval, exp, c, end)
      rows[-1].update({f"val_{k}": v for k, v in calibration.numeric(val).items()})
      eval_after = val if end == total and "skipped" not in val else None
    for i, row in enumerate(rows):
      writer.write(it + i + 1, row)
      times.append(row["seconds_per_iteration"])
      for k in PROCESS_SHARE:
        share[k] = share.get(k, 0) + int(row.get(k, 0))
    it = end
    bar.update(end - bar.n)
    bar.set_postfix(acc=f"{float(rows[-1]['accuracy']):.3f}")
    if streak >= c.train.max_consecutive_nonfinite:
      ckpt.close()
      raise NonFiniteError(
          f"{streak} consecutive updates had a non-finite loss or gradient (limit "
          f"train.max_consecutive_nonfinite={c.train.max_consecutive_nonfinite}); params "
          f"were left unchanged by them. Lower optim.lr or check the rewards.")
    if it % c.train.checkpoint_every == 0 or it == total:
      ckpt.save(it, tree(state, k_rl, ref_params),
                _extra(c, eval_before, warmup_info, it, host_task))
    if it < total and preemption.stop_requested(it):   # a signal: save this iteration, stop
      bar.close()
      writer.close()
      preemption.checkpoint_and_raise(it, ckpt, tree(state, k_rl, ref_params),
                                      _extra(c, eval_before, warmup_info, it, host_task))
    if stop_at_iteration is not None and stop_at_iteration <= it < total:
      bar.close()
      ckpt.close()
      writer.close()
      return None
  bar.close()
  ckpt.close()
  writer.close()

  # Summary: the same evaluation after RL, a JSON summary and the curves.
  if eval_after is None:   # the last validation already is this evaluation when it ran
    eval_after = (evaluate(state.params, k_eval, exp, num_prompts=c.train.eval_prompts)
                  if exp.jitted else {})
  summary = {"eval_before_rl": eval_before, "eval_after_rl": eval_after,
             "warmup": warmup_info, "iterations": total,
             "nonfinite_skipped": int(state.nonfinite_total),
             "median_seconds_per_iteration": float(np.median(times)) if times else None,
             "process_share": share,
             "data": host_task.report_json() if host_task is not None else None}
  if distributed.is_metrics_writer():
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    rows = metrics_lib.read_jsonl(writer.path)
    metrics_lib.plot_curves(rows, CURVES, os.path.join(workdir, "curves.png"),
                            title=f"{c.algo.advantage} ({c.algo.variant})")
  return summary


def _on_mesh(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """The train state placed on the mesh: params and AdamW moments sharded alike."""
  return distributed.put(state, distributed.state_shardings(state, mesh))


def _validate(params, k_eval, exp: Experiment, c: ml_collections.ConfigDict,
              it: int) -> dict[str, Any]:
  try:
    return evaluate(params, k_eval, exp, num_prompts=c.train.eval_prompts)
  except ValueError as err:   # e.g. non-finite log-probs from diverged parameters
    log.warning("validation at iteration %d skipped: %s", it, err)
    return {"skipped": 1}


def _extra(c, eval_before, warmup_info, iteration_, host_task) -> dict[str, Any]:
  extra = {"eval_before": eval_before, "warmup": warmup_info, "iteration": iteration_,
           "config": json.loads(c.to_json_best_effort())}
  if host_task is not None:
    extra["data"] = host_task.get_state()
  return extra


def rl_optimizer(c: ml_collections.ConfigDict, total: int):
  """The RL optimizer of config `c` for a run of `total` iterations (its schedule length)."""
  return make_optimizer(lr=c.optim.lr, schedule=c.optim.schedule,
                        warmup_steps=c.optim.warmup_steps,
                        total_steps=max(1, total * c.ppo.epochs * c.ppo.minibatches),
                        weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2,
                        grad_clip=c.optim.grad_clip,
                        moment_dtype=c.optim.get("moment_dtype", "float32"))


def load_checkpoint(workdir: str, c: ml_collections.ConfigDict | None = None,
                    step: int | None = None) -> tuple[int, TrainState, dict[str, Any]]:
  """Restores a run's train state (newest good checkpoint, or `step`) and its metadata.

  The config defaults to the run's own `config.json`.
  """
  if c is None:
    with open(os.path.join(workdir, "config.json")) as f:
      c = ml_collections.ConfigDict(json.load(f))
  exp = build(c)
  params = jax.eval_shape(lambda: transformer.init_params(exp.model_config,
                                                          jax.random.PRNGKey(0)))
  opt = rl_optimizer(c, int(c.train.iterations))
  ref = {"ref": params} if c.loss.kl_coef else {}
  abstract = jax.eval_shape(lambda p: {"train": TrainState.create(p, opt.init(p)),
                                       "rng": jax.random.PRNGKey(0), **ref}, params)
  # Onto this process's first device, whatever mesh and process count wrote it.
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                          abstract)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if step is None:
      found = ckpt.restore_latest(abstract)
      if found is None:
        raise FileNotFoundError(f"no restorable checkpoint under {ckpt.directory}")
      step, tree, extra = found
    else:
      tree, extra = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return step, tree["train"], extra


WARMUP_STEPS_PER_CALL = 50   # warm-up steps per jitted call; signals are honoured between


def warm_up(state: TrainState, rng: jax.Array, exp: Experiment,
            c: ml_collections.ConfigDict, *, steps_per_call: int = WARMUP_STEPS_PER_CALL
            ) -> tuple[TrainState, dict[str, Any]]:
  """Supervised warm-up on the synthetic task (`c.warmup`); returns the state and its losses.

  Runs as jitted chunks of `steps_per_call` steps (bitwise the same as one scan); a
  SIGTERM or SIGINT stops it at the next chunk boundary (`preemption.raise_in_warmup`:
  nothing saved, the next run redoes the warm-up exactly).
  """
  total = int(c.warmup.steps)
  opt = make_optimizer(lr=c.warmup.lr, schedule="cosine", warmup_steps=min(50, total),
                       total_steps=total, grad_clip=1.0)
  state = TrainState.create(state.params, opt.init(state.params))
  batch_fn = functools.partial(synthetic.sft_batch, batch_size=c.warmup.batch_size,
                               difficulty=c.task.difficulty, prompt_len=c.task.max_prompt_len,
                               response_len=c.rollout.max_new_tokens)
  run = jax.jit(functools.partial(warmup.run_warmup, batch_fn=batch_fn, optimizer=opt,
                                  model_config=exp.model_config))
  keys = jax.random.split(rng, total)
  t0 = time.perf_counter()
  losses = []
  for start in range(0, total, steps_per_call):
    done = min(start + steps_per_call, total)
    state, chunk = run(state, keys[start:done])
    losses.append(np.asarray(chunk))
    if done < total and preemption.stop_requested(done, warmup=True):
      preemption.raise_in_warmup(done, total)
  losses = np.concatenate(losses)
  return state, {"steps": total, "first_loss": float(losses[0]),
                 "final_loss": float(losses[-10:].mean()),
                 "seconds": time.perf_counter() - t0}


def format_summary(summary: dict[str, Any]) -> str:
  """The table `experiments.main` prints at the end."""
  b, a = summary["eval_before_rl"], summary["eval_after_rl"]
  keys = [("accuracy", "accuracy (sampled, pass@1)"), ("auroc", "AUROC conf. -> correct"),
          ("ece", "ECE (equal-mass bins)"), ("mean_entropy_correct", "entropy proxy, correct"),
          ("mean_entropy_wrong", "entropy proxy, wrong"),
          ("entropy_gap", "entropy gap (wrong - correct)"),
          ("response_length", "mean response length")]

  def fmt(d, k):
    if d.get(k) is None:
      return "undefined" if k in d or not d else "-"
    return f"{d[k]:.4f}"

  lines = [f"{'metric':32s} {'before RL':>12s} {'after RL':>12s}"]
  for k, name in keys:
    lines.append(f"{name:32s} {fmt(b, k):>12s} {fmt(a, k):>12s}")
  spi = summary.get("median_seconds_per_iteration")
  if spi:
    lines.append(f"median seconds per RL iteration: {spi:.3f}")
  lines.append(f"updates skipped as non-finite: {summary['nonfinite_skipped']}")
  return "\n".join(lines)
