"""Per-token log-probs and Shannon entropies from hidden states, in chunks of positions.

The language-model head's logits are hidden @ embedding.T. For Qwen2.5's vocabulary
(V = 151,936) and a few thousand response tokens the float32 logits alone take gigabytes
(8,192 positions: 5 GB), and autodiff of a plain log-softmax keeps several arrays of that
size alive for the backward pass. `token_logprobs` walks over the flattened N*T positions
in chunks of `chunk_size` rows under a custom VJP: the forward pass keeps one
log-sum-exp and one entropy per position; the backward pass recomputes each chunk's
logits, turns them into d(loss)/d(logits) and folds them into the gradients of the hidden
states, the embedding and the bias at once. Temporary memory is then about one or two
chunk_size x V float32 buffers (0.62 GB each at chunk_size=1024, V=151,936) plus a
float32 V x D gradient accumulator, whatever N*T is. Measured with XLA's CPU buffer
assignment for loss + gradient at V=151,936, D=1,536, N*T=4,096: 1.25 / 1.57 / 2.20 GB
at chunk_size 512 / 1024 / 2048, against 7.5 GB with full logits (15 GB at
N*T=8,192). The price is one extra hidden @ embedding.T per chunk in the backward pass
(4 matmuls instead of 3).

Chunk k holds the positions k, k + K, k + 2K, ... (K chunks): with the positions sharded
over devices (data parallel under jit) each chunk is then sharded too, so all devices
work on every chunk (contiguous chunks would each sit on one device).

Chunks run over positions only, not over the vocabulary: with about 1,000 positions a
chunk's logits are the size of the embedding itself (the trade-off Liger-Kernel's fused
linear cross-entropy also makes), while vocabulary chunks would need an online
log-sum-exp and a second pass over the embedding. The number of chunks is
ceil(N*T / chunk_size), with equal chunks (the last rows zero-padded).

Convention (docs/METHOD.md section 1, as in verl): logits are float32,
(hidden @ embedding.T + bias) / temperature, and a log-prob is the log-softmax of these
logits at the target token, without top-k/top-p truncation. The matmuls run in the
hidden states' dtype, the model's compute dtype (bfloat16 hidden states with float32
master embeddings: a bfloat16 matmul, as the sampler's decode computes its logits), and
accumulate in float32; the embedding's gradient is returned in its own dtype.

Under a mesh set with `jax.set_mesh`, each chunk's positions stay split like the rows
(data x fsdp) and its logits' vocabulary over tensor (`models.sharding.constrain`). The
backward pass then accumulates the embedding's (and bias's) gradient as per-device partial
sums, [row shards, V, D] with the leading axis split like the rows (one [V, D] float32
per device, as before), and reduces them across devices once after the loop over chunks
rather than in every chunk (`_row_shards`).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
from jax import lax

from egpo_jax.models import sharding

DEFAULT_CHUNK_SIZE = 1024


def _validate(hidden_NxTxD, embedding_VxD, targets_NxT, bias_V, temperature, chunk_size):
  """Host-side checks with messages that name the field and the fix."""
  chex.assert_rank([hidden_NxTxD, embedding_VxD, targets_NxT], [3, 2, 2])
  if hidden_NxTxD.shape[:2] != targets_NxT.shape:
    raise ValueError(f"targets_NxT has shape {targets_NxT.shape} but hidden_NxTxD has "
                     f"{hidden_NxTxD.shape}: targets must be hidden_NxTxD.shape[:2]")
  if hidden_NxTxD.shape[-1] != embedding_VxD.shape[-1]:
    raise ValueError(f"embedding_VxD has width {embedding_VxD.shape[-1]} but hidden_NxTxD "
                     f"has {hidden_NxTxD.shape[-1]}: pass the (V, D) output embedding")
  if not jnp.issubdtype(targets_NxT.dtype, jnp.integer):
    raise TypeError(f"targets_NxT must hold integer token ids, got {targets_NxT.dtype}")
  for name, x in (("hidden_NxTxD", hidden_NxTxD), ("embedding_VxD", embedding_VxD)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")
  if bias_V is not None:
    chex.assert_shape(bias_V, (embedding_VxD.shape[0],))
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


_ROWS_D = ("activation_batch", "activation_embed")
_ROWS_V = ("activation_batch", "activation_vocab")


def _scaled_logits(h_CxD, embedding_VxD, bias_V, temperature):
  """float32 (h @ embedding.T + bias) / temperature for one chunk, the matmul in h's
  dtype (never a silent upcast of bfloat16 hidden states to a float32 matmul)."""
  h_CxD = sharding.constrain(h_CxD, _ROWS_D)
  logits_CxV = lax.dot_general(h_CxD, embedding_VxD.astype(h_CxD.dtype),
                               (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if bias_V is not None:
    logits_CxV = logits_CxV + bias_V.astype(jnp.float32)
  return sharding.constrain(logits_CxV / temperature, _ROWS_V)


def _layout(num_rows, chunk_size):
  """(rows per chunk, number of chunks), balanced so that padding is under one chunk."""
  num_chunks = -(-num_rows // chunk_size)
  return -(-num_rows // num_chunks), num_chunks


def _chunked(x_M, chunk, num_chunks):
  """[M, ...] -> [num_chunks, chunk, ...], zero-padded; chunk k holds rows k, k + K, ...

  Strided rather than contiguous chunks: when the rows are sharded over devices (data
  parallel under jit), every chunk then spans all devices and the scan over chunks runs
  on all of them at once, instead of on one device per chunk.
  """
  pad = num_chunks * chunk - x_M.shape[0]
  if pad:
    x_M = jnp.pad(x_M, [(0, pad)] + [(0, 0)] * (x_M.ndim - 1))
  return jnp.swapaxes(x_M.reshape((chunk, num_chunks) + x_M.shape[1:]), 0, 1)


def _unchunked(x_KxC, num_rows):
  """Inverse of `_chunked`: [num_chunks, chunk, ...] -> [num_rows, ...]."""
  x = jnp.swapaxes(x_KxC, 0, 1)
  return x.reshape((-1,) + x.shape[2:])[:num_rows]


_SHARDS_VD = ("activation_batch", "activation_vocab", "activation_embed")
_SHARDS_V = ("activation_batch", "activation_vocab")


def _row_shards(chunk):
  """Devices a chunk's rows are split over under the mesh of `jax.set_mesh` (1 without).

  The backward pass keeps one partial sum of the head's gradients per row shard
  ([shards, V, D], its leading axis split like the rows, so one [V, D] per device) and
  reduces them across devices once, after the loop over chunks. Summing each chunk's
  dW = dlogits^T @ h directly into a [V, D] carry made GSPMD all-reduce the float32
  [V, D] partial sums on every chunk (thousands of times per update at 1.5B).
  """
  mesh = sharding.active_mesh()
  if mesh is None:
    return 1
  spec = sharding.logical_spec(("activation_batch",), (chunk,), mesh)
  axes = spec[0] if len(spec) else None
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in names)


def _split_rows(x_CxF, shards):
  """[C, ...] -> [shards, C / shards, ...], the leading axis split like the rows."""
  x = x_CxF.reshape((shards, x_CxF.shape[0] // shards) + x_CxF.shape[1:])
  return sharding.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stats(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
           temperature):
  return _stats_fwd(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
                    temperature)[0]


def _stats_fwd(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
               temperature):
  m = hidden_MxD.shape[0]
  chunk, num_chunks = _layout(m, chunk_size)

  def body(_, xs):
    h_CxD, t_C = xs
    s_CxV = _scaled_logits(h_CxD, embedding_VxD, bias_V, temperature)
    lse_C = jax.nn.logsumexp(s_CxV, axis=-1)
    logp_C = jnp.take_along_axis(s_CxV, t_C[:, None], axis=-1)[:, 0] - lse_C
    if with_entropy:
      # Sum of p * (-log p): every term is >= 0, so no cancellation of large logits.
      logp_CxV = s_CxV - lse_C[:, None]
      ent_C = -jnp.sum(jnp.exp(logp_CxV) * logp_CxV, axis=-1)
    else:
      ent_C = jnp.zeros_like(lse_C)
    return None, (logp_C, lse_C, ent_C)

  xs = (_chunked(hidden_MxD, chunk, num_chunks), _chunked(targets_M, chunk, num_chunks))
  _, outs = lax.scan(body, None, xs)
  logp_M, lse_M, ent_M = (_unchunked(o, m) for o in outs)
  residuals = (hidden_MxD, embedding_VxD, bias_V, targets_M, temperature, lse_M, ent_M)
  return (logp_M, ent_M), residuals


def _stats_bwd(chunk_size, with_entropy, residuals, cotangents):
  hidden_MxD, embedding_VxD, bias_V, targets_M, temperature, lse_M, ent_M = residuals
  g_logp_M, g_ent_M = cotangents
  m, _ = hidden_MxD.shape
  chunk, num_chunks = _layout(m, chunk_size)
  dtype = hidden_MxD.dtype
  emb_VxD = embedding_VxD.astype(dtype)
  vocab = embedding_VxD.shape[0]
  shards = _row_shards(chunk)

  def body(carry, xs):
    g_emb_VxD, g_bias_V, g_temp = carry
    h_CxD, t_C, lse_C, ent_C, g_logp_C, g_ent_C = xs
    s_CxV = _scaled_logits(h_CxD, embedding_VxD, bias_V, temperature)
    logp_CxV = s_CxV - lse_C[:, None]
    p_CxV = jnp.exp(logp_CxV)
    # d logp_y / ds = onehot(y) - p; the one-hot is a fused compare, not a scatter.
    onehot_CxV = lax.broadcasted_iota(jnp.int32, s_CxV.shape, 1) == t_C[:, None]
    g_s_CxV = jnp.where(onehot_CxV, g_logp_C[:, None], 0.0) - g_logp_C[:, None] * p_CxV
    if with_entropy:
      # dH/ds_j = -p_j (log p_j + H).
      g_s_CxV = g_s_CxV - g_ent_C[:, None] * p_CxV * (logp_CxV + ent_C[:, None])
    # s = z / temperature: ds/dz = 1/temperature, ds/dtemperature = -s/temperature.
    # Rows of g_s sum to zero, so log p may stand in for s (better conditioned).
    g_temp = g_temp - jnp.sum(g_s_CxV * logp_CxV) / temperature
    g_z_CxV = sharding.constrain(g_s_CxV / temperature, _ROWS_V)
    g_h_CxD = jnp.dot(g_z_CxV.astype(dtype), emb_VxD, preferred_element_type=jnp.float32)
    g_h_CxD = sharding.constrain(g_h_CxD, _ROWS_D)
    if shards == 1:
      g_emb_VxD = g_emb_VxD + lax.dot_general(
          g_z_CxV.astype(dtype), h_CxD, (((0,), (0,)), ((), ())),
          preferred_element_type=jnp.float32)
      if bias_V is not None:
        g_bias_V = g_bias_V + jnp.sum(g_z_CxV, axis=0)
    else:
      # Per-device partial sums (leading axis over the row shards): no collective here.
      g_z_SxRxV = _split_rows(g_z_CxV.astype(dtype), shards)
      h_SxRxD = _split_rows(h_CxD, shards)
      g_emb_VxD = g_emb_VxD + sharding.constrain(lax.dot_general(
          g_z_SxRxV, h_SxRxD, (((1,), (1,)), ((0,), (0,))),
          preferred_element_type=jnp.float32), _SHARDS_VD)
      if bias_V is not None:
        g_bias_V = g_bias_V + sharding.constrain(
            jnp.sum(_split_rows(g_z_CxV, shards), axis=1), _SHARDS_V)
    return (g_emb_VxD, g_bias_V, g_temp), g_h_CxD.astype(hidden_MxD.dtype)

  xs = tuple(_chunked(x, chunk, num_chunks)
             for x in (hidden_MxD, targets_M, lse_M, ent_M, g_logp_M, g_ent_M))
  lead = () if shards == 1 else (shards,)
  init = (jnp.zeros(lead + (vocab, embedding_VxD.shape[1]), jnp.float32),
          jnp.zeros(lead + (vocab,) if bias_V is not None else (), jnp.float32),
          jnp.zeros((), jnp.float32))
  if shards > 1:
    init = (sharding.constrain(init[0], _SHARDS_VD),
            sharding.constrain(init[1], _SHARDS_V) if bias_V is not None else init[1],
            init[2])
  (g_emb_VxD, g_bias_V, g_temp), g_h = lax.scan(body, init, xs)
  if shards > 1:   # the one cross-device reduction of the head's gradients
    g_emb_VxD = jnp.sum(g_emb_VxD, axis=0)
    if bias_V is not None:
      g_bias_V = jnp.sum(g_bias_V, axis=0)
  g_hidden_MxD = _unchunked(g_h, m)
  g_bias = None if bias_V is None else g_bias_V.astype(bias_V.dtype)
  return (g_hidden_MxD, g_emb_VxD.astype(embedding_VxD.dtype), g_bias, None,
          g_temp.astype(temperature.dtype))


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_logprobs(hidden_NxTxD: jax.Array, embedding_VxD: jax.Array,
                   targets_NxT: jax.Array, *, temperature: float | jax.Array = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, return_entropy: bool = False,
                   bias_V: jax.Array | None = None
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log softmax((hidden @ embedding.T + bias) / temperature) at the targets, in chunks.

  Never materialises the N x T x V logits, in the forward or the backward pass (see the
  module docstring). Gradients w.r.t. hidden_NxTxD, embedding_VxD, bias_V and
  temperature are exact; the targets are integers and get none. Reverse mode only:
  the custom VJP does not support jax.jvp.

  Args:
    hidden_NxTxD: final hidden states at the positions that predict the targets; the
      matmuls run in their dtype (the embedding is cast to it), accumulating in float32.
    embedding_VxD: output embedding (lm_head weight, or the tied input embedding).
    targets_NxT: token ids in [0, V); masked positions may hold any such id (e.g. pad).
    temperature: sampling temperature T_sample (> 0), a float or a float32 scalar.
    chunk_size: at most this many of the flattened N*T positions per chunk (chunks
      are equal, zero-padded). Temporary memory grows with chunk_size x V x 4 bytes, not
      with N*T (see the module docstring).
    return_entropy: also return the Shannon entropy of softmax(logits / temperature).
    bias_V: optional output bias, added before the temperature scaling.

  Returns:
    logps_NxT (float32), or (logps_NxT, entropy_NxT) with return_entropy.
  """
  _validate(hidden_NxTxD, embedding_VxD, targets_NxT, bias_V, temperature, chunk_size)
  n, t, d = hidden_NxTxD.shape
  temperature = jnp.asarray(temperature, jnp.float32)
  chex.assert_rank(temperature, 0)
  logp_M, ent_M = _stats(chunk_size, bool(return_entropy), hidden_NxTxD.reshape(n * t, d),
                         embedding_VxD, bias_V, targets_NxT.reshape(n * t), temperature)
  if return_entropy:
    return logp_M.reshape(n, t), ent_M.reshape(n, t)
  return logp_M.reshape(n, t)


