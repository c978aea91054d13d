"""Continuous batching: a fixed number of decode slots that take the next pending
(prompt, sample) as soon as a response ends, so no decode step goes to a finished row.

The static sampler (`engine.generate`) decodes B x G rows in one loop that stops when the
last row stops; with math responses of 300-1,500 tokens and a few at the 3,072 cap, most
of its row-steps go to rows that have already finished, and its cache holds B x G full
rows. Here the cache holds S slots (`ContinuousSpec.slots`), whatever B x G is:

  * Prompt table. The B prompts are prefilled once, in one batch (`prefill_table`), into a
    table of B entries: per layer keys [B, kv heads, head_dim, P] and values
    [B, kv heads, P, head_dim] (`transformer.share_prefix`'s prefix layout), the prompt
    mask, its length and the logits of its last token. With `ContinuousSpec.table_entries`
    E < B the table has E entries, carried by the loop: an entry is freed when its
    prompt's G responses have finished and the next prompt (in order of first place in the
    queue) is prefilled into it inside the loop (`_load`, one [1, P] prefill per prompt,
    so its keys do not depend on the entry or step); the queue waits at the first prompt
    not yet loaded. A queue that keeps more than E prompts open at once could wait
    forever and is refused (`max_open_prompts`); FIFO keeps one open.
  * Slots. Each of the S slots holds one response at a time: its own T - 1 cache slots
    (the response's fed-back tokens) and a pointer to its prompt's table entry
    (`slot_resp_S[s] // G`), whose keys and values each decode step gathers as the slot's
    prefix (`transformer.decode` with a prefix of one row per slot).
  * Queue. Responses are taken in `order_N` (default n = b * G + g, FIFO); a slot whose
    response ended (a stop token: `SamplingSpec.eos_ids`, which the config's extra stop
    ids join, or its cap `caps_N[n]`) takes the next one in the same loop iteration, so
    every busy slot emits a token every step. A fresh slot's first token comes from its
    table entry's logits; its decode that step is discarded.

Why a gather per step rather than `share_prefix`'s grouped read or a copy at refill:
slots of one prompt are not adjacent once refills scatter them, so the grouped product
(one [G * r, head_dim] @ [head_dim, P] read per group) has no group to serve; and copying
the prompt into the slot's cache at refill (a second in-place write into the loop-carried
cache, after decode's) made XLA:CPU copy every layer's whole cache at every step (checked
in the compiled loop, tests/sampling). The gather moves S x P keys and values per layer
and step, a fraction of the S x (P + T - 1) that attention reads anyway.

Attention. `decode_attention="full"` reads every slot's P + T - 1 slots (masked) at every
step, what the static sampler's last cache phase reads. "bounded" reads each slot's
prompt entry and only the blocks of its own slots that hold its response so far
(`attention._attend_one_paged`: the live (slot, block) pairs are gathered S at a time in
a loop whose trip count follows their number, and each slot's block partials are
combined over a fixed axis, so a slot's result does not depend on its neighbours).
"pallas" reads the same blocks in a Pallas kernel (`attention.attend_one_pallas`: one
program per slot, kv head and block, past a slot's used blocks a program reads nothing),
with the same partials and merge; Triton on GPU, Mosaic on TPU (attention_block a
multiple of 128 there), the Pallas interpreter on a CPU (parity only, slow). On the
rollout_lengths workload (S = 64, P = 64, T = 512) that is 164 key slots per slot and step
on average (prompt included, idle slots none), against 575 (a host replay of the schedule).

Refill decisions are made inside the jitted `lax.while_loop`, at every step, with no
host round trip. The loop may be cut into chunks of `chunk_steps` steps (one jitted call
each, the same compiled loop): between chunks the host sees which responses finished and
can hand them to a verifier (`on_finished`) while the next chunk decodes (JAX's
asynchronous dispatch queues chunk k + 1 before the host reads chunk k's results).
Chunking does not change any token: a chunk boundary only stops the loop and resumes it.

Determinism. Response n's step t draws uniform(fold_in(key_n, t)), key_n as in
`engine.response_keys`, so its tokens are those of `engine.step_uniforms`' stream. A
response stays in one slot from its first token to its last and writes its own t-th key
at the slot's own cache slot t whatever the slot, so its computation does not depend on the
slot it lands in, its neighbours, the step it starts at or the queue's order (rows of the
batched matmuls are computed independently); tests check bit-identity under permuted
queues. Compiled shapes depend on (S, B, G, P bucket, T) only: caps, order and stop
conditions are data.

Memory: the cache is S x (T - 1) slots plus the table's E x P (each prompt once, E = B by
default), against the static sampler's B x G x (P + T - 1) (or B x P + B x G x (T - 1)
with a shared prefix); the outputs are N x T as before. Under a mesh the slots split over
the batch axes and the table is whole on every device (any slot may read any entry; made
whole once, at the prefill, not gathered by every chunk). A bf16 cache and table are
carried as their uint16 bits (`_bits`), which XLA:CPU writes and gathers without
float32 copies of every layer's whole buffer; the values are the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.models import sharding, transformer
from egpo_jax.sampling import engine, filters


DECODE_ATTENTION = ("full", "bounded", "pallas")


@dataclasses.dataclass(frozen=True)
class ContinuousSpec:
  """The static part of a continuous-batching rollout (one compilation per value).

  sampling: the sampler's settings; its `eos_ids` are all the stop tokens (EOS and any
    extra stop ids), `max_new_tokens` is T (the largest cap), `cache_phases` and
    `shared_prompt_min_len` are unused.
  slots: S, decode slots (rows of the decode step).
  decode_attention: "full" reads every own cache slot of every slot at every step;
    "bounded" reads only each slot's used blocks of `attention_block` own slots
    (`attention._attend_one_paged`; the own slots are rounded up to whole blocks). With
    one block (T - 1 <= attention_block) it reads as "full" (nothing to skip). "pallas":
    the blocks "bounded" reads, read by `attention.attend_one_pallas`.
  attention_block: own slots per block for "bounded" and "pallas" (at most T - 1 is used;
    rollout.read_block).
  table_entries: E, prompt-table entries; 0 (or >= B) holds all B prompts, prefilled at
    the start in one batch. 0 < E < B: entries are freed as their prompt's G responses
    finish and the next prompt is prefilled into them inside the loop (`_load`).
  """
  sampling: engine.SamplingSpec
  slots: int
  decode_attention: str = "full"
  attention_block: int = 64
  table_entries: int = 0

  def __post_init__(self):
    if not isinstance(self.slots, numbers.Integral) or self.slots < 1:
      raise ValueError(f"ContinuousSpec.slots must be an int >= 1 (rollout.slots), got "
                       f"{self.slots!r}")
    if self.decode_attention not in DECODE_ATTENTION:
      raise ValueError(f"ContinuousSpec.decode_attention must be one of {DECODE_ATTENTION} "
                       f"(rollout.decode_attention), got {self.decode_attention!r}")
    if not isinstance(self.attention_block, numbers.Integral) or self.attention_block < 1:
      raise ValueError(f"ContinuousSpec.attention_block must be an int >= 1, got "
                       f"{self.attention_block!r}")
    if not isinstance(self.table_entries, numbers.Integral) or self.table_entries < 0:
      raise ValueError(f"ContinuousSpec.table_entries must be an int >= 0 "
                       f"(rollout.table_entries; 0 = all prompts), got {self.table_entries!r}")

  def entries(self, num_prompts: int) -> int:
    """Prompt-table entries for a batch of num_prompts prompts."""
    e = self.table_entries
    return num_prompts if e == 0 or e >= num_prompts else e

  @property
  def read_block(self) -> int:
    """Own slots per attention block ("bounded"); the own slots are a multiple of it."""
    return min(self.attention_block, max(self.sampling.max_new_tokens - 1, 1))

  @property
  def own_slots(self) -> int:
    """Own cache slots per decode slot: T - 1 (the last sampled token is never fed),
    rounded up to whole blocks for "bounded"."""
    own = max(self.sampling.max_new_tokens - 1, 1)
    if self.decode_attention == "full":
      return own
    return -(-own // self.read_block) * self.read_block


class PromptTable(flax.struct.PyTreeNode):
  """The B prompts, prefilled once: keys/values in `share_prefix`'s prefix layout, a
  16-bit float type held as its bits (`_bits`: read through a per-step gather, XLA:CPU
  otherwise kept a float32 copy of every layer's whole table)."""
  k: tuple[jax.Array, ...]          # per layer [B, kv heads, head_dim, P]
  v: tuple[jax.Array, ...]          # per layer [B, kv heads, P, head_dim]
  mask_BxP: jax.Array               # bool, left-padded prompt tokens
  lengths_B: jax.Array              # int32, real prompt tokens (position of token 0)
  logits_BxV: jax.Array             # float32, logits at the last prompt token
  dtype: object = flax.struct.field(pytree_node=False, default=None)   # of k and v


class SlotState(flax.struct.PyTreeNode):
  """What the decode loop carries.

  slot_resp_S: the response each slot holds (N: idle); slot_t_S: tokens of it sampled so
  far; fresh_S: the slot took its response this step (its next token comes from the
  prompt table's logits). lengths_N: tokens per response (set when it finishes);
  finished_N: it finished (stop token or cap); stopped_N: by a stop token; finish_step_N:
  the loop step it finished at (-1: not yet). busy: slot-steps that emitted a token.
  """
  cache: transformer.KVCache
  slot_resp_S: jax.Array
  slot_t_S: jax.Array
  fresh_S: jax.Array
  last_tokens_S: jax.Array
  next_q: jax.Array
  completion_ids_NxT: jax.Array
  logps_NxT: jax.Array
  entropy_NxT: jax.Array | None
  lengths_N: jax.Array
  finished_N: jax.Array
  stopped_N: jax.Array
  finish_step_N: jax.Array
  step: jax.Array
  busy: jax.Array
  # A table of E < B entries (`ContinuousSpec.table_entries`), carried by the loop: the
  # prompt in each entry (B: free), each prompt's entry, its unfinished responses, the
  # load order (prompts by first place in the queue), each prompt's first queue place,
  # the next prompt to load, and whether the loop stalled (no slot could start).
  table: PromptTable | None = None
  entry_prompt_E: jax.Array | None = None
  prompt_entry_B: jax.Array | None = None
  left_B: jax.Array | None = None
  load_order_B: jax.Array | None = None
  first_B: jax.Array | None = None
  next_load: jax.Array | None = None
  stalled: jax.Array | None = None


@flax.struct.dataclass
class ContinuousGeneration(engine.Generation):
  """An `engine.Generation` (row n = b * G + g) plus the slot statistics.

  truncated_N: the response ended at its cap without a stop token. num_steps: decode
  steps run. busy_slot_steps: slot-steps that emitted a token (utilisation = busy /
  (slots x num_steps)). finish_step_N: the step each response finished at.
  """
  busy_slot_steps: jax.Array
  finish_step_N: jax.Array

  def generation(self) -> engine.Generation:
    """The `engine.Generation` part alone (what the static sampler returns)."""
    return engine.Generation(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(engine.Generation)})


