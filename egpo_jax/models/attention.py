"""Attention: one entry point, `attend`, for the training forward, the shared-prompt
("extend") layout and one-token decoding.

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

import math

import jax
import jax.numpy as jnp

# Finite, so that a row with no valid key (a left pad) gives a uniform softmax, not NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)

IMPLEMENTATIONS = ("reference",)


def attend(q, k, v, kv_mask_BxS, *, implementation: str = "reference", prefix=None):
  """Softmax attention of q over the keys k and values v; see the module docstring.

  Args:
    q: [B, T, H, K] queries (RoPE applied); or [B, H, K], one query per row (decoding).
    k, v: [B, S, G, K] keys and values; for one query per row the decode layout,
      keys [B, G, K, S] and values [B, G, S, K] (`transformer.decode_layout`).
    kv_mask_BxS: bool, slot s of row b holds a valid key.
    implementation: one of IMPLEMENTATIONS (`ModelConfig.attention`).
    prefix: one query per row only: an optional shared prefix (keys [Bp, G, K, P],
      values [Bp, G, P, K], mask [Bp, P]) read by groups of B / Bp consecutive rows.

  Returns:
    [B, T, H, K] (or [B, H, K]) in v's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  if q.ndim == 3:
    # One query: the scores are [B, H, S], nothing to save; every implementation uses
    # the single-query path, which reads the decode cache layout without copies.
    return _attend_one(q, k, v, kv_mask_BxS, prefix)
  if prefix is not None:
    raise ValueError("attend: prefix is for one query per row (decoding) only")
  return _attend_recompute(q, k, v, kv_mask_BxS)


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
  rather than jax.checkpoint, so that the `remat` flag keeps meaning "rematerialise the
  whole layer". Reverse mode only (no jax.jvp), like the log-probs. The dense [B, T, S]
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
