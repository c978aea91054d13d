"""One RL iteration with verification on the host, for tasks whose verifier is Python
(math-verify in worker processes). It runs the same pure pieces as the jitted loop
(`iteration.group_batch`, `prepare_batch`, `update.update`), one jitted phase at a time,
so each phase is timed, and DAPO's dynamic sampling can re-sample until the batch holds
only mixed groups (bounded tries).

Across processes (`placement` = `distributed.BatchPlacement`), each process samples its
own block of the global batch's prompts, the rollout and update run on the global,
mesh-sharded arrays, and each process decodes and verifies only its own responses.

Text on the host. A task that gives a `decode` function gets two things the token-level
jitted loop cannot do. Stop strings: a response ends after the first token whose
decoded prefix contains one of `stop_strings`; its later tokens are masked (padded,
log-prob 0) before it is verified and trained on, as if it had stopped there. The
reasoning delimiter (`delimiter_text`, e.g. "</think>") is located on the decoded text,
so that a BPE tokenisation other than the delimiter's own encoding (merged with a
neighbouring character, say) still splits thinking from answer; the tokens that spell
it are excluded from both segments, as in the token match. A delimiter that is one
token (a special token) keeps the token match, since decoding skips special tokens.
When more than half of an iteration's responses have no delimiter, their entropy proxy
falls back to the whole response (`segment_fallbacks`) and a warning says so.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from egpo_jax.core import losses
from egpo_jax.models.config import ModelConfig
from egpo_jax.sampling import engine
from egpo_jax.training import iteration
from egpo_jax.training import update as update_lib
from egpo_jax.types import TrainState


class HostTask(NamedTuple):
  """A task verified on the host.

  sample_prompts(rng, batch_size) -> (prompt_ids_BxP, prompt_mask_BxP, answers_B): token
  arrays (left-padded) and a sequence of per-prompt references; data-backed tasks read
  their iterator and may ignore rng. With several processes, each returns its own block
  of batch_size / process_count prompts. A fourth element caps_B (int, each in
  [1, max_new_tokens]) caps each prompt's G responses; the rollout gets them as caps_N
  (continuous batching, `sampling.continuous.HostRollout`, honours them; the static
  sampler refuses them), and DAPO's overlong penalty measures each response against its
  own cap (`iteration.shaped_rewards`).
  score(completion_ids_NxT, completion_mask_NxT, answers_N) -> correct_N (bool numpy):
  decodes and verifies; answers_N repeats each prompt's reference G times.
  decode(ids) -> str (optional): the tokenizer's decoding of one response's token ids,
  special tokens kept; needed for `stop_strings` and `delimiter_text` (module doc).
  """
  sample_prompts: Callable[[jax.Array, int], tuple[Any, Any, Sequence[Any]]]
  score: Callable[[np.ndarray, np.ndarray, Sequence[Any]], np.ndarray]
  decode: Callable[[Sequence[int]], str] | None = None
  stop_strings: tuple[str, ...] = ()
  delimiter_text: str | None = None


class SegmentFallbackWarning(UserWarning):
  """Most responses of an iteration have no reasoning delimiter."""


# Above this fraction of responses without a delimiter, the segment is mostly a fallback.
FALLBACK_WARN_RATE = 0.5


def _first_prefix(n: int, contains: Callable[[int], bool]) -> int:
  """The smallest L in [1, n] with contains(L), given contains(n) (monotone: binary search)."""
  lo, hi = 1, n
  while lo < hi:
    mid = (lo + hi) // 2
    if contains(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def stop_lengths(ids_NxT: np.ndarray, lengths_N: np.ndarray, decode: Callable,
                 stop_strings: Sequence[str]) -> np.ndarray:
  """Each response's length after cutting it at the end of the first stop string in its
  decoded text (the token that completes it is kept); unchanged where none occurs."""
  out = np.asarray(lengths_N).copy()
  for i, (ids, n) in enumerate(zip(ids_NxT, lengths_N)):
    n = int(n)
    if n and any(s in decode(ids[:n]) for s in stop_strings):
      out[i] = _first_prefix(n, lambda m, ids=ids: any(s in decode(ids[:m]) for s in stop_strings))
  return out


def delimiter_spans(ids_NxT: np.ndarray, lengths_N: np.ndarray, decode: Callable,
                    text: str) -> np.ndarray:
  """int32 [N, 2]: the token span [start, end) of the first `text` in each decoded
  response: end is the shortest prefix that contains it, start the last token from
  which the tokens up to end still spell it; [-1, -1] where it does not occur."""
  out = np.full((len(lengths_N), 2), -1, np.int32)
  for i, (ids, n) in enumerate(zip(ids_NxT, lengths_N)):
    n = int(n)
    if not n or text not in decode(ids[:n]):
      continue
    end = _first_prefix(n, lambda m, ids=ids: text in decode(ids[:m]))
    # The largest start with text in decode(ids[start:end]): search on end - start.
    width = _first_prefix(end, lambda w, ids=ids, end=end: text in decode(ids[end - w:end]))
    out[i] = (end - width, end)
  return out


@jax.jit
def _cut(gen: engine.Generation, lengths_N: jax.Array, pad_id: jax.Array) -> engine.Generation:
  """`gen` with each row cut to lengths_N tokens (masked, padded, log-prob 0)."""
  keep_NxT = jnp.arange(gen.completion_mask_NxT.shape[1])[None, :] < lengths_N[:, None]
  keep_NxT = keep_NxT & gen.completion_mask_NxT
  cut_N = lengths_N < gen.lengths_N
  return dataclasses.replace(
      gen, completion_ids_NxT=jnp.where(keep_NxT, gen.completion_ids_NxT, pad_id),
      completion_mask_NxT=keep_NxT, logps_NxT=jnp.where(keep_NxT, gen.logps_NxT, 0.0),
      entropy_NxT=(None if gen.entropy_NxT is None
                   else jnp.where(keep_NxT, gen.entropy_NxT, 0.0)),
      lengths_N=jnp.minimum(lengths_N, gen.lengths_N).astype(gen.lengths_N.dtype),
      truncated_N=gen.truncated_N & ~cut_N)


# The rollout phase: (params, prompt_ids_BxP, prompt_mask_BxP, rng, *, caps_N=None)
# -> engine.Generation with G responses per prompt (rows b * G + g) at the iteration's
# sampling settings. Every rollout takes caps_N, each row's response cap (int [N], or None
# for T), and honours it or refuses it (`engine.CAPS_NEED_SLOTS`). A streaming rollout
# (`streams = True`) also takes on_finished (`StreamingVerifier`).
RolloutFn = Callable[..., engine.Generation]


@functools.partial(jax.jit, static_argnames=("model_config", "settings"))
def _rollout(params, ids, mask, rng, caps_N=None, *, model_config, settings):
  return engine.rollout(params, ids, mask, rng, jnp.arange(ids.shape[0]),
                        config=model_config, spec=settings.sampling, caps_N=caps_N)


def jitted_rollout(model_config: ModelConfig, settings: iteration.IterationSettings
                   ) -> RolloutFn:
  """The default rollout of `host_iteration`: `engine.rollout` as one jitted call (the
  same sampler as the jitted loop; it refuses caps). Another engine plugs in as another
  `RolloutFn`."""
  return functools.partial(_rollout, model_config=model_config, settings=settings)


@functools.partial(jax.jit, static_argnames=("settings",))
def _group(ids, mask, gen, correct, overlong=None, caps_N=None, *, settings):
  return iteration.group_batch(ids, mask, gen, correct, settings, overlong, caps_N)


@functools.partial(jax.jit, static_argnames=("model_config", "settings", "optimizer",
                                             "placement"))
def _prepare_and_update(state, ref_params, groups, algo, rng, *, model_config, settings,
                        optimizer, placement=None):
  batch, metrics = iteration.prepare_batch(state.params, ref_params, groups, algo,
                                           model_config=model_config, settings=settings)
  state, update_metrics = update_lib.update(state, batch, rng, optimizer=optimizer,
                                            model_config=model_config,
                                            settings=settings.update,
                                            switches=algo.loss_switches(),
                                            group_size=settings.group_size)
  if getattr(placement, "state_shardings", None) is not None:
    # The state leaves as it came, so the next iteration's jits see the same shardings.
    state = jax.lax.with_sharding_constraint(state, placement.state_shardings)
  return state, {**metrics, **update_metrics}


@functools.partial(jax.jit, static_argnames=("model_config", "settings"))
def _prepare(params, ref_params, groups, algo, *, model_config, settings):
  return iteration.prepare_batch(params, ref_params, groups, algo,
                                 model_config=model_config, settings=settings)


# The same, donating the train state (the trainer does not reuse it): params and optimizer
# state are updated in place instead of being held twice.
_prepare_and_update_donated = jax.jit(_prepare_and_update.__wrapped__, donate_argnums=(0,),
                                      static_argnames=("model_config", "settings",
                                                       "optimizer", "placement"))


class _OneProcess:
  """The placement of a single-process run without a mesh: plain device arrays."""
  num_processes = 1

  @staticmethod
  def to_global(x):
    return jax.tree.map(jnp.asarray, x)

  @staticmethod
  def local_range(global_rows):
    return 0, global_rows

  @staticmethod
  def local_rows(x):
    return np.asarray(x)

  gather = local_rows


def _concat_groups(parts: list[iteration.GroupBatch]) -> iteration.GroupBatch:
  return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *parts)


class StreamingVerifier:
  """Verifies responses as a streaming rollout (`RolloutFn.streams`) reports them, in a
  background thread (one batch at a time: `HostTask.score` need not be thread-safe), so
  verification overlaps the decoding of the rest. Stop strings cut each response first,
  as the after-rollout path does."""

  def __init__(self, task: HostTask, answers_n: Sequence[Any], pad_id: int):
    import concurrent.futures  # only host mode's streaming path needs it
    self.task, self.answers_n, self.pad_id = task, answers_n, pad_id
    n = len(answers_n)
    self.correct_N = np.zeros((n,), bool)
    self.lengths_N = np.zeros((n,), np.int32)
    self.seen_N = np.zeros((n,), bool)
    self.busy_s = 0.0
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._futures = []

  def _score(self, resp_R, ids_RxT, lengths_R):
    t0 = time.perf_counter()
    if self.task.stop_strings:
      lengths_R = stop_lengths(ids_RxT, lengths_R, self.task.decode, self.task.stop_strings)
    mask_RxT = np.arange(ids_RxT.shape[1])[None] < np.asarray(lengths_R)[:, None]
    ids_RxT = np.where(mask_RxT, ids_RxT, self.pad_id)
    self.correct_N[resp_R] = np.asarray(self.task.score(
        ids_RxT, mask_RxT, [self.answers_n[r] for r in resp_R]), bool)
    self.lengths_N[resp_R] = lengths_R
    self.seen_N[resp_R] = True
    self.busy_s += time.perf_counter() - t0

  def submit(self, resp_R, ids_RxT, lengths_R) -> None:
    self._futures.append(self._executor.submit(self._score, np.asarray(resp_R),
                                               np.asarray(ids_RxT), np.asarray(lengths_R)))

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(correct_N, lengths_N after stop strings), once every batch is verified."""
    for f in self._futures:
      f.result()
    self._executor.shutdown()
    if not self.seen_N.all():
      raise RuntimeError(f"the streaming rollout never reported this process's responses "
                         f"{np.flatnonzero(~self.seen_N).tolist()[:8]}: across processes "
                         "its rows must be split over mesh axes that span the processes")
    return self.correct_N, self.lengths_N


