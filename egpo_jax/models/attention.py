"""Attention: one entry point, `attend`, for the training forward, the shared-prompt
("extend") layout and one-token decoding; `ModelConfig.attention` picks the implementation:

  * "reference": plain XLA, float32 scores [B, G, (H / G) * T, S] materialised; its
    backward recomputes them (`_attend_recompute`). Kept for tests.
  * "blockwise": flash-style attention in plain JAX (`attend_blockwise`): online softmax
    over key/value blocks, a custom VJP that recomputes each block; O(T x block) memory
    per row and head on every backend. The default.
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bfloat16 or
    float16, head_dim <= 128 and a multiple of 8): padding goes in as sequence lengths
    (`attend_seq_lengths`), so the shared-prompt layout, which lengths cannot express,
    runs blockwise (logged once per trace).
  * "splash": JAX's Pallas splash attention for TPU (`attend_splash`).

Decoding (one query per row) uses the single-query path `_attend_one` under every
implementation: its scores are [B, H, S], small, and it reads the decode cache layout.
Given each row's bound on its used slots (read_slots_B), it reads only those, in blocks:
`_attend_one_paged` (plain JAX) or `attend_one_pallas` (a Pallas kernel: Triton on GPU,
Mosaic on TPU), chosen by read_kernel, both merging their partials with the shared
prefix's in `_merge_partials`.

    out_BxTxHxK = attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS,
                         implementation=config.attention)
    out_BxHxK = attend(q_BxHxK, k_BxGxKxS, v_BxGxSxK, kv_mask_BxS, prefix=...,
                       implementation=config.attention)       # decoding, one query per row

Grouped-query softmax attention: query head h reads kv head h // (H / G). With T queries
per row they are the last T of the S key slots and attend causally (query t sees slots
s <= S - T + t) to the slots whose kv_mask_BxS is set: a causal pass has S = T, the
"extend" layout S = P + T (the shared prompt's P slots first). Padding is on the left; a
query row with no valid key (a left pad) gets finite garbage, never NaN.
"""

from __future__ import annotations

import functools
import logging
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Finite, so that a row with no valid key (a left pad) gives a uniform softmax, not NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

IMPLEMENTATIONS = ("reference", "blockwise", "cudnn", "splash")


def check_implementation(implementation: str, *, dtype, head_dim: int,
                         backend: str | None = None,
                         field: str = "ModelConfig.attention") -> None:
  """Raises a one-line ValueError if `implementation` cannot run on `backend` (default:
  the traced code's target, `sharding.target_platform`) with this compute dtype and head
  width, naming `field` and what can run."""
  from egpo_jax.models import sharding   # noqa: PLC0415  (models.sharding imports config)
  backend = backend or sharding.target_platform()
  dtype = jnp.dtype(dtype)
  runs = {"reference": None, "blockwise": None,
          "cudnn": (None if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
                    and head_dim <= 128 and head_dim % 8 == 0 else
                    "a GPU, bfloat16/float16 compute and head_dim <= 128, a multiple of 8"),
          "splash": None if backend == "tpu" else "a TPU"}
  if implementation not in runs:
    raise ValueError(f"{field}={implementation!r} is not one of {IMPLEMENTATIONS}")
  if runs[implementation] is not None:
    can = tuple(name for name, why in runs.items() if why is None)
    raise ValueError(f"{field}={implementation!r} needs {runs[implementation]} "
                     f"(here: backend {backend}, {dtype.name}, head_dim {head_dim}); use one "
                     f"of {can}")


def attend(q, k, v, kv_mask_BxS, *, implementation: str = "blockwise", prefix=None,
           read_slots_B=None, read_block: int = 64, read_kernel: str = "xla"):
  """Softmax attention of q over the keys k and values v; see the module docstring.

  Args:
    q: [B, T, H, K] queries (RoPE applied); or [B, H, K], one query per row (decoding).
    k, v: [B, S, G, K] keys and values; for one query per row the decode layout,
      keys [B, G, K, S] and values [B, G, S, K] (`transformer.decode_layout`).
    kv_mask_BxS: bool, slot s of row b holds a valid key.
    implementation: one of IMPLEMENTATIONS (`ModelConfig.attention`).
    prefix: one query per row only: an optional shared prefix (keys [Bp, G, K, P],
      values [Bp, G, P, K], mask [Bp, P]) read by groups of B / Bp consecutive rows.
    read_slots_B: one query per row only: int32 [B], row b's valid keys all lie in its
      first read_slots_B[b] slots; attention then reads only those, in blocks of
      `read_block` slots (`_attend_one_paged`; S must be a multiple of read_block). None:
      every slot is read.
    read_kernel: with read_slots_B, one of READ_KERNELS: "xla" (`_attend_one_paged`) or
      "pallas" (`attend_one_pallas`; `rollout.decode_attention="pallas"`).

  Returns:
    [B, T, H, K] (or [B, H, K]) in v's dtype.
  """
  check_implementation(implementation, dtype=q.dtype, head_dim=q.shape[-1])
  if q.ndim == 3:
    # One query: the scores are [B, H, S], nothing to save; every implementation uses
    # the single-query path, which reads the decode cache layout without copies.
    if read_slots_B is not None:
      return _paged_per_device(q, k, v, kv_mask_BxS, prefix, read_slots_B, read_block,
                               read_kernel)
    return _attend_one(q, k, v, kv_mask_BxS, prefix)
  if prefix is not None or read_slots_B is not None:
    raise ValueError("attend: prefix and read_slots_B are for one query per row (decoding) "
                     "only")
  if implementation == "reference":
    return _attend_recompute(q, k, v, kv_mask_BxS)
  if implementation == "splash":
    return _splash_per_device(q, k, v, kv_mask_BxS)
  if implementation == "cudnn":
    if q.shape[1] == k.shape[1]:
      return attend_seq_lengths(q, k, v, kv_mask_BxS, implementation="cudnn")
    logging.getLogger(__name__).warning(
        "attention 'cudnn': queries after a shared prompt (S=%d > T=%d) cannot be given as "
        "sequence lengths; this call runs 'blockwise'", k.shape[1], q.shape[1])
  if q.shape[1] <= BLOCK_SIZE and k.shape[1] <= BLOCK_SIZE:
    # One block holds the whole pass: the dense computation is that block, with the same
    # O(T x S) memory, and XLA's fused softmax was faster at these lengths (the CPU
    # grpo_iteration A/B, benchmarks/scenarios/attention.py).
    return _attend_recompute(q, k, v, kv_mask_BxS)
  return attend_blockwise(q, k, v, kv_mask_BxS, BLOCK_SIZE)