def prefill_table(params, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array, *,
                  config, cache_dtype=None) -> PromptTable:
  """Prefills the B (left-padded) prompts once, in one batch."""
  chex.assert_rank([prompt_ids_BxP, prompt_mask_BxP], 2)
  chex.assert_equal_shape([prompt_ids_BxP, prompt_mask_BxP])
  batch, prompt_len = prompt_ids_BxP.shape
  cache = transformer.init_cache(config, batch, prompt_len, dtype=cache_dtype)
  logits_BxV, cache = transformer.prefill(params, prompt_ids_BxP, prompt_mask_BxP, cache,
                                          config=config)
  laid = transformer.decode_layout(cache)
  return PromptTable(k=tuple(map(_bits, laid.k)), v=tuple(map(_bits, laid.v)),
                     mask_BxP=cache.mask_BxS, lengths_B=cache.positions_B,
                     logits_BxV=logits_BxV, dtype=jnp.dtype(laid.k[0].dtype))


def empty_table(config, entries: int, prompt_len: int, cache_dtype=None) -> PromptTable:
  """A table of `entries` free entries (no valid key) for prompts of prompt_len slots."""
  dtype = transformer.to_dtype(config.dtype) if cache_dtype is None else cache_dtype
  kv, hd = config.num_kv_heads, config.head_size
  return PromptTable(
      k=tuple(_bits(jnp.zeros((entries, kv, hd, prompt_len), dtype))
              for _ in range(config.num_layers)),
      v=tuple(_bits(jnp.zeros((entries, kv, prompt_len, hd), dtype))
              for _ in range(config.num_layers)),
      dtype=jnp.dtype(dtype),
      mask_BxP=jnp.zeros((entries, prompt_len), bool),
      lengths_B=jnp.zeros((entries,), jnp.int32),
      logits_BxV=jnp.zeros((entries, config.vocab_size), jnp.float32))


