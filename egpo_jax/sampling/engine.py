"""KV-cache rollout engine: G responses per prompt, with the old policy's log-probs.

`generate` repeats each prompt G times and decodes with the model's KV cache: one jitted
prefill over the B distinct prompts, then one jitted `lax.while_loop` that decodes a token
per row and stops as soon as every row has emitted an EOS token (or after
max_new_tokens). A prompt is encoded once, not G times.

Shared prompt cache. From `SamplingSpec.shared_prompt_min_len` prompt slots (the
bucket) on, a prompt's keys and values stay in the cache once per group
(`transformer.share_prefix`) instead of G times: the cache holds (G - 1) * P fewer slots
per prompt, and each step's attention reads them once for the G rows in one wider
product. Shorter prompts are repeated per row, because the grouped product's extra
reshapes cost more than the reads they save: on a 2-core CPU, attention for 64 rows with
8/2 heads of 64 was 1.1-1.4x slower shared at P = 16, and 1.25-1.35x faster at P = 64,
256 and 512.

The decode state (cache and buffers) is donated to the loop, so it is updated in place.
Before the loop the layer weights are unstacked (q/k/v and gate/up fused) and the cache is
laid out per layer (`transformer.decode_params`, `transformer.decode_layout`), so that a
step copies neither;
each step samples its token and scores it in one pass over the logits
(`filters.sample_with_logps`).

Exactness. The log-prob of each sampled token is log softmax(logits / T) over the full
vocabulary, untruncated (docs/METHOD.md section 1, Eq. 5's pi_old), which is what a
teacher-forced forward pass over prompt + completion gives (see `filters`). Greedy
decoding (greedy=True or temperature=0) reports temperature-1 log-probs.

Reproducibility. The random stream of response g of prompt i is
    key_ig = fold_in(fold_in(rng, prompt_ids_B[i]), g),  step t uses fold_in(key_ig, t),
so a response does not change when the batch around it, its padding or the device layout
changes (prompt_ids_B defaults to arange(B): pass dataset indices to make responses
independent of batch composition). Step t of row n draws one uniform from its key and
samples by inverse CDF; all N x T uniforms are drawn before the decode loop, so the loop
itself runs no random-number generator.

Recompiles. Prompts are left-padded to a power-of-two length bucket; the sampling
settings, group size, max_new_tokens and EOS ids are static. `compilation_counts()` says
how many times each jitted stage has been traced (= compiled) in this process.

Cache phases. Attention reads every slot of the cache, most of them still empty early in
a response, and on CPU that read was a quarter of the small model's decode time. So the
loop runs in up to `SamplingSpec.cache_phases` phases (each at least `MIN_PHASE_STEPS`
steps), each a `lax.while_loop` on a cache that holds only the slots its steps reach;
between phases the cache grows (`transformer.grow_cache`, one copy). Masked slots add
exact zeros, so the tokens and log-probs are those of one loop on the whole cache up to
float rounding. Each phase is one more loop body to compile.

`rollout` is the same computation as one pure function, without host checks or
bucketing, for callers that jit a whole RL iteration themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.models import sharding, transformer
from egpo_jax.sampling import filters


@flax.struct.dataclass
class Generation:
  """G responses per prompt, row n = b * G + g (prompt b, sample g).

  Attributes:
    completion_ids_NxT: int32 tokens; pad_id after the first EOS (and where never run).
    completion_mask_NxT: bool, True up to and including the first EOS.
    logps_NxT: float32 log softmax(logits / T) at the sampled token, 0 where masked.
    entropy_NxT: float32 Shannon entropy of softmax(logits / T), 0 where masked; None
      unless return_entropy=True.
    lengths_N: int32 number of valid tokens.
    truncated_N: bool, True if the row emitted no EOS within max_new_tokens.
    num_steps: int32 scalar, how many tokens per row were decoded before every row had
      finished (<= max_new_tokens).
  """
  completion_ids_NxT: jax.Array
  completion_mask_NxT: jax.Array
  logps_NxT: jax.Array
  entropy_NxT: jax.Array | None
  lengths_N: jax.Array
  truncated_N: jax.Array
  num_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
  """The static part of a rollout (hashable: one compilation per distinct value)."""
  group_size: int
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  pad_id: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  return_entropy: bool = False
  cache_phases: int = 4
  shared_prompt_min_len: int = 64

  def __post_init__(self):
    for name in ("group_size", "max_new_tokens", "cache_phases"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"SamplingSpec.{name} must be an int >= 1, got {value!r}")
    value = self.shared_prompt_min_len
    if not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"SamplingSpec.shared_prompt_min_len must be an int >= 0 (0: always "
                       f"share the prompt's cache), got {value!r}")
    eos = (self.eos_ids,) if isinstance(self.eos_ids, numbers.Integral) else self.eos_ids
    if not all(isinstance(i, numbers.Integral) and i >= 0 for i in eos):
      raise ValueError(f"SamplingSpec.eos_ids must be token ids >= 0, got {self.eos_ids!r}")
    # A tuple of ints, so the spec stays hashable (it is a static jit argument).
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in eos))
    filters.check_sampling_args(self.temperature, self.top_k, self.top_p,
                                greedy=self.greedy)

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0

  @property
  def logp_temperature(self) -> float:
    return 1.0 if self.is_greedy else self.temperature

  def shares_prompt(self, prompt_len: int) -> bool:
    """Whether a prompt (bucket) of this length is kept once per group in the cache."""
    return self.group_size > 1 and prompt_len >= self.shared_prompt_min_len


class DecodeState(flax.struct.PyTreeNode):
  """What the decode loop carries; `step` tokens per row have been sampled so far."""
  cache: transformer.KVCache
  uniforms_NxT: jax.Array | None
  last_tokens_N: jax.Array
  completion_ids_NxT: jax.Array
  logps_NxT: jax.Array
  entropy_NxT: jax.Array | None
  lengths_N: jax.Array
  done_N: jax.Array
  step: jax.Array


def response_keys(rng: jax.Array, prompt_ids_B: jax.Array, group_size: int) -> jax.Array:
  """fold_in(fold_in(rng, prompt_id), g) for every prompt and sample index, rows b*G+g."""
  chex.assert_rank(prompt_ids_B, 1)
  per_prompt = jax.vmap(lambda pid: jax.random.fold_in(rng, pid))(prompt_ids_B)
  samples_G = jnp.arange(group_size)
  keys_BxG = jax.vmap(lambda k: jax.vmap(lambda g: jax.random.fold_in(k, g))(samples_G))(
      per_prompt)
  return keys_BxG.reshape((-1,) + keys_BxG.shape[2:])


def step_uniforms(keys_N: jax.Array, num_steps: int) -> jax.Array:
  """uniform(fold_in(key_n, t)) for every row n and step t < num_steps: [N, T] float32."""
  steps_T = jnp.arange(num_steps)
  per_row = lambda key: jax.vmap(lambda t: jax.random.uniform(jax.random.fold_in(key, t)))(
      steps_T)
  return jax.vmap(per_row)(keys_N)


def _sample_into(state: DecodeState, logits_NxV: jax.Array, spec: SamplingSpec
                 ) -> DecodeState:
  """Samples token `state.step` of every row and writes it into the buffers."""
  if spec.is_greedy:
    uniforms_N = jnp.zeros(logits_NxV.shape[:1], jnp.float32)
  else:
    uniforms_N = jax.lax.dynamic_index_in_dim(state.uniforms_NxT, state.step, axis=1,
                                              keepdims=False)
  sample = functools.partial(
      filters.sample_with_logps, temperature=spec.temperature, top_k=spec.top_k,
      top_p=spec.top_p, greedy=spec.is_greedy, return_entropy=spec.return_entropy)
  mesh = sharding.active_mesh()
  if mesh is not None:
    # Each device samples its own rows: GSPMD gathered every row's logits for top-k
    # ([N, V] per step). The logits are whole per row (`decode_param_specs`).
    rows = sharding.batch_spec(uniforms_N.shape, mesh)
    sample = jax.shard_map(sample, in_specs=(rows, rows), out_specs=rows)
  tokens_N, logps_N, entropy_N = sample(uniforms_N, logits_NxV)
  active_N = ~state.done_N
  tokens_N = jnp.where(active_N, tokens_N, spec.pad_id)
  is_eos_N = jnp.isin(tokens_N, jnp.asarray(spec.eos_ids, jnp.int32)) if spec.eos_ids else (
      jnp.zeros_like(active_N))

  def write(buf_NxT, col_N):
    col_N = jnp.where(active_N, col_N, jnp.zeros_like(col_N))
    return jax.lax.dynamic_update_slice_in_dim(buf_NxT, col_N[:, None].astype(buf_NxT.dtype),
                                               state.step, axis=1)

  entropy_NxT = None
  if state.entropy_NxT is not None:
    entropy_NxT = write(state.entropy_NxT, entropy_N)
  return state.replace(
      last_tokens_N=tokens_N,
      completion_ids_NxT=jax.lax.dynamic_update_slice_in_dim(
          state.completion_ids_NxT, tokens_N[:, None], state.step, axis=1),
      logps_NxT=write(state.logps_NxT, logps_N),
      entropy_NxT=entropy_NxT,
      lengths_N=state.lengths_N + active_N.astype(jnp.int32),
      done_N=state.done_N | (active_N & is_eos_N),
      step=state.step + 1)


# A phase shorter than this saves less attention time than its loop body costs to compile.
MIN_PHASE_STEPS = 16


def cache_plan(prompt_len: int, max_new_tokens: int, phases: int) -> tuple[int, ...]:
  """The cache's slots in each decode phase; the last holds prompt_len + max_new_tokens - 1
  (the last sampled token is never fed back). Phases split the decode steps evenly, at
  most `phases` of them and none shorter than MIN_PHASE_STEPS steps."""
  steps = max_new_tokens - 1
  k = max(1, min(phases, steps // MIN_PHASE_STEPS))
  return tuple(prompt_len + -(-steps * (j + 1) // k) for j in range(k))


def _repeat_cache(cache: transformer.KVCache, group_size: int) -> transformer.KVCache:
  """Repeats each prompt's cache rows G times: row b -> rows b*G .. b*G+G-1."""
  return cache.replace(k=jnp.repeat(cache.k, group_size, axis=1),
                       v=jnp.repeat(cache.v, group_size, axis=1),
                       mask_BxS=jnp.repeat(cache.mask_BxS, group_size, axis=0),
                       positions_B=jnp.repeat(cache.positions_B, group_size, axis=0))