def causal_allowed(kv_mask_BxS, t):
  """bool [B, T, S]: query t (the last T of the S slots) may read slot s."""
  s = kv_mask_BxS.shape[1]
  causal_TxS = jnp.arange(s)[None, :] <= jnp.arange(s - t, s)[:, None]
  return causal_TxS[None] & kv_mask_BxS.astype(jnp.bool_)[:, None, :]


def _attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, allowed_BxTxS):
  """Grouped-query softmax attention in float32; query head h reads kv head h // (H / G).

  Heads are moved in front of the positions once, and the H / G query heads that share a
  kv head are stacked along the rows, so both products are plain batched matmuls over
  (B, G) with the contraction in the last dimension: XLA:CPU then needs no transposes of
  the [B, heads, T, S] scores in the backward pass, and K/V are never repeated per head.
  """
  b, t, h, hd = q_BxTxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  r = h // g
  q_BxGxRTxK = q_BxTxHxK.reshape(b, t, g, r, hd).transpose(0, 2, 3, 1, 4).reshape(
      b, g, r * t, hd)
  k_BxGxSxK = jnp.swapaxes(k_BxSxGxK, 1, 2)
  v_BxGxSxK = jnp.swapaxes(v_BxSxGxK, 1, 2)
  scores = jnp.einsum("bgtk,bgsk->bgts", q_BxGxRTxK, k_BxGxSxK,
                      preferred_element_type=jnp.float32) / math.sqrt(hd)
  allowed = jnp.broadcast_to(allowed_BxTxS[:, None, None], (b, 1, r, t, s)).reshape(
      b, 1, r * t, s)
  scores = jnp.where(allowed, scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
  out = jnp.einsum("bgts,bgsk->bgtk", probs, v_BxGxSxK)
  return out.reshape(b, g, r, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


@jax.custom_vjp
def _attend_recompute(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS):
  """`_attend`, keeping only its inputs for the backward pass, which recomputes the rest.

  Autodiff of `_attend` inside the layer scan stacks two float32 [B, heads, T, S]
  arrays per layer (zero-filled, then written layer by layer); recomputing the scores in
  the backward pass costs two small matmuls and is faster on CPU (with the flattened
  projections: the benchmark update 1.28x faster, tiny and small models). A custom VJP
  rather than jax.checkpoint, so that `ModelConfig.remat`'s policies keep applying to
  the whole layer. Reverse mode only (no jax.jvp), like the log-probs. The dense [B, T, S]
  mask is rebuilt from kv_mask_BxS in both passes, so a layer scan saves only the
  [B, S] key mask per layer.
  """
  return _attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK,
                 causal_allowed(kv_mask_BxS, q_BxTxHxK.shape[1]))


def _attend_recompute_fwd(q, k, v, kv_mask):
  return _attend(q, k, v, causal_allowed(kv_mask, q.shape[1])), (q, k, v, kv_mask)


def _attend_recompute_bwd(residuals, g_out):
  q, k, v, kv_mask = residuals
  allowed = causal_allowed(kv_mask, q.shape[1])
  _, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, allowed), q, k, v)
  return (*vjp(g_out), None)


_attend_recompute.defvjp(_attend_recompute_fwd, _attend_recompute_bwd)


def _attend_one(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix=None):
  """`_attend` for one query token per row, keys [B, kv heads, head_dim, S] and values
  [B, kv heads, S, head_dim].

  prefix: optional (keys [Bp, kv heads, head_dim, P], values [Bp, kv heads, P, head_dim],
  mask [Bp, P]) shared by groups of B / Bp consecutive rows (`share_prefix`). The group's
  queries are stacked along the rows, so the prefix is read once per group in one
  [C * r, head_dim] @ [head_dim, P] product per (prompt, kv head), C = B / Bp; its scores
  join the rows' own in one softmax.
  """
  b, h, hd = q_BxHxK.shape
  g = k_BxGxKxS.shape[1]
  r = h // g
  q = q_BxHxK.reshape(b, g, r, hd)
  scores = jnp.einsum("bgrk,bgks->bgrs", q, k_BxGxKxS,
                      preferred_element_type=jnp.float32) / math.sqrt(hd)
  scores = jnp.where(mask_BxS[:, None, None], scores, _MASK_VALUE)
  if prefix is None:
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxGxSxK.dtype)
    return jnp.einsum("bgrs,bgsk->bgrk", probs, v_BxGxSxK).reshape(b, h, hd)
  k_BpxGxKxP, v_BpxGxPxK, mask_BpxP = prefix
  bp, p = mask_BpxP.shape
  c = b // bp
  # [B, g, r, K] -> [Bp, g, C * r, K]: row b * C + j's query heads under prompt b.
  q_grouped = q.reshape(bp, c, g, r, hd).transpose(0, 2, 1, 3, 4).reshape(bp, g, c * r, hd)
  prefix_scores = jnp.einsum("bgqk,bgkp->bgqp", q_grouped, k_BpxGxKxP,
                             preferred_element_type=jnp.float32) / math.sqrt(hd)
  prefix_scores = jnp.where(mask_BpxP[:, None, None], prefix_scores, _MASK_VALUE)
  prefix_scores = prefix_scores.reshape(bp, g, c, r, p).transpose(0, 2, 1, 3, 4).reshape(
      b, g, r, p)
  probs = jax.nn.softmax(jnp.concatenate([prefix_scores, scores], axis=-1), axis=-1)
  probs = probs.astype(v_BxGxSxK.dtype)
  prefix_probs = probs[..., :p].reshape(bp, c, g, r, p).transpose(0, 2, 1, 3, 4).reshape(
      bp, g, c * r, p)
  prefix_out = jnp.einsum("bgqp,bgpk->bgqk", prefix_probs, v_BpxGxPxK)
  prefix_out = prefix_out.reshape(bp, g, c, r, hd).transpose(0, 2, 1, 3, 4).reshape(
      b, g, r, hd)
  out = jnp.einsum("bgrs,bgsk->bgrk", probs[..., p:], v_BxGxSxK) + prefix_out
  return out.reshape(b, h, hd)


