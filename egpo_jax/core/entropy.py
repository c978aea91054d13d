"""Entropy proxies of responses: sampled-token NLL (EGPO Eq. 5), Shannon entropy, segments.

EGPO's zero-overhead proxy (Eq. 5) is the mean negative log-likelihood of the *sampled*
tokens under the old policy, over the response's valid tokens:

    H~(x, y) = -(1/T) * sum_{t=1..T} log pi_old(y_t | x, y_<t)

It reuses the old log-probs that the importance ratio needs anyway. It is not the
full-vocabulary Shannon entropy H_t = -sum_v p_t(v) log p_t(v), which EDGE-GRPO's
advantage (arXiv 2507.21848) and the calibration diagnostics use; `token_entropy`
computes that one from logits (float32, numerically stable, masked-vocabulary logits of
-inf allowed).

Segments (EGPO authors' runs): "joint" is the whole response, "thinking" the tokens
before the reasoning delimiter (e.g. the tokens of "</think>"), "answer" the tokens after
it. The delimiter is located in response coordinates at its FIRST occurrence among the
valid tokens; the delimiter tokens themselves belong to neither segment (they are a fixed
template string, not a decision of the model). A segment that cannot be located or has
no valid token falls back to the whole response (docs/METHOD.md section 1): without the
fallback a truncated failure that never closes its reasoning would get H~ = 0 and look
maximally confident. The per-response fallback flags are returned so that their sum can
be logged as a count.

Conventions: masks are bool or 0/1 numbers (non-zero = valid token); a response with no
valid token has proxy 0 and is never flagged as a fallback (it is padding, not a
response). All outputs are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

SEGMENTS = ("joint", "thinking", "answer")


def _as_bool_mask(mask: jax.Array) -> jax.Array:
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_sequence_mean(values_NxT: jax.Array, mask_NxT: jax.Array) -> jax.Array:
  """Per-row mean of `values_NxT` over the valid tokens of `mask_NxT`; 0 for an empty row.

  Args:
    values_NxT: per-token values, any float dtype (computed in float32).
    mask_NxT: valid tokens, bool or 0/1, same shape.

  Returns:
    means_N, float32. Invalid positions never reach the sum (NaN/inf there is ignored).
  """
  chex.assert_rank(values_NxT, 2, custom_message="values_NxT must be [N, T]",
                   exception_type=ValueError)
  chex.assert_equal_shape([values_NxT, mask_NxT], custom_message=(
      "values_NxT and mask_NxT must have the same [N, T] shape"), exception_type=ValueError)
  mask_NxT = _as_bool_mask(mask_NxT)
  values_NxT = jnp.where(mask_NxT, jnp.asarray(values_NxT, jnp.float32), 0.0)
  count_N = jnp.sum(mask_NxT, axis=-1).astype(jnp.float32)
  return jnp.sum(values_NxT, axis=-1) / jnp.maximum(count_N, 1.0)


def entropy_proxy(logps_NxT: jax.Array, mask_NxT: jax.Array) -> jax.Array:
  """EGPO Eq. 5: mean negative log-prob of the sampled tokens over valid tokens.

  Args:
    logps_NxT: old-policy log-probs of the sampled tokens (<= 0), [N, T].
    mask_NxT: valid response tokens (bool or 0/1), [N, T].

  Returns:
    H_N, float32, >= 0; 0 for a response without valid tokens.
  """
  return masked_sequence_mean(-jnp.asarray(logps_NxT, jnp.float32), mask_NxT)


def token_entropy(logits_xV: jax.Array) -> jax.Array:
  """Full-vocabulary Shannon entropy -sum_v p(v) log p(v) of softmax(logits), per position.

  Computed in float32 from max-shifted logits. Entries of -inf (masked vocabulary) have
  p = 0 and contribute 0; a position whose logits are all -inf gets entropy 0. The
  gradient is finite in both cases. Divide the logits by the sampling temperature first
  if the entropy of the sampling distribution is wanted.

  Args:
    logits_xV: logits with the vocabulary last, any leading shape (e.g. [N, T, V]).

  Returns:
    entropy with the leading shape (e.g. [N, T]), float32, in [0, log V].
  """
  logits = jnp.asarray(logits_xV, jnp.float32)
  if logits.ndim < 1 or logits.shape[-1] == 0:
    raise ValueError(f"logits_xV must have a non-empty vocabulary as its last axis, e.g. "
                     f"[N, T, V]; got shape {logits.shape}")
  live = logits > -jnp.inf
  m = jnp.max(jnp.where(live, logits, jnp.finfo(jnp.float32).min), axis=-1, keepdims=True)
  z = jnp.where(live, logits - m, 0.0)
  e = jnp.where(live, jnp.exp(z), 0.0)
  s = jnp.sum(e, axis=-1)
  any_live = s > 0
  s_safe = jnp.where(any_live, s, 1.0)
  # H = log s - sum_v p_v z_v, with p = e / s and z the shifted logits.
  ent = jnp.log(s_safe) - jnp.sum(e * z, axis=-1) / s_safe
  return jnp.where(any_live, jnp.maximum(ent, 0.0), 0.0)


class Segment(NamedTuple):
  """A segment of each response: its token mask and whether it fell back to the whole."""
  mask_NxT: jax.Array  # bool [N, T]
  fallback_N: jax.Array  # bool [N]


def _delimiter_array(delimiter) -> jax.Array:
  if delimiter is None:
    raise ValueError("delimiter is required for the 'thinking' and 'answer' segments: pass "
                     "the token ids of the reasoning delimiter, e.g. "
                     "tuple(tokenizer.encode('</think>'))")
  if isinstance(delimiter, (int, np.integer)):
    delimiter = (delimiter,)
  arr = jnp.asarray(delimiter)
  if arr.ndim != 1 or arr.shape[0] == 0:
    raise ValueError(f"delimiter must be a non-empty 1-D sequence of token ids, got shape "
                     f"{arr.shape}")
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(f"delimiter must hold integer token ids, got dtype {arr.dtype}")
  return arr


def delimiter_start(completion_ids_NxT: jax.Array, mask_NxT: jax.Array,
                    delimiter: Sequence[int] | jax.Array) -> tuple[jax.Array, jax.Array]:
  """First position where the whole delimiter lies on valid tokens.

  Args:
    completion_ids_NxT: response token ids (response coordinates, no prompt), [N, T].
    mask_NxT: valid response tokens, [N, T].
    delimiter: token ids of the delimiter, a static tuple of ints or a 1-D int array
      (its length is static; its values may be traced).

  Returns:
    (start_N int32, found_N bool); start_N is 0 where the delimiter is absent.
  """
  chex.assert_rank(completion_ids_NxT, 2, custom_message="completion_ids_NxT must be [N, T]",
                   exception_type=ValueError)
  chex.assert_equal_shape([completion_ids_NxT, mask_NxT], custom_message=(
      "completion_ids_NxT and mask_NxT must have the same [N, T] shape"),
                          exception_type=ValueError)
  delim_K = _delimiter_array(delimiter)
  mask_NxT = _as_bool_mask(mask_NxT)
  ids_NxT = jnp.asarray(completion_ids_NxT)
  n, t = ids_NxT.shape
  match_NxT = jnp.ones((n, t), jnp.bool_)
  for k in range(delim_K.shape[0]):  # Static and short (a few tokens): unrolled.
    # Position j holds token j + k; positions past the end never match.
    ids_k = jnp.pad(ids_NxT[:, k:], ((0, 0), (0, min(k, t))))
    ok_k = jnp.pad(mask_NxT[:, k:], ((0, 0), (0, min(k, t))), constant_values=False)
    match_NxT = match_NxT & ok_k & (ids_k == delim_K[k])
  found_N = jnp.any(match_NxT, axis=-1)
  start_N = jnp.where(found_N, jnp.argmax(match_NxT, axis=-1), 0).astype(jnp.int32)
  return start_N, found_N


def segment_mask(completion_ids_NxT: jax.Array, mask_NxT: jax.Array, *,
                 segment: str = "joint",
                 delimiter: Sequence[int] | jax.Array | None = None,
                 span_Nx2: jax.Array | None = None) -> Segment:
  """Token mask of one segment of each response, with the whole-response fallback.

  "joint": the valid tokens. "thinking": valid tokens before the first delimiter.
  "answer": valid tokens after the end of the first delimiter. The delimiter tokens are
  in neither. A thinking/answer segment falls back to all valid tokens, and is flagged,
  when the delimiter is absent or the segment has no valid token (delimiter at the very
  start or end). Responses without any valid token are never flagged.

  Args:
    completion_ids_NxT: response token ids in response coordinates, [N, T].
    mask_NxT: valid response tokens (padding after EOS is False), [N, T].
    segment: "joint", "thinking" or "answer" (static).
    delimiter: token ids of the reasoning delimiter; required unless segment="joint"
      and no `span_Nx2` is given.
    span_Nx2: instead of matching `delimiter`, each response's delimiter tokens
      [start, end) found elsewhere (host mode finds them on the decoded text), with
      start < 0 where it is absent.

  Returns:
    Segment(mask_NxT bool, fallback_N bool); the fallback count is fallback_N.sum().
  """
  if segment not in SEGMENTS:
    raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
  chex.assert_equal_shape([completion_ids_NxT, mask_NxT], custom_message=(
      "completion_ids_NxT and mask_NxT must have the same [N, T] shape"),
                          exception_type=ValueError)
  valid_NxT = _as_bool_mask(mask_NxT)
  if segment == "joint":
    return Segment(valid_NxT, jnp.zeros(valid_NxT.shape[:1], jnp.bool_))
  if span_Nx2 is None:
    start_N, found_N = delimiter_start(completion_ids_NxT, valid_NxT, delimiter)
    end_N = start_N + _delimiter_array(delimiter).shape[0]
  else:
    chex.assert_shape(span_Nx2, (valid_NxT.shape[0], 2))
    found_N = span_Nx2[:, 0] >= 0
    start_N, end_N = span_Nx2[:, 0], span_Nx2[:, 1]
  pos_T = jnp.arange(valid_NxT.shape[1])
  if segment == "thinking":
    seg_NxT = pos_T[None, :] < start_N[:, None]
  else:
    seg_NxT = pos_T[None, :] >= end_N[:, None]
  seg_NxT = seg_NxT & valid_NxT & found_N[:, None]
  fallback_N = jnp.any(valid_NxT, axis=-1) & ~jnp.any(seg_NxT, axis=-1)
  return Segment(jnp.where(fallback_N[:, None], valid_NxT, seg_NxT), fallback_N)


def segment_entropy_proxy(logps_NxT: jax.Array, completion_ids_NxT: jax.Array,
                          mask_NxT: jax.Array, *, segment: str = "joint",
                          delimiter: Sequence[int] | jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Eq. 5 over one segment of each response (with the fallback of `segment_mask`).

  Returns:
    (H_N float32, fallback_N bool).
  """
  chex.assert_equal_shape([logps_NxT, completion_ids_NxT, mask_NxT], custom_message=(
      "logps_NxT, completion_ids_NxT and mask_NxT must have the same [N, T] shape"),
                          exception_type=ValueError)
  seg = segment_mask(completion_ids_NxT, mask_NxT, segment=segment, delimiter=delimiter)
  return entropy_proxy(logps_NxT, seg.mask_NxT), seg.fallback_N