def _constrain(state: DecodeState) -> DecodeState:
  """Under a (data, fsdp, ...) mesh set with jax.set_mesh: rows split over data x fsdp.

  Without this, GSPMD may replicate the freshly made cache and buffers on every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding.BATCH) <= set(mesh.axis_names):
    return state
  constrain = jax.lax.with_sharding_constraint
  cache = jax.tree.map(constrain, state.cache, _cache_specs(state.cache, mesh))
  rows = state.replace(cache=None, step=None)
  rows = jax.tree.map(lambda x: constrain(x, sharding.batch_spec(x.shape, mesh)), rows)
  return rows.replace(cache=cache, step=state.step)


def _cache_specs(cache: transformer.KVCache, mesh) -> transformer.KVCache:
  """`sharding.cache_partition_specs` for a cache in `transformer.decode_layout` (and its
  shared prefix, whose prompts split like rows)."""

  def laid_out(values):
    num_layers, (batch, heads, slots, head_dim) = len(values), values[0].shape
    stacked = jax.ShapeDtypeStruct((num_layers, batch, slots, heads, head_dim),
                                   values[0].dtype)
    spec = sharding.cache_partition_specs(
        cache.replace(k=stacked, v=stacked,
                      mask_BxS=jax.ShapeDtypeStruct((batch, slots), jnp.bool_)), mesh)
    _, rows, _, kv_heads, dims = tuple(spec.k) + (None,) * (5 - len(spec.k))
    pspec = jax.sharding.PartitionSpec
    return (spec, (pspec(rows, kv_heads, dims, None),) * num_layers,
            (pspec(rows, kv_heads, None, dims),) * num_layers)

  specs, k, v = laid_out(cache.v)
  specs = specs.replace(k=k, v=v)
  if cache.prefix_v is not None:
    prefix, k, v = laid_out(cache.prefix_v)
    specs = specs.replace(prefix_k=k, prefix_v=v, prefix_mask_BpxP=prefix.mask_BxS)
  return specs


def start_rollout(params, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                  rng: jax.Array, prompt_ids_B: jax.Array, *, config, spec: SamplingSpec,
                  cache_dtype=None) -> DecodeState:
  """Prefills the B prompts, gives each one's cache slots to its G rows (shared or
  repeated, `SamplingSpec.shares_prompt`) and samples the first tokens."""
  chex.assert_rank([prompt_ids_BxP, prompt_mask_BxP, prompt_ids_B], [2, 2, 1])
  chex.assert_equal_shape([prompt_ids_BxP, prompt_mask_BxP])
  batch, prompt_len = prompt_ids_BxP.shape
  group, steps = spec.group_size, spec.max_new_tokens
  # Room for P + T - 1 slots (`cache_plan`), holding only the first phase's for now.
  plan = cache_plan(prompt_len, steps, spec.cache_phases)
  share = spec.shares_prompt(prompt_len)
  cache = transformer.init_cache(config, batch, plan[-1], dtype=cache_dtype,
                                 slots=prompt_len if share else plan[0])
  logits_BxV, cache = transformer.prefill(params, prompt_ids_BxP, prompt_mask_BxP, cache,
                                          config=config)
  # Laid out per layer for the decode loop (one copy, here).
  if share:
    cache = transformer.share_prefix(cache, group, plan[0])
  else:
    cache = transformer.decode_layout(_repeat_cache(cache, group))
  logits_NxV = jnp.repeat(logits_BxV, group, axis=0)
  n = batch * group
  state = DecodeState(
      cache=cache,
      uniforms_NxT=None if spec.is_greedy else step_uniforms(
          response_keys(rng, prompt_ids_B, group), steps),
      last_tokens_N=jnp.full((n,), spec.pad_id, jnp.int32),
      completion_ids_NxT=jnp.full((n, steps), spec.pad_id, jnp.int32),
      logps_NxT=jnp.zeros((n, steps), jnp.float32),
      entropy_NxT=jnp.zeros((n, steps), jnp.float32) if spec.return_entropy else None,
      lengths_N=jnp.zeros((n,), jnp.int32),
      done_N=jnp.zeros((n,), bool),
      step=jnp.zeros((), jnp.int32))
  return _sample_into(_constrain(state), logits_NxV, spec)


def continue_rollout(params, state: DecodeState, *, config, spec: SamplingSpec
                     ) -> DecodeState:
  """Decodes until every row is done or max_new_tokens tokens have been sampled: one
  `lax.while_loop` per phase of `cache_plan` that the state's cache has not passed."""

  # Sliced (and q/k/v, gate/up fused) once here: slicing the stacked layer weights inside
  # the loop copies them on every step.
  mesh = sharding.active_mesh()
  tensor_parallel = mesh is not None and mesh.shape["tensor"] > 1
  # In the compute dtype (the layers cast to it anyway), so the gathered copy is narrow.
  params = transformer.decode_params(transformer.compute_params(params, config),
                                     fuse=not tensor_parallel)
  if mesh is not None:
    # Gathered once, here, for every phase, not inside the token loop.
    # (XLA:CPU then keeps a float32 copy of them for its dots: the dry run's caveat.)
    params = jax.lax.with_sharding_constraint(params,
                                              sharding.decode_param_specs(params, mesh))

  def body(s):
    logits_NxV, cache = transformer.decode(params, s.last_tokens_N, s.cache, config=config)
    return _constrain(_sample_into(s.replace(cache=cache), logits_NxV, spec))

  # The cache's capacity is P + T - 1 slots, so it tells the prompt length.
  steps = state.completion_ids_NxT.shape[1]
  plan = cache_plan(state.cache.capacity - steps + 1, steps, spec.cache_phases)
  for slots in plan:
    if slots < state.cache.max_len:
      continue
    state = _constrain(state.replace(cache=transformer.grow_cache(state.cache, slots)))
    # The next slot to write must exist: cache.index < slots.
    cond = lambda s, slots=slots: ((s.step < spec.max_new_tokens) & ~jnp.all(s.done_N)
                                   & (s.cache.index < slots))
    state = jax.lax.while_loop(cond, body, state)
  return state