def _paged_per_device(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix, read_slots_B,
                      block: int, read_kernel: str = "xla"):
  """`_attend_one_paged` (read_kernel "xla") or `attend_one_pallas` ("pallas") run by
  each device on its own rows and heads under a mesh.

  Its (row, block) pair list mixes rows: traced globally, GSPMD turns each visit's
  gather of B blocks "wherever their rows are" into a masked local gather plus an
  all-reduce of the gathered blocks, i.e. the used KV cache crosses the network every
  step. Per device (`jax.shard_map`: rows over the batch axes, heads over `tensor`) each
  device lists and visits only its rows' blocks and nothing is communicated. A row's
  result is the same either way (its partials never mix with other rows'). Without a
  mesh, or where the mesh does not split rows and heads evenly (prefix groups included),
  the global version runs.
  """
  from egpo_jax.models import sharding   # noqa: PLC0415  (models.sharding imports config)
  if read_kernel not in READ_KERNELS:
    raise ValueError(f"attend: read_kernel={read_kernel!r} is not one of {READ_KERNELS}")
  mesh = sharding.per_device_mesh()
  run = functools.partial({"xla": _attend_one_paged, "pallas": attend_one_pallas}[read_kernel],
                          block=block)
  if mesh is None:
    return run(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix, read_slots_B)
  batch, heads, kv_heads = "activation_batch", "activation_heads", "activation_kv_heads"
  spec = functools.partial(sharding.leading_spec, mesh=mesh)
  dim = lambda p, i: (tuple(p) + (None, None))[i]   # noqa: E731
  with_heads = [spec(q_BxHxK, batch, heads), spec(k_BxGxKxS, batch, kv_heads),
                spec(v_BxGxSxK, batch, kv_heads)]
  rows_only = [spec(mask_BxS, batch), spec(read_slots_B, batch)]
  if prefix is not None:
    with_heads += [spec(prefix[0], batch, kv_heads), spec(prefix[1], batch, kv_heads)]
    rows_only.append(spec(prefix[2], batch))
  # Every input split as q is (rows, then heads), or the row and head layouts would not
  # line up (e.g. 6 prefix rows for 12 rows on 4 devices): then the global version.
  if (len({dim(p, 0) for p in with_heads + rows_only}) != 1
      or len({dim(p, 1) for p in with_heads}) != 1):
    return run(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix, read_slots_B)
  specs = with_heads[:3] + rows_only[:2]
  if prefix is not None:
    specs.append((with_heads[3], with_heads[4], rows_only[2]))
  args = (q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, read_slots_B)
  if prefix is None:
    local = lambda q, k, v, m, r: run(q, k, v, m, None, r)   # noqa: E731
  else:
    args += (tuple(prefix),)
    local = lambda q, k, v, m, r, p: run(q, k, v, m, p, r)   # noqa: E731
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0],
                       check_vma=False)(*args)


def _num_blocks(slots: int, block: int) -> int:
  """The cache's slots in read blocks; a one-line error where they do not divide."""
  if slots % block:
    raise ValueError(f"attend: read_slots_B needs the cache's {slots} slots to be a multiple "
                     f"of read_block={block}")
  return slots // block