def _load(state: SlotState, params, prompts, *, config) -> SlotState:
  """Frees the entries whose prompt's responses all finished and prefills the next
  prompts (in load order) into free entries, one [1, P] prefill each (so a prompt's keys
  do not depend on the entry or the step it is loaded at)."""
  ids_BxP, mask_BxP = prompts
  b = ids_BxP.shape[0]
  done_E = (state.entry_prompt_E < b) & (
      state.left_B[jnp.minimum(state.entry_prompt_E, b - 1)] == 0)
  state = state.replace(entry_prompt_E=jnp.where(done_E, b, state.entry_prompt_E))

  def more(s):
    return jnp.any(s.entry_prompt_E >= b) & (s.next_load < b)

  def load(s):
    e = jnp.argmax(s.entry_prompt_E >= b).astype(jnp.int32)
    p = s.load_order_B[s.next_load]
    one = prefill_table(params, jax.lax.dynamic_slice_in_dim(ids_BxP, p, 1),
                        jax.lax.dynamic_slice_in_dim(mask_BxP, p, 1), config=config,
                        cache_dtype=s.table.dtype)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), e, 0)
    table = jax.tree.map(put, s.table, one)
    return s.replace(table=table, entry_prompt_E=s.entry_prompt_E.at[e].set(p),
                     prompt_entry_B=s.prompt_entry_B.at[p].set(e), next_load=s.next_load + 1)

  return jax.lax.while_loop(more, load, state)


def _queue_limit(state: SlotState, n: int) -> jax.Array:
  """The first queue place whose prompt is not loaded (n: none)."""
  if state.table is None:
    return jnp.asarray(n, jnp.int32)
  b = state.load_order_B.shape[0]
  nxt = state.load_order_B[jnp.minimum(state.next_load, b - 1)]
  return jnp.where(state.next_load < b, state.first_B[nxt], n)


def _whole_table(table: PromptTable | None) -> PromptTable | None:
  """Under a (data, fsdp, ...) mesh: the table whole on every device of the batch axes
  (`sharding.prompt_table_specs`), so a decode chunk reads it without gathering it."""
  mesh = sharding.active_mesh()
  if table is None or mesh is None:
    return table
  # From prompts split over the batch axes (as prefilled; the logits' vocabulary over
  # tensor, as the head's): left to itself, XLA gathered the whole head instead.
  constrain = jax.lax.with_sharding_constraint
  table = constrain(table, sharding.prompt_table_specs(table, mesh, as_prefilled=True))
  return constrain(table, sharding.prompt_table_specs(table, mesh))