def finish_rollout(state: DecodeState) -> Generation:
  """The Generation a finished DecodeState holds (the cache is dropped)."""
  steps = state.completion_ids_NxT.shape[1]
  return Generation(
      completion_ids_NxT=state.completion_ids_NxT,
      completion_mask_NxT=jnp.arange(steps)[None, :] < state.lengths_N[:, None],
      logps_NxT=state.logps_NxT,
      entropy_NxT=state.entropy_NxT,
      lengths_N=state.lengths_N,
      truncated_N=~state.done_N,
      num_steps=state.step)


# The static sampler decodes every row to the same T: per-record caps need the slots of
# continuous batching (`sampling.continuous`), which stop each row at its own cap.
CAPS_NEED_SLOTS = ("per-record response caps (config.task.max_new_tokens_field) need "
                   "continuous batching: set rollout.slots > 0, or the field to ''")


def rollout(params, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array, rng: jax.Array,
            prompt_ids_B: jax.Array, *, config, spec: SamplingSpec,
            cache_dtype=None, caps_N: jax.Array | None = None) -> Generation:
  """`generate` as one pure, jittable function: no host checks, no length bucketing.

  `caps_N` is the rollout interface's per-response caps: only None is accepted
  (`CAPS_NEED_SLOTS`)."""
  if caps_N is not None:
    raise ValueError(CAPS_NEED_SLOTS)
  state = start_rollout(params, prompt_ids_BxP, prompt_mask_BxP, rng, prompt_ids_B,
                        config=config, spec=spec, cache_dtype=cache_dtype)
  return finish_rollout(continue_rollout(params, state, config=config, spec=spec))