def _attend_one_paged(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix, read_slots_B,
                      block: int):
  """`_attend_one` reading only each row's first read_slots_B[b] slots, in blocks.

  Decoding rows of different lengths (`sampling.continuous`' slots) share one cache of S
  slots; the dense path reads all S of every row at every step. Here the (row, block)
  pairs that hold a row's keys, ceil(read_slots_B[b] / block) per row, are listed row by
  row and visited B at a time (a `lax.fori_loop` whose trip count is ceil(pairs / B)): each
  visit gathers B blocks of keys and values, wherever their rows are, and computes their
  softmax partials (max m, sum l, unnormalised output acc: Milakov & Gimelshein, 2018). The
  partials are written to a [B, S / block] table, and each row's are combined at the end
  over that fixed axis, with the prefix's (read densely, as `_attend_one`), by
  `_merge_partials`.

  Blocks a row does not read keep m_j = the mask value and l_j = acc_j = 0, which weigh
  exactly 0, so a row's result is bit-identical whatever the other rows' lengths and
  wherever its pairs fall in the visits (batched matmul rows are independent). Needs a
  valid key in the prefix or in each row's first block read (decoding always has one).
  Equal to `_attend_one` up to float rounding. Cost on XLA:CPU: a gathered slot costs
  ~2.5x a densely read one (the gather copies, and a key block is 64-float runs), so this
  pays when rows use well under half their slots (64 slots, 8 layers, rows at ~100 of
  512: 7 ms against the dense 12 ms per step on 2 loaded CPU cores).
  """
  b, h, hd = q_BxHxK.shape
  g, s = k_BxGxKxS.shape[1], k_BxGxKxS.shape[3]
  r = h // g
  nb = _num_blocks(s, block)
  scale = 1.0 / math.sqrt(hd)
  q = q_BxHxK.reshape(b, g, r, hd)
  m0, l0, acc0 = _prefix_partials(q, prefix, scale)

  blocks_B = jnp.clip(-(-read_slots_B.astype(jnp.int32) // block), 0, nb)
  ends_B = jnp.cumsum(blocks_B)
  total = ends_B[-1]
  # Pair p = (row_P[p], blk_P[p]), row by row; B * nb covers every row's blocks, plus B
  # padding pairs for the last visit (dropped).
  pairs = jnp.arange(b * nb + b, dtype=jnp.int32)
  row_P = jnp.minimum(jnp.sum(pairs[:, None] >= ends_B[None, :], axis=1, dtype=jnp.int32),
                      b - 1)
  blk_P = jnp.clip(pairs - (ends_B - blocks_B)[row_P], 0, nb - 1)
  live_P = pairs < total
  k5 = k_BxGxKxS.reshape(b, g, hd, nb, block)
  v5 = v_BxGxSxK.reshape(b, g, nb, block, hd)
  mask3 = mask_BxS.reshape(b, nb, block)

  def visit(i, carry):
    m_tab, l_tab, acc_tab = carry
    row_W, blk_W, live_W = (jax.lax.dynamic_slice_in_dim(x, i * b, b)
                            for x in (row_P, blk_P, live_P))
    k_W, v_W = k5[row_W, :, :, blk_W], v5[row_W, :, blk_W]   # [W, G, K, blk], [W, G, blk, K]
    valid = mask3[row_W, blk_W][:, None, None]
    sc = jnp.einsum("wgrk,wgks->wgrs", q[row_W], k_W,
                    preferred_element_type=jnp.float32) * scale
    m = jnp.where(valid, sc, _MASK_VALUE).max(-1)
    e = jnp.where(valid, jnp.exp(sc - m[..., None]), 0.0)
    acc = jnp.einsum("wgrs,wgsk->wgrk", e.astype(v_W.dtype), v_W,
                     preferred_element_type=jnp.float32)
    put = lambda tab, x: tab.at[jnp.where(live_W, row_W, b), blk_W].set(x, mode="drop")
    return put(m_tab, m), put(l_tab, e.sum(-1)), put(acc_tab, acc)

  init = (jnp.full((b, nb, g, r), _MASK_VALUE, jnp.float32),
          jnp.zeros((b, nb, g, r), jnp.float32), jnp.zeros((b, nb, g, r, hd), jnp.float32))
  m_tab, l_tab, acc_tab = jax.lax.fori_loop(0, -(-total // b), visit, init)
  out = _merge_partials((m0, l0, acc0), (m_tab, l_tab, acc_tab))
  return out.astype(v_BxGxSxK.dtype).reshape(b, h, hd)


def _prefix_partials(q_BxGxRxK, prefix, scale: float):
  """Softmax partials (m [B, G, R], l [B, G, R], acc [B, G, R, K], float32) of the
  queries over the shared prefix (read densely, as `_attend_one`: the group of C = B / Bp
  rows' queries stacked in one product per prompt and kv head); without a prefix, those
  of no key (m = the mask value, l = acc = 0, which weigh 0 in `_merge_partials`)."""
  b, g, r, hd = q_BxGxRxK.shape
  if prefix is None:
    return (jnp.full((b, g, r), _MASK_VALUE, jnp.float32), jnp.zeros((b, g, r), jnp.float32),
            jnp.zeros((b, g, r, hd), jnp.float32))
  k_BpxGxKxP, v_BpxGxPxK, mask_BpxP = prefix
  bp = mask_BpxP.shape[0]
  c = b // bp
  q_grouped = q_BxGxRxK.reshape(bp, c, g, r, hd).transpose(0, 2, 1, 3, 4).reshape(
      bp, g, c * r, hd)
  ps = jnp.einsum("bgqk,bgkp->bgqp", q_grouped, k_BpxGxKxP,
                  preferred_element_type=jnp.float32) * scale
  valid = mask_BpxP[:, None, None]
  m_p = jnp.where(valid, ps, _MASK_VALUE).max(-1)
  e = jnp.where(valid, jnp.exp(ps - m_p[..., None]), 0.0)
  acc_p = jnp.einsum("bgqp,bgpk->bgqk", e.astype(v_BpxGxPxK.dtype), v_BpxGxPxK,
                     preferred_element_type=jnp.float32)
  ungroup = lambda x: x.reshape(bp, g, c, r, *x.shape[3:]).swapaxes(1, 2).reshape(   # noqa: E731
      b, g, r, *x.shape[3:])
  return ungroup(m_p), ungroup(e.sum(-1)), ungroup(acc_p)


def _merge_partials(prefix_partials, block_partials):
  """The softmax output (float32 [B, G, R, K]) from the prefix's partials (m0, l0 [B, G, R],
  acc0 [B, G, R, K]) and a table of per-block partials (m, l [B, N, G, R], acc
  [B, N, G, R, K]) over the fixed block axis N (Milakov & Gimelshein, 2018):

    m = max_j m_j,   out = sum_j exp(m_j - m) acc_j / sum_j exp(m_j - m) l_j.

  Shared by `_attend_one_paged` and `attend_one_pallas`, so both combine identically."""
  m0, l0, acc0 = prefix_partials
  m_tab, l_tab, acc_tab = block_partials
  m = jnp.maximum(m0, m_tab.max(1))
  w0, w = jnp.exp(m0 - m), jnp.exp(m_tab - m[:, None])
  l = l0 * w0 + (l_tab * w).sum(1)
  acc = acc0 * w0[..., None] + (acc_tab * w[..., None]).sum(1)
  return acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]


# --- pallas: the bounded decode read as a Pallas kernel ------------------------------------

# How `attend` reads each row's first read_slots_B[b] slots: "xla" (`_attend_one_paged`, plain
# JAX, any backend) or "pallas" (`attend_one_pallas`: Triton on GPU, Mosaic on TPU, the Pallas
# interpreter elsewhere, which is for parity checks only and slow).
READ_KERNELS = ("xla", "pallas")


def pallas_query_rows(*, backend: str, block: int, slots: int, head_dim: int,
                      group: int) -> int:
  """The query rows per (row, kv head) program of `attend_one_pallas` on `backend`: the
  group = H / G query heads, padded to what the backend's matmul tiles need.

  Raises a one-line ValueError naming rollout.read_block when a block of `block` of the
  `slots` own slots cannot be tiled there: Mosaic (TPU) takes blocks whose last two dims are
  multiples of (8, 128) or the array's own (keys [K, block], values [block, K]: block a
  multiple of 128, or all the slots); Triton (GPU) takes arrays whose dims are powers of two,
  matmul operands at least 16 (block and head_dim powers of two >= 16).
  """
  if backend == "tpu":
    if block != slots and block % 128:
      raise ValueError(f"rollout.read_block={block} cannot be tiled by the Pallas decode "
                       f"kernel on TPU: use a multiple of 128 (or all {slots} own slots), or "
                       f"rollout.decode_attention='bounded'")
    return -(-group // 8) * 8
  if backend == "gpu":
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0   # noqa: E731
    if not pow2(block):
      raise ValueError(f"rollout.read_block={block} cannot be tiled by the Pallas decode "
                       f"kernel on GPU: use a power of two >= 16, or "
                       f"rollout.decode_attention='bounded'")
    if not pow2(head_dim):
      raise ValueError(f"head_dim={head_dim} cannot be tiled by the Pallas decode kernel on "
                       f"GPU (a power of two >= 16): use rollout.decode_attention='bounded'")
    return max(16, 1 << (group - 1).bit_length())
  return group


def _online_block(q_RxK, k_KxN, v_NxK, valid_1xN, carry, scale: float):
  """One block of keys into the running softmax partials (m, l [R, 1], acc [R, K], float32)
  of the query rows: online softmax (Milakov & Gimelshein, 2018; Dao et al., 2022),

    m' = max(m, max_s x_s),   l' = e^(m - m') l + sum_s e^(x_s - m'),
    acc' = e^(m - m') acc + sum_s e^(x_s - m') v_s,

  over the block's valid keys s, x_s = q . k_s / sqrt(K) (the scale given). Scores and
  sums in float32; the probabilities meet the values in the values' dtype, as in
  `_attend_one_paged`."""
  m, l, acc = carry
  dims = (((1,), (0,)), ((), ()))
  sc = jax.lax.dot_general(q_RxK, k_KxN, dims, preferred_element_type=jnp.float32) * scale
  m_new = jnp.maximum(m, jnp.where(valid_1xN, sc, _MASK_VALUE).max(-1, keepdims=True))
  e = jnp.where(valid_1xN, jnp.exp(sc - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  pv = jax.lax.dot_general(e.astype(v_NxK.dtype), v_NxK, dims,
                           preferred_element_type=jnp.float32)
  return m_new, l * alpha + e.sum(-1, keepdims=True), acc * alpha + pv


def _no_keys(m_ref, l_ref, acc_ref):
  """The partials of no key: m = the mask value, l = acc = 0 (they weigh 0 in a merge)."""
  return (jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32), jnp.zeros(l_ref.shape, jnp.float32),
          jnp.zeros(acc_ref.shape, jnp.float32))


def _pallas_loop_kernel(blocks_ref, q_ref, k_ref, v_ref, mask_ref, m_ref, l_ref, acc_ref, *,
                        scale: float, block: int):
  """Program (row b, kv head g), Triton's layout: a loop over the row's first blocks_ref[0]
  blocks of `block` own slots, loading each from the row's keys [K, S] and values [S, K]
  (refs are pointers there, so only the loaded blocks are read); q [R, K], mask int32
  [1, S]; writes the partials m, l [R, 1], acc [R, K]."""
  from jax.experimental import pallas as pl   # noqa: PLC0415  (Pallas only when used)
  q = q_ref[...]

  def body(j, carry):
    slots = pl.ds(pl.multiple_of(j * block, block), block)
    return _online_block(q, k_ref[:, slots], v_ref[slots, :], mask_ref[:, slots] != 0,
                         carry, scale)

  m, l, acc = jax.lax.fori_loop(0, blocks_ref[0], body, _no_keys(m_ref, l_ref, acc_ref))
  m_ref[...], l_ref[...], acc_ref[...] = m, l, acc


def _pallas_grid_kernel(blocks_ref, q_ref, k_ref, v_ref, mask_ref, m_ref, l_ref, acc_ref, *,
                        scale: float):
  """Program (row b, kv head g, block j), Mosaic's layout: the grid's last axis is the loop
  (sequential on a core), the partials accumulate in the output blocks, which stay in VMEM
  while j runs; block j at or past the row's count blocks_ref[b] (prefetched into SMEM) is
  skipped, and its key/value block index repeats the last one read, so the pipeline copies
  nothing for it. Refs: q [R, K], keys [K, block], values [block, K], mask int32 [1, block]."""
  from jax.experimental import pallas as pl   # noqa: PLC0415
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    m_ref[...], l_ref[...], acc_ref[...] = _no_keys(m_ref, l_ref, acc_ref)

  @pl.when(j < blocks_ref[pl.program_id(0)])
  def _read():
    m_ref[...], l_ref[...], acc_ref[...] = _online_block(
        q_ref[...], k_ref[...], v_ref[...], mask_ref[...] != 0,
        (m_ref[...], l_ref[...], acc_ref[...]), scale)


def attend_one_pallas(q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, prefix, read_slots_B,
                      block: int, *, backend: str | None = None, interpret: bool | None = None):
  """`_attend_one_paged` as a Pallas kernel: row b reads only its first
  ceil(read_slots_B[b] / block) blocks of `block` own slots, the H / G query heads of a kv
  head together (`pallas_query_rows`), into one set of softmax partials (m, l, acc,
  float32) per (row, kv head), which `_merge_partials` merges with the shared prefix's, as
  `_attend_one_paged` merges its block table. Equal to it up to float rounding (the
  blocks are folded in one by one, online, instead of merged at the end); a row's result
  does not depend on the other rows'.

  GPU (Triton): one program per (row, kv head), looping over the row's blocks
  (`_pallas_loop_kernel`). TPU (Mosaic): the blocks are the grid's last axis, the rows'
  block counts prefetched (`_pallas_grid_kernel`).

  backend: the kernel's target ("gpu" or "tpu"; default the traced code's target,
  `sharding.target_platform`, e.g. a TPU topology's in the dry run), which sets the
  layout and tiling (`pallas_query_rows`); any other runs the GPU layout. interpret: the
  Pallas interpreter (default: on a backend other than GPU/TPU, e.g. a CPU; parity checks
  only, slow).
  """
  from jax.experimental import pallas as pl   # noqa: PLC0415
  chex.assert_rank([q_BxHxK, k_BxGxKxS, v_BxGxSxK, mask_BxS, read_slots_B], [3, 4, 4, 2, 1])
  b, h, hd = q_BxHxK.shape
  g, s = k_BxGxKxS.shape[1], k_BxGxKxS.shape[3]
  chex.assert_shape(v_BxGxSxK, (b, g, s, hd))
  chex.assert_shape(mask_BxS, (b, s))
  chex.assert_shape(read_slots_B, (b,))
  from egpo_jax.models import sharding   # noqa: PLC0415  (models.sharding imports config)
  backend = backend or sharding.target_platform()
  interpret = backend not in ("gpu", "tpu") if interpret is None else interpret
  r = h // g
  nb = _num_blocks(s, block)
  rp = pallas_query_rows(backend=backend, block=block, slots=s, head_dim=hd, group=r)
  scale = 1.0 / math.sqrt(hd)
  q = q_BxHxK.reshape(b, g, r, hd)
  q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
  blocks_B = jnp.clip(-(-read_slots_B.astype(jnp.int32) // block), 0, nb)
  mask = mask_BxS.astype(jnp.int32)[:, None, :]
  out_shape = [jax.ShapeDtypeStruct((b, g, rp, 1), jnp.float32),
               jax.ShapeDtypeStruct((b, g, rp, 1), jnp.float32),
               jax.ShapeDtypeStruct((b, g, rp, hd), jnp.float32)]
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu   # noqa: PLC0415
    # A skipped block repeats the row's last block index (block 0 for a row of none).
    last = lambda i, j, n: jnp.maximum(jnp.minimum(j, n[i] - 1), 0)   # noqa: E731
    rows = lambda i, kv, j, n: (i, kv, 0, 0)                            # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, rp, hd), rows),
        pl.BlockSpec((None, None, hd, block), lambda i, kv, j, n: (i, kv, 0, last(i, j, n))),
        pl.BlockSpec((None, None, block, hd), lambda i, kv, j, n: (i, kv, last(i, j, n), 0)),
        pl.BlockSpec((None, 1, block), lambda i, kv, j, n: (i, 0, last(i, j, n)))]
    out_specs = [pl.BlockSpec((None, None, rp, 1), rows), pl.BlockSpec((None, None, rp, 1), rows),
                 pl.BlockSpec((None, None, rp, hd), rows)]
    call = pl.pallas_call(
        functools.partial(_pallas_grid_kernel, scale=scale), out_shape=out_shape,
        interpret=interpret,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(b, g, nb),
                                               in_specs=in_specs, out_specs=out_specs),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")))
  else:
    from jax.experimental.pallas import triton as pltriton   # noqa: PLC0415
    rows = lambda i, kv: (i, kv, 0, 0)   # noqa: E731
    in_specs = [pl.BlockSpec((1,), lambda i, kv: (i,)),
                pl.BlockSpec((None, None, rp, hd), rows),
                pl.BlockSpec((None, None, hd, s), rows),
                pl.BlockSpec((None, None, s, hd), rows),
                pl.BlockSpec((None, 1, s), lambda i, kv: (i, 0, 0))]
    out_specs = [pl.BlockSpec((None, None, rp, 1), rows), pl.BlockSpec((None, None, rp, 1), rows),
                 pl.BlockSpec((None, None, rp, hd), rows)]
    call = pl.pallas_call(
        functools.partial(_pallas_loop_kernel, scale=scale, block=block), out_shape=out_shape,
        grid=(b, g), in_specs=in_specs, out_specs=out_specs, interpret=interpret,
        # Triton (not Mosaic GPU, Pallas' other GPU backend).
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
  m, l, acc = call(blocks_B, q_pad, k_BxGxKxS, v_BxGxSxK, mask)
  table = (m[:, None, :, :r, 0], l[:, None, :, :r, 0], acc[:, None, :, :r])   # [B, 1, G, r, ...]
  out = _merge_partials(_prefix_partials(q, prefix, scale), table)
  return out.astype(v_BxGxSxK.dtype).reshape(b, h, hd)

# --- blockwise: flash-style attention in plain JAX ---------------------------------------

# Query and key block length. Each step's scores are [B, G, block * H / G, block] float32;
# 256 keeps the matmuls big enough for XLA:CPU (see benchmarks/scenarios/attention.py).
BLOCK_SIZE = 256


def _block_plan(t: int, s: int, block: int):
  """Static block bounds of a causal pass: T queries as the last T of S slots.

  Returns (bq, bk, nq, nk, kv_blocks, q_first): query block i reads key blocks
  [0, kv_blocks[i]); key block j is read by query blocks [q_first[j], nq).
  """
  bq, bk = min(block, t), min(block, s)
  nq, nk = -(-t // bq), -(-s // bk)
  offset = s - t
  last_slot = offset + (np.arange(nq) + 1) * bq - 1      # of each query block
  kv_blocks = np.minimum(nk, last_slot // bk + 1).astype(np.int32)
  q_first = np.array([int(np.argmax(kv_blocks > j)) for j in range(nk)], np.int32)
  return bq, bk, nq, nk, kv_blocks, q_first


def _loop(lo, hi, body, carry):
  """lax.fori_loop, or the body called in line when the bounds are static and the trip
  count is 0 or 1 (short sequences: one block; a while loop costs more than the block)."""
  if isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and hi - lo <= 1:
    for i in range(int(lo), int(hi)):
      carry = body(i, carry)
    return carry
  return jax.lax.fori_loop(lo, hi, body, carry)


def _grouped_queries(x_BxTxHxK, g, tp):
  """[B, T, H, K] -> [B, G, Tp * R, K], padded at the end to Tp positions: position-major,
  the R = H / G query heads of a kv head adjacent, so a block of positions is contiguous."""
  b, t, h, hd = x_BxTxHxK.shape
  x = jnp.pad(x_BxTxHxK, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  return x.reshape(b, tp, g, h // g, hd).transpose(0, 2, 1, 3, 4).reshape(b, g, -1, hd)


def _grouped_keys(x_BxSxGxK, sp):
  """[B, S, G, K] -> [B, G, Sp, K], padded at the end to Sp slots."""
  s = x_BxSxGxK.shape[1]
  return jnp.pad(jnp.swapaxes(x_BxSxGxK, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))


def _ungrouped(x_BxGxTRxK, t, h):
  """[B, G, Tp * R, K] -> [B, T, H, K] (the inverse of `_grouped`'s query layout)."""
  b, g, tpr, hd = x_BxGxTRxK.shape
  r = h // g
  x = x_BxGxTRxK.reshape(b, g, tpr // r, r, hd).transpose(0, 2, 1, 3, 4)
  return x.reshape(b, tpr // r, h, hd)[:, :t]


def _block_allowed(mask_BxK, first_slot_kv, pos_Q):
  """[B, 1, Q, K]: query rows at slots pos_Q may read keys first_slot_kv + k (causal, valid)."""
  slots = first_slot_kv + jnp.arange(mask_BxK.shape[1])
  return mask_BxK[:, None, None, :] & (slots[None, :] <= pos_Q[:, None])[None, None]


def _blockwise_fwd_impl(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, block):
  """Online-softmax forward (Dao et al., 2022): returns the output [B, T, H, K] and the
  log-sum-exp of every grouped query row [B, G, Tp * R] (float32; +huge where a row has no
  valid key, whose output is 0)."""
  b, t, h, hd = q_BxTxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  r, scale = h // g, 1.0 / math.sqrt(hd)
  bq, bk, nq, nk, kv_blocks, _ = _block_plan(t, s, block)
  q = _grouped_queries(q_BxTxHxK, g, nq * bq)
  k, v = _grouped_keys(k_BxSxGxK, nk * bk), _grouped_keys(v_BxSxGxK, nk * bk)
  mask = jnp.pad(kv_mask_BxS.astype(jnp.bool_), ((0, 0), (0, nk * bk - s)))
  rows = bq * r

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * rows, rows, axis=2)
    pos = (s - t) + i * bq + jnp.arange(rows) // r

    def key_block(j, carry):
      acc, m, l = carry
      k_j, v_j = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=2) for x in (k, v))
      mask_j = jax.lax.dynamic_slice_in_dim(mask, j * bk, bk, axis=1)
      scores = jnp.einsum("bgqk,bgsk->bgqs", q_i, k_j,
                          preferred_element_type=jnp.float32) * scale
      scores = jnp.where(_block_allowed(mask_j, j * bk, pos), scores, _MASK_VALUE)
      m_new = jnp.maximum(m, scores.max(-1))
      p = jnp.exp(scores - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      acc = acc * alpha[..., None] + jnp.einsum(
          "bgqs,bgsk->bgqk", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return acc, m_new, l * alpha + p.sum(-1)

    init = (jnp.zeros((b, g, rows, hd), jnp.float32),
            jnp.full((b, g, rows), _MASK_VALUE, jnp.float32), jnp.zeros((b, g, rows), jnp.float32))
    acc, m, l = _loop(0, kv_blocks[i], key_block, init)
    valid = m > _MASK_VALUE / 2       # some key was allowed
    out = jnp.where(valid[..., None], acc / l[..., None], 0.0).astype(v.dtype)
    return out, jnp.where(valid, m + jnp.log(l), -_MASK_VALUE)

  if nq == 1:
    out_N, lse_N = jax.tree.map(lambda x: x[None], query_block(0))
  else:
    kv_blocks = jnp.asarray(kv_blocks)
    out_N, lse_N = jax.lax.map(query_block, jnp.arange(nq))
  # [nq, B, G, rows, ...] -> [B, G, nq * rows, ...]
  out = jnp.moveaxis(out_N, 0, 2).reshape(b, g, nq * rows, hd)
  lse = jnp.moveaxis(lse_N, 0, 2).reshape(b, g, nq * rows)
  return _ungrouped(out, t, h), lse


def _blockwise_bwd_impl(block, residuals, g_out):
  """One pass over the (query block, key block) pairs the causal mask leaves: each key
  block accumulates its dK, dV over the query blocks that read it, and dQ accumulates in
  place, so nothing larger than one [B, G, block * R, block] score block is live."""
  q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, out_BxTxHxK, lse = residuals
  b, t, h, hd = q_BxTxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  r, scale = h // g, 1.0 / math.sqrt(hd)
  bq, bk, nq, nk, _, q_first = _block_plan(t, s, block)
  q, do, o = (_grouped_queries(x, g, nq * bq)
               for x in (q_BxTxHxK, g_out.astype(q_BxTxHxK.dtype), out_BxTxHxK))
  k, v = _grouped_keys(k_BxSxGxK, nk * bk), _grouped_keys(v_BxSxGxK, nk * bk)
  mask = jnp.pad(kv_mask_BxS.astype(jnp.bool_), ((0, 0), (0, nk * bk - s)))
  # D_i = rowsum(dO * O): the softmax backward's correction term.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  rows = bq * r

  def key_block(dq, j):
    k_j, v_j = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=2) for x in (k, v))
    mask_j = jax.lax.dynamic_slice_in_dim(mask, j * bk, bk, axis=1)

    def query_block(i, carry):
      dq, dk, dv = carry
      q_i, do_i = (jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2) for x in (q, do))
      lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2)
                        for x in (lse, delta))
      pos = (s - t) + i * bq + jnp.arange(rows) // r
      scores = jnp.einsum("bgqk,bgsk->bgqs", q_i, k_j,
                          preferred_element_type=jnp.float32) * scale
      scores = jnp.where(_block_allowed(mask_j, j * bk, pos), scores, _MASK_VALUE)
      p = jnp.exp(scores - lse_i[..., None])
      dv = dv + jnp.einsum("bgqs,bgqk->bgsk", p.astype(do.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bgqk,bgsk->bgqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
      dq_i = jax.lax.dynamic_slice_in_dim(dq, i * rows, rows, axis=2) + jnp.einsum(
          "bgqs,bgsk->bgqk", ds, k_j, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * rows, axis=2)
      dk = dk + jnp.einsum("bgqs,bgqk->bgsk", ds, q_i, preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros((b, g, bk, hd), jnp.float32)
    dq, dk, dv = _loop(q_first[j], nq, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  if nk == 1:
    dq, (dk, dv) = key_block(jnp.zeros(q.shape, jnp.float32), 0)
    dk_N, dv_N = dk[None], dv[None]
  else:
    q_first = jnp.asarray(q_first)
    dq, (dk_N, dv_N) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dq = _ungrouped(dq, t, h).astype(q_BxTxHxK.dtype)
  # [nk, B, G, bk, K] -> [B, S, G, K]
  dk, dv = (jnp.moveaxis(x, 0, 2).reshape(b, g, nk * bk, hd)[:, :, :s].swapaxes(1, 2)
            for x in (dk_N, dv_N))
  return dq, dk.astype(k_BxSxGxK.dtype), dv.astype(v_BxSxGxK.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend_blockwise(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, block=BLOCK_SIZE):
  """Causal grouped-query attention over key/value blocks, never materialising the
  [T, S] scores: O(T x block) memory per row and head, forward and backward.

  The forward keeps a running max and sum per query row (online softmax) and rescales its
  accumulator as each key block arrives; only the key blocks at or before a query block's
  last position are visited. The custom VJP saves q, k, v, the output and the rows'
  log-sum-exp, and recomputes each block's probabilities in the backward pass. Values
  equal `_attend`'s wherever a query row has a valid key; a row with none (a left pad)
  gives 0 and passes no gradient (reference: the uniform average).
  """
  return _blockwise_fwd_impl(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, block)[0]


def _attend_blockwise_fwd(q, k, v, kv_mask, block):
  out, lse = _blockwise_fwd_impl(q, k, v, kv_mask, block)
  return out, (q, k, v, kv_mask, out, lse)


attend_blockwise.defvjp(_attend_blockwise_fwd, _blockwise_bwd_impl)


# --- cudnn: jax.nn.dot_product_attention's cuDNN kernel ----------------------------------


def attend_seq_lengths(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, kv_mask_BxT, *,
                       implementation: str = "cudnn"):
  """A causal pass (S = T) through `jax.nn.dot_product_attention`, its padding given as
  sequence lengths (the cuDNN kernel takes no dense mask; its XLA fallback builds the
  scores, so implementation="xla" is for checking this function on a CPU only).

  Sequence lengths describe right padding; a left-padded row (pads, then one run of valid
  slots, then pads) is rotated left by its leading pads, so its valid run starts at slot
  0, and the output rotated back: causality and RoPE (applied before) are unchanged by
  the rotation. A batch whose mask is not one run per row cannot be expressed that way
  and runs `attend_blockwise` instead (a lax.cond on the mask).
  """
  b, t = kv_mask_BxT.shape
  mask = kv_mask_BxT.astype(jnp.bool_)
  lead_B = jnp.argmax(mask, axis=1).astype(jnp.int32)      # 0 for an all-pad row
  len_B = jnp.sum(mask, axis=1, dtype=jnp.int32)
  slots = jnp.arange(t, dtype=jnp.int32)
  one_run = jnp.all(mask == ((slots >= lead_B[:, None]) & (slots < (lead_B + len_B)[:, None])))

  def rotated(q, k, v):
    take = lambda x, idx: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
    fwd_idx = (slots[None] + lead_B[:, None]) % t            # rotated slot i <- slot i + lead
    out = jax.nn.dot_product_attention(
        take(q, fwd_idx), take(k, fwd_idx), take(v, fwd_idx), is_causal=True,
        # At least one slot: an all-pad row then reads a pad (finite) instead of nothing.
        query_seq_lengths=jnp.maximum(len_B, 1), key_value_seq_lengths=jnp.maximum(len_B, 1),
        implementation=implementation)
    return take(out, (slots[None] - lead_B[:, None]) % t)

  return jax.lax.cond(one_run, rotated,
                      lambda q, k, v: attend_blockwise(q, k, v, mask, BLOCK_SIZE),
                      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK)


# --- splash: JAX's Pallas splash attention kernel for TPU ---------------------------------


def _splash_per_device(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, *,
                       interpret: bool = False):
  """`attend_splash` run by each device on its own rows and heads under a mesh (rows over
  the batch axes, heads over `tensor`): XLA cannot partition a Mosaic kernel, so a
  sharded call must be a `jax.shard_map` (found by compiling for a TPU topology)."""
  from egpo_jax.models import sharding   # noqa: PLC0415  (models.sharding imports config)
  mesh = sharding.per_device_mesh()
  run = functools.partial(attend_splash, interpret=interpret)
  if mesh is None:
    return run(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS)
  batch = "activation_batch"
  q_spec = sharding.logical_spec((batch, None, "activation_heads", None), q_BxTxHxK.shape,
                                 mesh)
  kv_spec = sharding.logical_spec((batch, None, "activation_kv_heads", None),
                                  k_BxSxGxK.shape, mesh)
  mask_spec = sharding.logical_spec((batch, None), kv_mask_BxS.shape, mesh)
  padded = lambda p: tuple(p) + (None,) * 4   # noqa: E731
  if (padded(q_spec)[0] != padded(kv_spec)[0] or padded(q_spec)[0] != padded(mask_spec)[0]
      or padded(q_spec)[2] != padded(kv_spec)[2]):
    raise ValueError(f"model.attention='splash': the mesh {dict(mesh.shape)} splits the "
                     f"rows or heads of q {q_BxTxHxK.shape} and k {k_BxSxGxK.shape} "
                     "differently; use 'blockwise' or a mesh that divides both")
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                       out_specs=q_spec, check_vma=False)(
                           q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS)


def attend_splash(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, kv_mask_BxS, *, interpret: bool = False):
  """Causal grouped-query attention through `splash_attention` (Pallas, TPU).

  Lengths are padded at the end to multiples of 128 (the kernel's tiles). Validity is
  given as segment ids (valid slots 1, pads 0: a valid query reads only valid keys), and
  the queries' offset S - T in the causal mask places them after a shared prompt (the
  "extend" layout). Every query row keeps at least one allowed key, as the kernel needs:
  its own slot (valid or pad) or, for the padded tail of queries, a padded key slot S.
  A left-pad query row gets finite garbage (the pads' average), as in `_attend`.
  interpret=True runs the kernel in the Pallas interpreter (CPU tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, h, hd = q_BxTxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  up = lambda n: -(-n // 128) * 128
  tp = up(t)
  sp = up(s + (tp > t))              # a padded key for the padded queries to read
  block = next(n for n in (512, 256, 128) if tp % n == 0 and sp % n == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((tp, sp), offset=s - t)] * h)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  # The kernel does not scale the scores.
  q = jnp.pad(q_BxTxHxK * jnp.asarray(1.0 / math.sqrt(hd), q_BxTxHxK.dtype),
              ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
          for x in (k_BxSxGxK, v_BxSxGxK))
  kv_ids = jnp.pad(kv_mask_BxS.astype(jnp.int32), ((0, 0), (0, sp - s)))
  q_ids = jnp.pad(kv_mask_BxS[:, s - t:].astype(jnp.int32), ((0, 0), (0, tp - t)))
  out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(qi, ki)))(
      q, k, v, q_ids, kv_ids)
  return out.transpose(0, 2, 1, 3)[:, :t].astype(v_BxSxGxK.dtype)
