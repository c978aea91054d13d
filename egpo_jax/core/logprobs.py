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

Under a mesh set with `jax.set_mesh` the head is vocabulary-parallel over every device
(Megatron's parallel cross-entropy, here over data x fsdp x tensor): each chunk's hidden
states are gathered ([chunk, D], small), each device computes the logits of its slice of
the vocabulary for all of the chunk's positions, and the log-sum-exp, target logit and
entropy are reduced across devices as [chunk] vectors. The backward pass then adds each
chunk's head gradient into the device's own [V / devices, D] slice: no device holds a
whole [V, D] (the head gathered, or a float32 partial sum of its gradient), so the
per-device memory of the log-prob pass shrinks with the devices, and nothing [V, D]-sized
is reduced (`_vocab_parallel`). The hidden states' gradient is reduce-scattered back to
the rows, one [chunk, D] per chunk.
"""

from __future__ import annotations

import functools

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


# Under a mesh: a chunk's positions whole, its vocabulary over every device.
_CHUNK_D = (None, None)
_CHUNK_V = (None, "vocab_parallel")
_VOCAB_D = ("vocab_parallel", None)
_VOCAB = ("vocab_parallel",)
# Between the head's own layout (V over tensor, D over fsdp) and _VOCAB_D, one all-to-all
# within the fsdp groups each way: GSPMD could not go directly on a data x fsdp mesh
# ("Involuntary full rematerialization": the whole float32 [V, D] on every device).
_VOCAB_NOT_FSDP = ("vocab_parallel_not_fsdp", "param_embed")
_ROWS_D = ("activation_batch", "activation_embed")


def _vocab_parallel() -> bool:
  """Whether a mesh is set (`jax.set_mesh`): the head then runs vocabulary-parallel.

  Before, with the vocabulary split over `tensor` only and the positions over data x
  fsdp, every device held the whole head (gathered, [V / tensor, D] in the compute
  dtype) and a float32 partial sum of its gradient, reduced once per micro-batch: at
  1.5B about 1.4 GB per device that did not shrink with the devices.
  """
  return sharding.active_mesh() is not None


def _scaled_logits(h_CxD, embedding_VxD, bias_V, temperature):
  """float32 (h @ embedding.T + bias) / temperature for one chunk, the matmul in h's
  dtype (never a silent upcast of bfloat16 hidden states to a float32 matmul)."""
  h_CxD = sharding.constrain(h_CxD, _CHUNK_D)
  logits_CxV = lax.dot_general(h_CxD, embedding_VxD.astype(h_CxD.dtype),
                               (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if bias_V is not None:
    logits_CxV = logits_CxV + bias_V.astype(jnp.float32)
  return sharding.constrain(logits_CxV / temperature, _CHUNK_V)


def _target_logit(s_CxV, t_C):
  """s[c, t_c]; under a mesh as a masked sum over the vocabulary: partitions over a split
  vocabulary (one [C] all-reduce), where a gather would move the logits. Without one, a
  gather: the mask would be one more [C, V] temporary (the forward's peak 4 -> 3 chunks)."""
  if not _vocab_parallel():
    return jnp.take_along_axis(s_CxV, t_C[:, None], axis=-1)[:, 0]
  hit_CxV = lax.broadcasted_iota(jnp.int32, s_CxV.shape, 1) == t_C[:, None]
  return jnp.sum(jnp.where(hit_CxV, s_CxV, 0.0), axis=-1)


def _layout(num_rows, chunk_size):
  """(rows per chunk, number of chunks), balanced so that padding is under one chunk."""
  num_chunks = -(-num_rows // chunk_size)
  return -(-num_rows // num_chunks), num_chunks


def _chunks(x_M, chunk, num_chunks):
  """`_chunked`, each chunk's positions kept split like the rows: the loop body gathers
  one chunk at a time (`_CHUNK_D`); unpinned, GSPMD gathered the whole micro-batch's
  hidden states before the loop."""
  x = _chunked(x_M, chunk, num_chunks)
  return sharding.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stats(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
           temperature):
  return _stats_fwd(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
                    temperature)[0]


def _stats_fwd(chunk_size, with_entropy, hidden_MxD, embedding_VxD, bias_V, targets_M,
               temperature):
  m = hidden_MxD.shape[0]
  chunk, num_chunks = _layout(m, chunk_size)
  emb_VxD, b_V = _head(embedding_VxD, bias_V, hidden_MxD.dtype)

  def body(_, xs):
    h_CxD, t_C = xs
    s_CxV = _scaled_logits(h_CxD, emb_VxD, b_V, temperature)
    lse_C = jax.nn.logsumexp(s_CxV, axis=-1)
    logp_C = _target_logit(s_CxV, t_C) - lse_C
    if with_entropy:
      # Sum of p * (-log p): every term is >= 0, so no cancellation of large logits.
      logp_CxV = s_CxV - lse_C[:, None]
      ent_C = -jnp.sum(jnp.exp(logp_CxV) * logp_CxV, axis=-1)
    else:
      ent_C = jnp.zeros_like(lse_C)
    return None, (logp_C, lse_C, ent_C)

  xs = (_chunks(hidden_MxD, chunk, num_chunks), _chunks(targets_M, chunk, num_chunks))
  _, outs = lax.scan(body, None, xs)
  logp_M, lse_M, ent_M = (_unchunked(o, m) for o in outs)
  residuals = (hidden_MxD, embedding_VxD, bias_V, targets_M, temperature, lse_M, ent_M)
  return (logp_M, ent_M), residuals


def _head(embedding_VxD, bias_V, dtype):
  """The head in the matmul dtype, its vocabulary over every device under a mesh (one
  reshard per call, not per chunk)."""
  emb_VxD = embedding_VxD.astype(dtype)
  if _vocab_parallel():
    # Pinned to the parameter's own layout first: a tied table is also the input
    # embedding, and GSPMD otherwise carried the vocabulary split back to the lookup
    # (then a masked gather and an all-reduce of the whole [B, T, D] embedded batch).
    emb_VxD = sharding.constrain(emb_VxD, ("activation_vocab", "param_embed"))
    emb_VxD = sharding.constrain(emb_VxD, _VOCAB_NOT_FSDP)
    emb_VxD = sharding.constrain(emb_VxD, _VOCAB_D)
    if bias_V is not None:
      bias_V = sharding.constrain(bias_V, _VOCAB)
  return emb_VxD, bias_V


def _stats_bwd(chunk_size, with_entropy, residuals, cotangents):
  hidden_MxD, embedding_VxD, bias_V, targets_M, temperature, lse_M, ent_M = residuals
  g_logp_M, g_ent_M = cotangents
  m, _ = hidden_MxD.shape
  chunk, num_chunks = _layout(m, chunk_size)
  dtype = hidden_MxD.dtype
  emb_VxD, b_V = _head(embedding_VxD, bias_V, dtype)
  vocab = embedding_VxD.shape[0]

  def body(carry, xs):
    g_emb_VxD, g_bias_V, g_temp = carry
    h_CxD, t_C, lse_C, ent_C, g_logp_C, g_ent_C = xs
    h_CxD = sharding.constrain(h_CxD, _CHUNK_D)
    s_CxV = _scaled_logits(h_CxD, emb_VxD, b_V, temperature)
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
    g_z_CxV = sharding.constrain(g_s_CxV / temperature, _CHUNK_V)
    # Summed over the vocabulary slices: reduce-scattered back to the chunk's rows.
    g_h_CxD = jnp.dot(g_z_CxV.astype(dtype), emb_VxD, preferred_element_type=jnp.float32)
    g_h_CxD = sharding.constrain(g_h_CxD, _ROWS_D)
    # Each device's vocabulary slice of the head's gradient: no collective.
    g_emb_VxD = g_emb_VxD + sharding.constrain(lax.dot_general(
        g_z_CxV.astype(dtype), h_CxD, (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32), _VOCAB_D)
    if bias_V is not None:
      g_bias_V = g_bias_V + sharding.constrain(jnp.sum(g_z_CxV, axis=0), _VOCAB)
    return (g_emb_VxD, g_bias_V, g_temp), g_h_CxD.astype(hidden_MxD.dtype)

  xs = tuple(_chunks(x, chunk, num_chunks)
             for x in (hidden_MxD, targets_M, lse_M, ent_M, g_logp_M, g_ent_M))
  init = (sharding.constrain(jnp.zeros((vocab, embedding_VxD.shape[1]), jnp.float32),
                             _VOCAB_D),
          sharding.constrain(jnp.zeros((vocab,), jnp.float32), _VOCAB)
          if bias_V is not None else jnp.zeros((), jnp.float32),
          jnp.zeros((), jnp.float32))
  (g_emb_VxD, g_bias_V, g_temp), g_h = lax.scan(body, init, xs)
  if _vocab_parallel():
    # Back to the parameter's layout (as in `_head`): with a tied table the input
    # embedding's scatter-add otherwise ran in this vocabulary split, gathering the
    # whole embedded batch's gradient to every device.
    g_emb_VxD = sharding.constrain(g_emb_VxD, _VOCAB_NOT_FSDP)
    g_emb_VxD = sharding.constrain(g_emb_VxD, ("activation_vocab", "param_embed"))
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