def _submit_own(stream: "StreamingVerifier", start: int, resp_R, ids_RxT, lengths_R) -> None:
  """Hands a streaming rollout's finished rows (global row ids) that fall in this
  process's block [start, start + its N) to its verifier; rows a process holds beyond its
  block (replicated ones) are another's to verify. A row of the block never handed over
  fails `StreamingVerifier.result`."""
  local_R = np.asarray(resp_R) - start
  keep = (local_R >= 0) & (local_R < len(stream.answers_n))
  if keep.any():
    stream.submit(local_R[keep], np.asarray(ids_RxT)[keep], np.asarray(lengths_R)[keep])


def host_iteration(state: TrainState, rng: jax.Array, algo: iteration.AlgoArrays, *,
                   task: HostTask, model_config: ModelConfig,
                   optimizer: optax.GradientTransformation,
                   settings: iteration.IterationSettings, ref_params: Any = None,
                   max_tries: int = 1, placement: Any = None, donate: bool = False,
                   rollout: RolloutFn | None = None) -> tuple[TrainState, dict[str, Any]]:
  """sample -> rollout -> verify (host) -> [re-sample for mixed groups] -> advantages ->
  update, with seconds per phase in the metrics. With dynamic sampling off and one try,
  it computes exactly what `iteration.rl_iteration` computes for the same rng.

  `placement` (a `distributed.BatchPlacement`) splits the prompts and the verification
  over processes; `process_prompts`, `process_rollouts` and `process_verified` count this
  process's share. `donate` lets the update reuse the buffers of `state`. `rollout`
  samples the responses (default `jitted_rollout(model_config, settings)`).
  """
  place = _OneProcess() if placement is None else placement
  rollout = rollout or jitted_rollout(model_config, settings)
  if (task.stop_strings or task.delimiter_text) and task.decode is None:
    raise ValueError("HostTask.stop_strings/delimiter_text need HostTask.decode")
  b = settings.prompts_per_batch
  b_local = b // place.num_processes
  g = settings.group_size
  k_prompts, k_rollout, k_update = jax.random.split(rng, 3)
  dynamic = settings.dynamic_sampling_oversample > 1
  times = {"rollout": 0.0, "verify": 0.0}
  kept: list[iteration.GroupBatch] = []
  num_kept, tries, sampled = 0, 0, 0
  counts = {"process_prompts": 0, "process_rollouts": 0, "process_verified": 0}
  # A rollout on its own mesh (`distributed.RolloutOnMesh`) gets the params resharded
  # there once per iteration, whatever the tries.
  rollout_params = getattr(rollout, "prepare_params", lambda p: p)(state.params)
  while True:
    # The first try uses the iteration's keys; later tries fold in the try index.
    kp = k_prompts if tries == 0 else jax.random.fold_in(k_prompts, tries)
    kr = k_rollout if tries == 0 else jax.random.fold_in(k_rollout, tries)
    t0 = time.perf_counter()
    ids, mask, answers, *caps = task.sample_prompts(kp, b_local)
    ids, mask = place.to_global((ids, mask))
    answers_n = [a for a in answers for _ in range(g)]
    # A streaming rollout (continuous batching) hands finished responses to the verifier
    # while it decodes the others; each process gets its own rows (global row ids).
    stream = (StreamingVerifier(task, answers_n, settings.sampling.pad_id)
              if getattr(rollout, "streams", False) else None)
    extra = {} if stream is None else {"on_finished": functools.partial(
        _submit_own, stream, place.local_range(b * g)[0])}
    # Each prompt's cap for each of its responses (rows b * G + g); None: T for all.
    caps_N = (place.to_global(np.repeat(np.asarray(caps[0], np.int32), g)) if caps
              else None)
    # Every row's cap on every process: the rollout's queue is global.
    extra["caps_N"] = None if caps_N is None else place.gather(caps_N)
    gen = jax.block_until_ready(rollout(rollout_params, ids, mask, kr, **extra))
    t1 = time.perf_counter()
    if stream is not None:
      correct, lengths = stream.result()
      times["verify_hidden"] = times.get("verify_hidden", 0.0) + max(
          0.0, stream.busy_s - (time.perf_counter() - t1))
      if task.stop_strings:
        gen = _cut(gen, place.to_global(lengths), jnp.int32(settings.sampling.pad_id))
      ids_local = place.local_rows(gen.completion_ids_NxT)
    else:
      if task.stop_strings:
        lengths = stop_lengths(place.local_rows(gen.completion_ids_NxT),
                               place.local_rows(gen.lengths_N), task.decode,
                               task.stop_strings)
        gen = _cut(gen, place.to_global(lengths), jnp.int32(settings.sampling.pad_id))
      ids_local = place.local_rows(gen.completion_ids_NxT)
      correct = np.asarray(task.score(ids_local, place.local_rows(gen.completion_mask_NxT),
                                      answers_n), bool)
    counts["process_prompts"] += len(answers)
    counts["process_rollouts"] += len(ids_local)
    counts["process_verified"] += len(correct)
    times["rollout"] += t1 - t0
    times["verify"] += time.perf_counter() - t1
    groups = _group(ids, mask, gen, place.to_global(correct), algo.overlong, caps_N,
                    settings=settings)
    if task.delimiter_text:
      spans = delimiter_spans(ids_local, place.local_rows(gen.lengths_N), task.decode,
                              task.delimiter_text)
      span_BxGx2 = place.to_global(spans).reshape(-1, g, 2)
      groups = groups._replace(gen={**groups.gen, "delimiter_span_Nx2": span_BxGx2})
    tries += 1
    sampled += b
    if not dynamic:
      kept = [groups]
      break
    keep_b = place.gather(losses.dynamic_sampling_filter(groups.correct, groups.valid).any(-1))
    if keep_b.any():
      kept.append(jax.tree.map(lambda x: x[np.flatnonzero(keep_b)], groups))
      num_kept += int(keep_b.sum())
    if num_kept >= b or tries >= max_tries:
      break

  del rollout_params   # not held through the update
  if dynamic:
    fill = min(num_kept, b)
    if num_kept < b:
      # Too few mixed groups within max_tries: pad with the last groups, masked out.
      pad = jax.tree.map(lambda x: x[:b - num_kept], groups)
      kept.append(pad._replace(valid=jnp.zeros_like(pad.valid)))
    groups = jax.tree.map(lambda x: x[:b], _concat_groups(kept))
    fill_rate = fill / b
  else:
    fill_rate = 1.0

  t2 = time.perf_counter()
  if settings.update.length_buckets:
    # The length-bucketed update is host-driven (one compiled gradient per bucket).
    batch, metrics = _prepare(state.params, ref_params, groups, algo,
                              model_config=model_config, settings=settings)
    state, update_metrics = update_lib.bucketed_update(
        state, batch, k_update, optimizer=optimizer, model_config=model_config,
        settings=settings.update, switches=algo.loss_switches(),
        length_buckets_count=settings.update.length_buckets, donate=donate)
    if getattr(placement, "state_shardings", None) is not None:
      state = jax.device_put(state, placement.state_shardings)
    metrics = {**jax.device_get(metrics), **update_metrics}
  else:
    update_fn = _prepare_and_update_donated if donate else _prepare_and_update
    state, metrics = update_fn(state, ref_params, groups, algo, k_update,
                               model_config=model_config, settings=settings,
                               optimizer=optimizer, placement=placement)
    metrics = jax.device_get(metrics)
  times["update"] = time.perf_counter() - t2
  metrics.update({f"time_{k}": v for k, v in times.items()})
  metrics["dynamic_sampling_fill_rate"] = fill_rate
  metrics["dynamic_sampling_tries"] = tries
  metrics["prompts_sampled"] = sampled
  metrics.update(counts)
  metrics.update(getattr(rollout, "last_stats", {}))
  metrics["rollout_tokens_per_s"] = float(metrics["rollout_tokens"]) / max(times["rollout"],
                                                                           1e-9)
  if (settings.entropy_segment != "joint"
      and float(metrics["segment_fallbacks"]) > FALLBACK_WARN_RATE * b * g):
    warnings.warn(
        f"more than {FALLBACK_WARN_RATE:.0%} of an iteration's responses have no reasoning "
        f"delimiter ({task.delimiter_text or settings.segment_delimiter}): their entropy "
        "proxy falls back to the whole response (metric segment_fallbacks)",
        SegmentFallbackWarning, stacklevel=2)
  return state, metrics