_TRACES: collections.Counter = collections.Counter()


def compilation_counts() -> dict[str, int]:
  """How often `generate`'s jitted stages were traced (each trace is one compilation)."""
  return dict(_TRACES)


@functools.partial(jax.jit, static_argnames=("config", "spec", "cache_dtype"))
def _start_jit(params, prompt_ids_BxP, prompt_mask_BxP, rng, prompt_ids_B, *, config, spec,
               cache_dtype):
  _TRACES["prefill"] += 1
  return start_rollout(params, prompt_ids_BxP, prompt_mask_BxP, rng, prompt_ids_B,
                       config=config, spec=spec, cache_dtype=cache_dtype)


def _continue(params, state, cache, *, config, spec):
  _TRACES["decode"] += 1
  return continue_rollout(params, state.replace(cache=cache), config=config, spec=spec)


_continue_jit = jax.jit(_continue, static_argnames=("config", "spec"),
                        donate_argnames=("state", "cache"))
# A cache that the decode grows (several phases) cannot hold the result: donate the rest.
_continue_growing_jit = jax.jit(_continue, static_argnames=("config", "spec"),
                                donate_argnames=("state",))


@jax.jit
def _finish_jit(state):
  _TRACES["finish"] += 1
  return finish_rollout(state)


def bucket_length(length: int, minimum: int = 16) -> int:
  """The smallest power of two >= length (and >= minimum): the prompt-length bucket."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def generate(params, prompt_ids_BxP, prompt_mask_BxP, rng: jax.Array, *, config,
             group_size: int, max_new_tokens: int, eos_ids: int | Sequence[int],
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             greedy: bool = False, pad_id: int = 0, prompt_ids_B=None,
             return_entropy: bool = False, min_prompt_bucket: int = 16,
             cache_dtype=None, cache_phases: int = 4,
             shared_prompt_min_len: int = 64) -> Generation:
  """Samples `group_size` responses per prompt with the KV cache.

  Args:
    params: the model's parameters (any sharding; jit follows it).
    prompt_ids_BxP: int token ids, LEFT-padded.
    prompt_mask_BxP: 1 on prompt tokens, 0 on the left padding; every row needs a token.
    rng: a PRNG key (typed or raw).
    config: the model's ModelConfig (static).
    group_size: G responses per prompt; rows are ordered b * G + g.
    max_new_tokens: T, the completion buffer length.
    eos_ids: token id(s) that end a response (kept, masked in); () disables stopping.
    temperature: sampling temperature; 0 means greedy.
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    greedy: argmax decoding; log-probs then use temperature 1.
    pad_id: written after a row's EOS.
    prompt_ids_B: integer id of each prompt for its random stream (default arange(B)).
    return_entropy: also return the per-token Shannon entropy (EDGE-GRPO's quantity).
    min_prompt_bucket: prompts are left-padded to max(this, next power of two of P).
    cache_dtype: KV-cache dtype (default: the model's compute dtype).
    cache_phases: decode in up to this many loops on a growing cache (`cache_plan`); 1
      decodes in one loop on the whole cache (one compilation of the loop body).
    shared_prompt_min_len: keep a prompt's cache slots once per group (not G times) when
      its length bucket is at least this (0: always); see the module docstring.

  Returns:
    a `Generation` with N = B * G rows.
  """
  eos_tuple = _check_generate_args(prompt_ids_BxP, prompt_mask_BxP, config, group_size,
                                   max_new_tokens, eos_ids, pad_id)
  filters.check_sampling_args(temperature, top_k, top_p, config.vocab_size, greedy=greedy)
  greedy = bool(greedy) or temperature == 0
  spec = SamplingSpec(group_size=int(group_size), max_new_tokens=int(max_new_tokens),
                      eos_ids=eos_tuple, pad_id=int(pad_id),
                      # Greedy ignores these: one compilation for every greedy call.
                      temperature=1.0 if greedy else float(temperature),
                      top_k=0 if greedy else int(top_k), top_p=1.0 if greedy else float(top_p),
                      greedy=greedy, return_entropy=bool(return_entropy),
                      cache_phases=int(cache_phases),
                      shared_prompt_min_len=int(shared_prompt_min_len))
  batch, prompt_len = prompt_ids_BxP.shape
  if prompt_ids_B is None:
    prompt_ids_B = jnp.arange(batch, dtype=jnp.int32)
  else:
    prompt_ids_B = jnp.asarray(prompt_ids_B)
    if prompt_ids_B.shape != (batch,) or not jnp.issubdtype(prompt_ids_B.dtype, jnp.integer):
      raise ValueError(f"prompt_ids_B must be {batch} integers (one id per prompt), got "
                       f"shape {prompt_ids_B.shape} dtype {prompt_ids_B.dtype}")
  bucket = bucket_length(prompt_len, min_prompt_bucket)
  pad = ((0, 0), (bucket - prompt_len, 0))
  # Host arrays are padded on the host; device (possibly sharded) arrays on the device
  # (and not at all when P is already a bucket: an eager pad is one more dispatch).
  xp = np if isinstance(prompt_ids_BxP, np.ndarray) else jnp
  prompt_ids_BxP = xp.asarray(prompt_ids_BxP, np.int32)
  if bucket > prompt_len:
    prompt_ids_BxP = xp.pad(prompt_ids_BxP, pad, constant_values=spec.pad_id)
  xp = np if isinstance(prompt_mask_BxP, np.ndarray) else jnp
  prompt_mask_BxP = xp.asarray(prompt_mask_BxP, np.int32)
  if bucket > prompt_len:
    prompt_mask_BxP = xp.pad(prompt_mask_BxP, pad)
  state = _start_jit(params, prompt_ids_BxP, prompt_mask_BxP, rng, prompt_ids_B,
                     config=config, spec=spec, cache_dtype=cache_dtype)
  grows = state.cache.max_len < state.cache.capacity
  state = (_continue_growing_jit if grows else _continue_jit)(
      params, state.replace(cache=None), state.cache, config=config, spec=spec)
  return _finish_jit(state)


def _check_generate_args(prompt_ids_BxP, prompt_mask_BxP, config, group_size,
                         max_new_tokens, eos_ids, pad_id) -> tuple[int, ...]:
  """Host-side checks with errors that name the field; returns eos_ids as a tuple."""
  ids_shape, mask_shape = np.shape(prompt_ids_BxP), np.shape(prompt_mask_BxP)
  if len(ids_shape) != 2 or ids_shape != mask_shape:
    raise ValueError(f"prompt_ids_BxP and prompt_mask_BxP must both be [B, P]; got "
                     f"{ids_shape} and {mask_shape}")
  if not jnp.issubdtype(jnp.asarray(prompt_ids_BxP).dtype, jnp.integer):
    raise ValueError(f"prompt_ids_BxP must hold integer token ids, got dtype "
                     f"{jnp.asarray(prompt_ids_BxP).dtype}")
  for name, value in (("group_size", group_size), ("max_new_tokens", max_new_tokens)):
    if not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  vocab = config.vocab_size
  eos_tuple = (eos_ids,) if isinstance(eos_ids, numbers.Integral) else tuple(eos_ids)
  for name, ids in (("eos_ids", eos_tuple), ("pad_id", (pad_id,))):
    for i in ids:
      if not isinstance(i, numbers.Integral) or not 0 <= i < vocab:
        raise ValueError(f"{name} must be token ids in [0, {vocab}), got {ids!r}")
  if not isinstance(prompt_mask_BxP, jax.core.Tracer):
    mask = np.asarray(prompt_mask_BxP).astype(bool)
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
      raise ValueError(f"prompt_mask_BxP rows {np.flatnonzero(lengths == 0).tolist()} "
                       "have no prompt token; drop them or give each prompt a token")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
      raise ValueError("prompts must be LEFT-padded (mask 0...0 1...1 per row); pad on "
                       "the left, e.g. tokenizer padding_side='left'")
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
      raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) "
                       f"exceeds config.max_position_embeddings "
                       f"({config.max_position_embeddings}); lower max_new_tokens")
  return tuple(int(i) for i in eos_tuple)