def _constrain(state: SlotState) -> SlotState:
  """Under a (data, fsdp, ...) mesh: the slots (and the cache's rows) split over data x
  fsdp, the per-response outputs too, the prompt table whole; scalars replicated."""
  mesh = sharding.active_mesh()
  if mesh is None:
    return state
  constrain = jax.lax.with_sharding_constraint
  # The cache's index is per slot here: shard it like the rows.
  cache = state.cache
  cache = jax.tree.map(constrain, cache.replace(index=jnp.zeros((), jnp.int32)),
                       engine._cache_specs(cache.replace(index=jnp.zeros((), jnp.int32)),
                                           mesh)).replace(index=cache.index)
  entry_fields = ("table", "entry_prompt_E", "prompt_entry_B", "left_B", "load_order_B",
                  "first_B", "next_load", "stalled")
  rows = state.replace(cache=None, next_q=None, step=None, busy=None,
                       **{f: None for f in entry_fields})
  rows = jax.tree.map(lambda x: constrain(x, sharding.batch_spec(x.shape, mesh)), rows)
  return rows.replace(cache=cache, next_q=state.next_q, step=state.step, busy=state.busy,
                      **{f: getattr(state, f) for f in entry_fields}).replace(
                          table=_whole_table(state.table))


def _bits(x: jax.Array) -> jax.Array:
  """A 16-bit float array as its uint16 bits (others unchanged).

  The slots' cache is carried as bits: XLA:CPU runs a bf16 scatter (each step's new key
  per slot) on a float32 copy of the whole buffer, and a bitcast between the carried bf16
  buffer and an integer view is a copy there too, each layer's alive at once (2.8 GB per
  device for 7B on 16 devices). Carried as bits, the bitcasts around `transformer.decode`
  cancel and its scatter writes the carried buffer in place. Free on a GPU or TPU."""
  if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _floats(x: jax.Array, dtype) -> jax.Array:
  """`_bits`' inverse (dtype: the float type the bits are of)."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def _refill(state: SlotState, table: PromptTable, order_N: jax.Array, group_size: int
            ) -> SlotState:
  """Gives every free slot (idle or just finished) the next queued response, FIFO over
  the free slots in slot order, and empties its own cache slots."""
  n = order_N.shape[0]
  free_S = state.slot_resp_S >= n
  rank_S = jnp.cumsum(free_S.astype(jnp.int32)) - 1
  q_S = state.next_q + rank_S
  # With a table of E < B entries the queue waits at the first unloaded prompt.
  take_S = free_S & (q_S < _queue_limit(state, n))
  new_resp_S = jnp.where(take_S, order_N[jnp.minimum(q_S, n - 1)], n)
  slot_resp_S = jnp.where(free_S, new_resp_S, state.slot_resp_S)
  next_q = state.next_q + jnp.sum(take_S, dtype=jnp.int32)

  # A refilled slot's own slots start empty (their stale keys and values stay, masked).
  cache = state.cache.replace(
      mask_BxS=jnp.where(take_S[:, None], False, state.cache.mask_BxS))
  return state.replace(cache=cache, slot_resp_S=slot_resp_S,
                       slot_t_S=jnp.where(free_S, 0, state.slot_t_S),
                       fresh_S=take_S | (state.fresh_S & ~free_S), next_q=next_q)


def _step(params, state: SlotState, table: PromptTable, keys_N: jax.Array,
          caps_N: jax.Array, order_N: jax.Array, *, config, spec: ContinuousSpec,
          prompts=None, stacked_params=None) -> SlotState:
  """One decode step of every slot: sample, record, finish, refill. With a table of
  E < B entries (state.table) the refill comes first: free and load entries, refill, then
  decode (the same schedule: a slot freed at step k starts at step k + 1 either way)."""
  sspec = spec.sampling
  g, n = sspec.group_size, order_N.shape[0]
  entries = state.table is not None
  if entries:
    state = _refill(_load(state, stacked_params, prompts, config=config), table, order_N, g)
    state = state.replace(stalled=~jnp.any(state.slot_resp_S < n))
    table = state.table
  prompt_len = table.mask_BxP.shape[1]
  active_S = state.slot_resp_S < n
  resp_S = jnp.minimum(state.slot_resp_S, n - 1)
  prompt_S = resp_S // g
  # The slot's table entry (its prompt's, with all B prompts in the table).
  entry_S = state.prompt_entry_B[prompt_S] if entries else prompt_S
  t_S = state.slot_t_S
  # Feed token t - 1 at own slot P + t - 1, position len + t - 1 (fresh slots: a dummy at
  # slot P, overwritten by their token 0 next step).
  fed_S = jnp.maximum(t_S - 1, 0)
  # Each slot reads its prompt's table entry as its prefix (gathered by slot -> prompt).
  dtype = table.dtype
  cache = state.cache.replace(
      k=tuple(_floats(k, dtype) for k in state.cache.k),
      v=tuple(_floats(v, dtype) for v in state.cache.v),
      index=prompt_len + fed_S, positions_B=table.lengths_B[entry_S] + fed_S,
      prefix_k=tuple(_floats(k[entry_S], dtype) for k in table.k),
      prefix_v=tuple(_floats(v[entry_S], dtype) for v in table.v),
      prefix_mask_BpxP=table.mask_BxP[entry_S])
  read_slots_S = None
  if spec.decode_attention != "full" and spec.own_slots > spec.read_block:
    # Own slots [0, t - 1] hold the response's fed tokens (this step's included); a fresh
    # or idle slot's output is discarded, so it reads the prompt alone.
    read_slots_S = jnp.where(active_S & ~state.fresh_S, fed_S + 1, 0)
  logits_SxV, cache = transformer.decode(params, state.last_tokens_S, cache, config=config,
                                         read_slots_B=read_slots_S,
                                         read_block=spec.read_block,
                                         read_kernel=("pallas" if spec.decode_attention ==
                                                      "pallas" else "xla"))
  cache = cache.replace(k=tuple(_bits(k) for k in cache.k), v=tuple(_bits(v) for v in cache.v),
                        prefix_k=None, prefix_v=None, prefix_mask_BpxP=None)
  logits_SxV = jnp.where(state.fresh_S[:, None], table.logits_BxV[entry_S], logits_SxV)
  if sspec.is_greedy:
    uniforms_S = jnp.zeros(t_S.shape, jnp.float32)
  else:
    uniforms_S = jax.vmap(lambda key, t: jax.random.uniform(jax.random.fold_in(key, t)))(
        keys_N[resp_S], t_S)
  tokens_S, logps_S, entropy_S = filters.sample_with_logps(
      uniforms_S, logits_SxV, temperature=sspec.temperature, top_k=sspec.top_k,
      top_p=sspec.top_p, greedy=sspec.is_greedy, return_entropy=sspec.return_entropy)
  stop_S = (jnp.isin(tokens_S, jnp.asarray(sspec.eos_ids, jnp.int32)) if sspec.eos_ids
            else jnp.zeros_like(active_S))
  done_S = active_S & (stop_S | (t_S + 1 >= caps_N[resp_S]))
  # Idle slots write to row N, which the scatter drops.
  row_S = jnp.where(active_S, resp_S, n)

  def put(buf_NxT, col_S):
    return buf_NxT.at[row_S, t_S].set(col_S.astype(buf_NxT.dtype), mode="drop")

  def put_n(buf_N, col_S):
    return buf_N.at[jnp.where(done_S, resp_S, n)].set(col_S.astype(buf_N.dtype),
                                                       mode="drop")

  state = state.replace(
      cache=cache,
      completion_ids_NxT=put(state.completion_ids_NxT, tokens_S),
      logps_NxT=put(state.logps_NxT, logps_S),
      entropy_NxT=None if state.entropy_NxT is None else put(state.entropy_NxT, entropy_S),
      lengths_N=put_n(state.lengths_N, t_S + 1),
      finished_N=put_n(state.finished_N, jnp.ones_like(done_S)),
      stopped_N=put_n(state.stopped_N, stop_S),
      finish_step_N=put_n(state.finish_step_N, jnp.broadcast_to(state.step, t_S.shape)),
      slot_resp_S=jnp.where(done_S, n, state.slot_resp_S),
      slot_t_S=t_S + active_S.astype(jnp.int32),
      fresh_S=jnp.zeros_like(state.fresh_S),
      last_tokens_S=tokens_S,
      step=state.step + 1,
      busy=state.busy + jnp.sum(active_S, dtype=jnp.int32))
  if entries:
    b = state.left_B.shape[0]
    return _constrain(state.replace(left_B=state.left_B.at[jnp.where(done_S, prompt_S, b)].add(
        -1, mode="drop")))
  return _constrain(_refill(state, table, order_N, g))


def start(table: PromptTable, caps_N: jax.Array, order_N: jax.Array, *, config,
          spec: ContinuousSpec, cache_dtype=None) -> SlotState:
  """The loop's initial state: empty slots, filled from the head of the queue.

  A table of fewer entries than the B = N / G prompts (`empty_table`, E =
  `spec.entries(B)`) is carried by the loop, which loads the prompts into it (`run_steps`
  then needs `prompts`); the slots are then filled by the first step."""
  chex.assert_rank([caps_N, order_N], 1)
  chex.assert_equal_shape([caps_N, order_N])
  sspec, n, slots = spec.sampling, order_N.shape[0], spec.slots
  num_prompts = n // sspec.group_size
  steps, prompt_len = sspec.max_new_tokens, table.mask_BxP.shape[1]
  # T - 1 own slots for the fed-back tokens (the last sampled one is never fed); the
  # prompt's P are read from the table. RoPE tables cover positions up to P + T - 1.
  own = spec.own_slots
  cache = transformer.decode_layout(transformer.init_cache(
      config, slots, prompt_len + own, dtype=cache_dtype, slots=own))
  cache = cache.replace(k=tuple(map(_bits, cache.k)), v=tuple(map(_bits, cache.v)))
  state = SlotState(
      cache=cache.replace(index=jnp.zeros((slots,), jnp.int32)),
      slot_resp_S=jnp.full((slots,), n, jnp.int32),
      slot_t_S=jnp.zeros((slots,), jnp.int32),
      fresh_S=jnp.zeros((slots,), bool),
      last_tokens_S=jnp.full((slots,), sspec.pad_id, jnp.int32),
      next_q=jnp.zeros((), jnp.int32),
      completion_ids_NxT=jnp.full((n, steps), sspec.pad_id, jnp.int32),
      logps_NxT=jnp.zeros((n, steps), jnp.float32),
      entropy_NxT=jnp.zeros((n, steps), jnp.float32) if sspec.return_entropy else None,
      lengths_N=jnp.zeros((n,), jnp.int32),
      finished_N=jnp.zeros((n,), bool),
      stopped_N=jnp.zeros((n,), bool),
      finish_step_N=jnp.full((n,), -1, jnp.int32),
      step=jnp.zeros((), jnp.int32),
      busy=jnp.zeros((), jnp.int32))
  e = table.mask_BxP.shape[0]
  if e < num_prompts:
    # Prompts load in the order of their first place in the queue.
    place_N = jnp.zeros((n,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32))
    first_B = place_N.reshape(num_prompts, sspec.group_size).min(1)
    return _constrain(state.replace(
        table=table, entry_prompt_E=jnp.full((e,), num_prompts, jnp.int32),
        prompt_entry_B=jnp.full((num_prompts,), e, jnp.int32),
        left_B=jnp.full((num_prompts,), sspec.group_size, jnp.int32),
        load_order_B=jnp.argsort(first_B).astype(jnp.int32), first_B=first_B,
        next_load=jnp.zeros((), jnp.int32), stalled=jnp.zeros((), bool)))
  if e != num_prompts:
    raise ValueError(f"start: the table has {e} entries for {num_prompts} prompts")
  return _constrain(_refill(state, table, order_N, sspec.group_size))


def run_steps(params, state: SlotState, table: PromptTable, keys_N: jax.Array,
              caps_N: jax.Array, order_N: jax.Array, max_steps: jax.Array, *, config,
              spec: ContinuousSpec, prompts=None) -> SlotState:
  """Decodes until every response has finished or `max_steps` more steps have run.

  params may be stacked or `transformer.decode_params`' (converted here once, before the
  loop, as the static sampler does). With a table of E < B entries (state.table, from
  `start`), `prompts` = (ids_BxP, mask_BxP), the bucketed prompts, and params must be
  stacked (the loop prefills with them); `table` is then unused. Such a loop also stops
  if no slot could start (a queue whose open prompts exceed E: `generate` refuses it)."""
  mesh = sharding.active_mesh()
  tensor_parallel = mesh is not None and mesh.shape["tensor"] > 1
  # In the compute dtype (the layers cast to it anyway), sliced per layer, and gathered
  # whole over the batch axes once, here, as `engine.continue_rollout` does: left
  # FSDP-split, every step would gather each layer's weights or all-reduce its activations.
  # The head keeps its vocabulary split over tensor (`distributed.rollout_params`).
  stacked = params = transformer.compute_params(params, config)
  params = transformer.decode_params(params, fuse=not tensor_parallel)
  if mesh is not None:
    params = jax.lax.with_sharding_constraint(params, sharding.decode_param_specs(
        params, mesh, vocab_split=True))
  n = order_N.shape[0]
  limit = state.step + max_steps
  if state.table is None:
    cond = lambda s: (s.step < limit) & jnp.any(s.slot_resp_S < n)
  else:
    if prompts is None or isinstance(stacked["layers"], tuple):
      raise ValueError("run_steps: a table of fewer entries than prompts needs prompts= "
                       "and stacked params (it prefills inside the loop)")
    cond = lambda s: (s.step < limit) & ~s.stalled & (jnp.any(s.slot_resp_S < n)
                                                      | (s.next_q < n))
  body = lambda s: _step(params, s, table, keys_N, caps_N, order_N, config=config,
                         spec=spec, prompts=prompts, stacked_params=stacked)
  return jax.lax.while_loop(cond, body, state)


def finish(state: SlotState) -> ContinuousGeneration:
  steps = state.completion_ids_NxT.shape[1]
  mask_NxT = jnp.arange(steps)[None, :] < state.lengths_N[:, None]
  return ContinuousGeneration(
      completion_ids_NxT=state.completion_ids_NxT, completion_mask_NxT=mask_NxT,
      logps_NxT=state.logps_NxT, entropy_NxT=state.entropy_NxT, lengths_N=state.lengths_N,
      truncated_N=state.finished_N & ~state.stopped_N, num_steps=state.step,
      busy_slot_steps=state.busy, finish_step_N=state.finish_step_N)


def rollout(params, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array, rng: jax.Array,
            prompt_ids_B: jax.Array, caps_N: jax.Array, order_N: jax.Array, *, config,
            spec: ContinuousSpec, cache_dtype=None) -> ContinuousGeneration:
  """The whole continuous rollout as one pure, jittable function (no host checks)."""
  table = _whole_table(_table(params, prompt_ids_BxP, prompt_mask_BxP, config=config,
                              spec=spec, cache_dtype=cache_dtype))
  keys_N = engine.response_keys(rng, prompt_ids_B, spec.sampling.group_size)
  state = start(table, caps_N, order_N, config=config, spec=spec, cache_dtype=cache_dtype)
  big = jnp.asarray(np.iinfo(np.int32).max // 2, jnp.int32)
  state = run_steps(params, state, table, keys_N, caps_N, order_N, big, config=config,
                    spec=spec, prompts=(prompt_ids_BxP, prompt_mask_BxP))
  return finish(state)


def _table(params, prompt_ids_BxP, prompt_mask_BxP, *, config, spec, cache_dtype):
  """All B prompts prefilled, or an empty table of spec.entries(B) < B entries."""
  batch, prompt_len = prompt_ids_BxP.shape
  entries = spec.entries(batch)
  if entries < batch:
    return empty_table(config, entries, prompt_len, cache_dtype)
  return prefill_table(params, prompt_ids_BxP, prompt_mask_BxP, config=config,
                       cache_dtype=cache_dtype)


def max_open_prompts(order_N: np.ndarray, group_size: int) -> int:
  """The most prompts whose responses are both before and after one queue place: a table
  of fewer entries could wait forever for an entry held by an unfinished prompt."""
  place = np.empty_like(order_N)
  place[order_N] = np.arange(len(order_N))
  place_BxG = place.reshape(-1, group_size)
  first, last = place_BxG.min(1), place_BxG.max(1)
  opens = np.zeros(len(order_N) + 1, np.int64)
  np.add.at(opens, first, 1)
  np.add.at(opens, last + 1, -1)
  return int(np.cumsum(opens).max())


# ----------------------------------------------------------------------------- host side

@functools.partial(jax.jit, static_argnames=("config", "spec", "cache_dtype"))
def _start_jit(params, prompt_ids_BxP, prompt_mask_BxP, rng, prompt_ids_B, caps_N,
               order_N, *, config, spec, cache_dtype):
  engine._TRACES["continuous_start"] += 1
  table = _whole_table(_table(params, prompt_ids_BxP, prompt_mask_BxP, config=config,
                              spec=spec, cache_dtype=cache_dtype))
  keys_N = engine.response_keys(rng, prompt_ids_B, spec.sampling.group_size)
  return table, keys_N, start(table, caps_N, order_N, config=config, spec=spec,
                              cache_dtype=cache_dtype)


def _run(params, state, cache, table, keys_N, caps_N, order_N, max_steps, *, config, spec,
         prompts=None):
  engine._TRACES["continuous_decode"] += 1
  return run_steps(params, state.replace(cache=cache), table, keys_N, caps_N, order_N,
                   max_steps, config=config, spec=spec, prompts=prompts)


# The cache is donated (updated in place); the outputs are not, so that the host can read
# chunk k's finished responses while chunk k + 1 decodes.
_run_jit = jax.jit(_run, static_argnames=("config", "spec"), donate_argnames=("cache",))
_finish_jit = jax.jit(finish)


def generate(params, prompt_ids_BxP, prompt_mask_BxP, rng: jax.Array, *, config,
             spec: ContinuousSpec, caps_N=None, order_N=None, prompt_ids_B=None,
             chunk_steps: int = 0, on_finished: Callable | None = None,
             min_prompt_bucket: int = 16, cache_dtype=None) -> ContinuousGeneration:
  """Samples G responses per prompt with S continuous-batching slots.

  Args:
    params, prompt_ids_BxP, prompt_mask_BxP, rng, config: as `engine.generate` (prompts
      LEFT-padded; they are padded further to a power-of-two length bucket).
    spec: a `ContinuousSpec` (slots, and the sampling settings; T = max_new_tokens).
    caps_N: int per-response length caps in [1, T] (default T), row n = b * G + g.
    order_N: the queue, a permutation of range(N) (default FIFO, range(N)).
    prompt_ids_B: each prompt's id for its random stream (default arange(B)).
    chunk_steps: > 0 runs the loop in chunks of this many steps and calls on_finished
      between them; 0 runs it in one call.
    on_finished: called as on_finished(resp_ids, completion_ids_RxT, lengths_R) (numpy)
      with the responses finished since the last call, while the next chunk decodes.
      Across processes (global prompt arrays, caps_N and order_N the same on every
      process) each process is called with the rows it holds (resp_ids are global rows).
  Returns:
    a `ContinuousGeneration` with N = B * G rows.
  """
  sspec = spec.sampling
  # Across processes each process checks the prompts it holds.
  engine._check_generate_args(sharding.addressable_rows(prompt_ids_BxP)[1], sharding.addressable_rows(prompt_mask_BxP)[1],
                              config, sspec.group_size, sspec.max_new_tokens, sspec.eos_ids,
                              sspec.pad_id)
  batch, prompt_len = np.shape(prompt_ids_BxP)
  n, steps = batch * sspec.group_size, sspec.max_new_tokens
  caps_N = np.full((n,), steps, np.int32) if caps_N is None else np.asarray(caps_N, np.int32)
  if caps_N.shape != (n,) or (caps_N < 1).any() or (caps_N > steps).any():
    raise ValueError(f"caps_N must be {n} ints in [1, max_new_tokens={steps}], got shape "
                     f"{caps_N.shape} range [{caps_N.min()}, {caps_N.max()}]")
  order_N = np.arange(n, dtype=np.int32) if order_N is None else np.asarray(order_N,
                                                                            np.int32)
  if order_N.shape != (n,) or not np.array_equal(np.sort(order_N), np.arange(n)):
    raise ValueError(f"order_N must be a permutation of range({n}) (the queue)")
  if prompt_ids_B is None:
    prompt_ids_B = np.arange(batch, dtype=np.int32)
  entries = spec.entries(batch)
  open_prompts = max_open_prompts(order_N, sspec.group_size) if entries < batch else 0
  if open_prompts > entries:
    raise ValueError(f"rollout.table_entries={entries} is fewer than the "
                     f"{open_prompts} prompts this queue "
                     f"(order_N) keeps open at once; raise it or queue each prompt's "
                     f"responses together")
  bucket = engine.bucket_length(prompt_len, min_prompt_bucket)
  if _spans_processes(prompt_ids_BxP):   # global arrays: padded on device
    ids, mask = _left_pad_jit(prompt_ids_BxP, prompt_mask_BxP, bucket=bucket,
                              pad_id=sspec.pad_id)
  else:
    ids = np.asarray(prompt_ids_BxP, np.int32)
    mask = np.asarray(prompt_mask_BxP, np.int32)
    if bucket > prompt_len:
      pad = ((0, 0), (bucket - prompt_len, 0))
      ids, mask = np.pad(ids, pad, constant_values=sspec.pad_id), np.pad(mask, pad)
  table, keys_N, state = _start_jit(params, ids, mask, rng, jnp.asarray(prompt_ids_B),
                                    jnp.asarray(caps_N), jnp.asarray(order_N),
                                    config=config, spec=spec, cache_dtype=cache_dtype)
  caps, order = jnp.asarray(caps_N), jnp.asarray(order_N)
  run = functools.partial(_run_jit, params, table=table, keys_N=keys_N, caps_N=caps,
                          order_N=order, config=config, spec=spec,
                          prompts=(jnp.asarray(ids), jnp.asarray(mask))
                          if entries < batch else None)
  if chunk_steps <= 0:
    state = run(state.replace(cache=None), state.cache,
                max_steps=jnp.asarray(np.iinfo(np.int32).max // 2, jnp.int32))
    return _finish_jit(state)
  # Each process reads and reports the rows it holds (all of them in one process); the
  # loop stops when every row of every process has finished, so all processes make the
  # same calls.
  reported = None
  chunk = jnp.asarray(chunk_steps, jnp.int32)
  while True:
    done = _all_finished_jit(state.finished_N)   # queued before chunk k + 1
    nxt = run(state.replace(cache=None), state.cache, max_steps=chunk)
    # Read chunk k while chunk k + 1 (queued above) decodes.
    start, finished = sharding.addressable_rows(state.finished_N)
    if state.stalled is not None and bool(state.stalled):
      raise RuntimeError("continuous.generate: the loop stalled (no slot could start)")
    reported = np.zeros_like(finished) if reported is None else reported
    new = np.flatnonzero(finished & ~reported)
    if on_finished is not None and len(new):
      on_finished(start + new, sharding.addressable_rows(state.completion_ids_NxT)[1][new],
                  sharding.addressable_rows(state.lengths_N)[1][new])
    reported |= finished
    if bool(done):
      return _finish_jit(nxt)
    state = nxt


def _spans_processes(x) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


@functools.partial(jax.jit, static_argnames=("bucket", "pad_id"))
def _left_pad_jit(ids_BxP, mask_BxP, *, bucket, pad_id):
  pad = ((0, 0), (bucket - ids_BxP.shape[1], 0))
  return (jnp.pad(ids_BxP.astype(jnp.int32), pad, constant_values=pad_id),
          jnp.pad(mask_BxP.astype(jnp.int32), pad))


_all_finished_jit = jax.jit(jnp.all)


@jax.jit
def _longest_prompt_jit(mask_BxP):
  return jnp.max(jnp.sum(mask_BxP.astype(bool), axis=1))


@functools.partial(jax.jit, static_argnames=("bucket",))
def _cut_jit(ids_BxP, mask_BxP, *, bucket):
  return ids_BxP[:, -bucket:], mask_BxP[:, -bucket:]


class HostRollout:
  """Host mode's rollout (`host_loop.RolloutFn`) on continuous batching.

  Prompts come left-padded to the task's max_prompt_len; each batch is cut to the
  power-of-two bucket of its longest prompt (a few compiled sizes instead of one at
  max_prompt_len). `streams`: `host_loop.host_iteration` passes `on_finished` to verify
  finished responses while decoding continues (every `chunk_steps` steps). After each
  call `last_stats` holds the slot utilisation and step counts.

  Across processes the prompts are global arrays (`distributed.BatchPlacement`), the
  bucket is that of the longest prompt of all processes, caps_N holds every row's cap
  (the same on every process), and `on_finished` gets the rows this process holds.
  """
  streams = True

  def __init__(self, model_config, spec: ContinuousSpec, *, chunk_steps: int = 32):
    self.model_config, self.spec, self.chunk_steps = model_config, spec, int(chunk_steps)
    self.last_stats: dict[str, float] = {}

  def __call__(self, params, prompt_ids_BxP, prompt_mask_BxP, rng, *, caps_N=None,
               on_finished: Callable | None = None) -> engine.Generation:
    if _spans_processes(prompt_mask_BxP):
      # Global arrays (several processes): the bucket of the longest prompt of them all.
      ids, mask = prompt_ids_BxP, prompt_mask_BxP
      bucket = engine.bucket_length(int(_longest_prompt_jit(mask)))
      if bucket < ids.shape[1]:
        ids, mask = _cut_jit(ids, mask, bucket=bucket)
    else:
      ids, mask = np.asarray(prompt_ids_BxP), np.asarray(prompt_mask_BxP)
      bucket = engine.bucket_length(int(mask.astype(bool).sum(1).max()))
      if bucket < ids.shape[1]:
        ids, mask = ids[:, -bucket:], mask[:, -bucket:]
    out = generate(params, ids, mask, rng, config=self.model_config, spec=self.spec,
                   caps_N=caps_N, chunk_steps=self.chunk_steps if on_finished else 0,
                   on_finished=on_finished)
    steps, busy = int(out.num_steps), int(out.busy_slot_steps)
    self.last_stats = {"slot_utilisation": busy / max(1, steps * self.spec.slots),
                       "rollout_steps": steps, "prompt_bucket": ids.shape[1]}
    return out.generation()