def token_logprobs_unchunked(hidden_NxTxD: jax.Array, embedding_VxD: jax.Array,
                             targets_NxT: jax.Array, *,
                             temperature: float | jax.Array = 1.0,
                             return_entropy: bool = False, bias_V: jax.Array | None = None
                             ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Reference for `token_logprobs`: full N x T x V float32 logits and plain autodiff.

  For tests, benchmarks and small vocabularies; same arguments and results.
  """
  _validate(hidden_NxTxD, embedding_VxD, targets_NxT, bias_V, temperature, 1)
  logits_NxTxV = jnp.einsum("ntd,vd->ntv", hidden_NxTxD,
                            embedding_VxD.astype(hidden_NxTxD.dtype),
                            preferred_element_type=jnp.float32)
  if bias_V is not None:
    logits_NxTxV = logits_NxTxV + bias_V.astype(jnp.float32)
  logp_NxTxV = jax.nn.log_softmax(logits_NxTxV / jnp.asarray(temperature, jnp.float32))
  logps_NxT = jnp.take_along_axis(logp_NxTxV, targets_NxT[..., None], axis=-1)[..., 0]
  if return_entropy:
    return logps_NxT, -jnp.sum(jnp.exp(logp_NxTxV) * logp_NxTxV, axis=-1)
  return logps_NxT
