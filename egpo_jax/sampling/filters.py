"""Next-token sampling: temperature, top-k, top-p and greedy, plus the reported log-probs.

Truncation follows Hugging Face `generate` and vLLM: logits are divided by the
temperature, top-k keeps the k largest (exactly k; ties go to the lower token id), and
top-p then keeps, of those, the smallest set of most probable tokens whose cumulative
probability, renormalised over the survivors, is >= p. Token i (in descending order) is
kept iff the probability mass strictly before it is < p, so the token that crosses p is
kept and at least one token always survives. A token is drawn from the survivors by
inverse CDF from one uniform number per row.

The log-probability reported for a sampled token is log softmax(logits / T) over the
FULL vocabulary, without the top-k/top-p truncation (docs/METHOD.md section 1, verl's
convention), so the trainer recomputes the same number from a teacher-forced pass.
Greedy decoding reports T = 1 log-probs (the raw policy).
"""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def top_p_keep_mask(sorted_logits_xK: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Which tokens of a descending-sorted row top-p keeps.

  Args:
    sorted_logits_xK: logits sorted in descending order along the last axis (already
      divided by the temperature; -inf entries are tokens removed earlier, e.g. by top-k).
    top_p: nucleus mass in (0, 1].

  Returns:
    bool mask, True where the probability mass strictly before the token is < top_p.
  """
  chex.assert_rank(sorted_logits_xK, {1, 2})
  probs = jax.nn.softmax(sorted_logits_xK.astype(jnp.float32), axis=-1)
  # Exclusive cumulative sum: the first token has mass 0 before it, so it is always kept.
  cumulative = jnp.cumsum(probs, axis=-1)
  before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]],
                           axis=-1)
  return before < top_p


def truncate_logits(scaled_logits_xV: jax.Array, *, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The top-k/top-p survivors of temperature-scaled logits, most probable first.

  Args:
    scaled_logits_xV: logits / temperature, shape [V] or [N, V].
    top_k: keep the k largest; 0 keeps all V (static).
    top_p: nucleus mass in (0, 1]; 1.0 disables it (static).

  Returns:
    (values_xK, token_ids_xK): the K = top_k (or V) largest scaled logits in descending
    order, with -inf where top-p drops a token, and their token ids.
  """
  chex.assert_rank(scaled_logits_xV, {1, 2})
  vocab = scaled_logits_xV.shape[-1]
  k = top_k if 0 < top_k < vocab else vocab
  values_xK, ids_xK = jax.lax.top_k(scaled_logits_xV, k)
  if top_p < 1.0:
    values_xK = jnp.where(top_p_keep_mask(values_xK, top_p), values_xK, -jnp.inf)
  return values_xK, ids_xK


def filter_logits(logits_xV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """logits / temperature with the tokens that top-k/top-p drop set to -inf.

  softmax of the result is exactly the distribution `sample_tokens` draws from (with the
  same arguments and greedy=False). Shape [V] or [N, V].
  """
  chex.assert_rank(logits_xV, {1, 2})
  check_sampling_args(temperature, top_k, top_p, logits_xV.shape[-1], greedy=False)
  scaled = logits_xV.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1.0:
    return scaled
  values_xK, ids_xK = truncate_logits(scaled, top_k=top_k, top_p=top_p)
  out = jnp.full_like(scaled, -jnp.inf)
  if out.ndim == 1:
    return out.at[ids_xK].set(values_xK)
  rows = jnp.arange(out.shape[0])[:, None]
  return out.at[rows, ids_xK].set(values_xK)


def sample_tokens(keys_N: jax.Array, logits_NxV: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> jax.Array:
  """One token per row from softmax(logits / T) restricted by top-k then top-p.

  Each row uses only its own key (one uniform draw, see `sample_tokens_from_uniforms`),
  so a row's token does not depend on the other rows.

  Args:
    keys_N: one PRNG key per row (typed keys [N] or raw uint32 keys [N, 2]).
    logits_NxV: float logits.
    temperature: > 0 (static); ignored when greedy.
    top_k: 0 disables (static).
    top_p: in (0, 1]; 1.0 disables (static).
    greedy: argmax instead of sampling (static); temperature 0 means the same.

  Returns:
    tokens_N int32.
  """
  chex.assert_rank(logits_NxV, 2)
  if greedy or temperature == 0:
    uniforms_N = jnp.zeros(logits_NxV.shape[:1], jnp.float32)
  else:
    uniforms_N = jax.vmap(jax.random.uniform)(keys_N)
  return sample_tokens_from_uniforms(uniforms_N, logits_NxV, temperature=temperature,
                                     top_k=top_k, top_p=top_p, greedy=greedy)


def sample_tokens_from_uniforms(uniforms_N: jax.Array, logits_NxV: jax.Array, *,
                                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                greedy: bool = False) -> jax.Array:
  """`sample_tokens` by inverse-CDF sampling, given one uniform in [0, 1) per row.

  Row n gets the first token whose cumulative probability exceeds u_n (times the total,
  which absorbs rounding), so token i is drawn with probability p_i and a token with
  p_i = 0 never is. One uniform per token, instead of Gumbel noise over the vocabulary,
  lets the engine draw all of a rollout's randomness before its decode loop.
  """
  chex.assert_rank([uniforms_N, logits_NxV], [1, 2])
  chex.assert_equal_shape_prefix([uniforms_N, logits_NxV], 1)
  check_sampling_args(temperature, top_k, top_p, logits_NxV.shape[-1], greedy=greedy)
  if greedy or temperature == 0:
    return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  scaled_NxV = logits_NxV.astype(jnp.float32) / temperature
  return _sample_scaled(uniforms_N, scaled_NxV, top_k=top_k, top_p=top_p)


def sample_with_logps(uniforms_N: jax.Array, logits_NxV: jax.Array, *,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      greedy: bool = False, return_entropy: bool = False
                      ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`sample_tokens_from_uniforms` and `token_logps_and_entropy` in one pass.

  The decode loop's per-token work: the tokens are those `sample_tokens_from_uniforms`
  draws; their log-probs (and the entropy) are those of `token_logps_and_entropy` at the
  sampling temperature, or at temperature 1 when greedy. Without top-k/top-p, sampling
  and scoring share one exp over the vocabulary; no sort runs unless top-k/top-p is on.

  Under a mesh (`sharding.active_mesh`) that splits the logits' vocabulary over `tensor`
  (the decode loop's vocabulary-split head), plain sampling and greedy decoding run per
  device (`_sample_vocab_split`) and exchange only per-row values, instead of gathering
  the [rows, V] logits at every token step. top-k/top-p need the whole row (a sort over
  the vocabulary) and keep the gathered path.

  Returns:
    (tokens_N int32, logps_N float32, entropy_N float32 or None).
  """
  chex.assert_rank([uniforms_N, logits_NxV], [1, 2])
  chex.assert_equal_shape_prefix([uniforms_N, logits_NxV], 1)
  check_sampling_args(temperature, top_k, top_p, logits_NxV.shape[-1], greedy=greedy)
  greedy = greedy or temperature == 0
  kwargs = dict(temperature=1.0 if greedy else temperature, greedy=greedy,
                return_entropy=return_entropy)
  if top_k == 0 and top_p >= 1.0:
    split = _vocab_split_mesh(logits_NxV.shape)
    if split is not None:
      return _sample_vocab_split(uniforms_N, logits_NxV, *split, **kwargs)
  return _sample_with_logps(uniforms_N, logits_NxV, top_k=top_k, top_p=top_p, **kwargs)


def _sample_with_logps(uniforms_N, logits_NxV, *, temperature, top_k, top_p, greedy,
                       return_entropy):
  """`sample_with_logps` on whole rows (temperature 1 when greedy)."""
  scaled_NxV = logits_NxV.astype(jnp.float32) / temperature
  max_Nx1 = jnp.max(scaled_NxV, axis=-1, keepdims=True)
  weights_NxV = jnp.exp(scaled_NxV - max_Nx1)
  if greedy:
    tokens_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  elif top_k == 0 and top_p >= 1.0:
    tokens_N = _inverse_cdf(uniforms_N, weights_NxV)
  else:
    tokens_N = _sample_scaled(uniforms_N, scaled_NxV, top_k=top_k, top_p=top_p)
  total_N = jnp.sum(weights_NxV, axis=-1)
  lse_N = max_Nx1[:, 0] + jnp.log(total_N)
  picked_N = jnp.take_along_axis(scaled_NxV, tokens_N[:, None], axis=-1)[:, 0]
  entropy_N = None
  if return_entropy:
    # where(): a -inf logit (a masked token) has weight 0 and contributes 0, not nan.
    mean_N = jnp.sum(jnp.where(weights_NxV > 0, weights_NxV * scaled_NxV, 0.0), axis=-1)
    entropy_N = lse_N - mean_N / total_N
  return tokens_N, picked_N - lse_N, entropy_N


_VOCAB_AXIS = "tensor"


def _vocab_split_mesh(shape):
  """(mesh, rows' mesh axes) when the active mesh splits logits of `shape` [N, V] over
  `tensor` along V (`sharding.logits_spec`), else None (also inside a caller's shard_map,
  whose rows are already per device: `engine`'s static sampler, with whole rows)."""
  from egpo_jax.models import sharding   # noqa: PLC0415  (keeps filters importable alone)
  mesh = sharding.per_device_mesh()
  if mesh is None or mesh.shape[_VOCAB_AXIS] == 1:
    return None
  spec = tuple(sharding.logits_spec(tuple(shape), mesh)) + (None, None)
  if spec[1] != _VOCAB_AXIS:
    return None
  return mesh, spec[0]


def _sample_vocab_split(uniforms_N, logits_NxV, mesh, rows, *, temperature, greedy,
                        return_entropy):
  """`_sample_with_logps` (no top-k/top-p) per device on vocabulary-split logits.

  Each of the t devices of a `tensor` group holds V / t consecutive logits of its rows.
  The maths is that of the whole row, with every sum over V split into t local sums:
  the max is a pmax, sum exp (and, for the entropy, sum p * logit) a psum; the inverse
  CDF runs in three levels instead of two: the t devices' masses (an all-gather of
  [rows, t]) locate the device holding the token, and that device searches its own
  slice with the target minus the masses before it (`_inverse_cdf`'s two levels, on its
  V / t weights). Greedy is a pmax of each device's max, ties going to the lowest token
  id (pmin), as argmax. The token and its logit come from the device that holds them
  (psum of zeros elsewhere). So only [rows] or [rows, t] values cross devices.

  The law is the same; the rounding of the sums differs from the gathered version's, so
  a token can differ only where u * total falls within rounding of a cumulative weight
  (the project's near-tie rule), and log-probs / entropy agree to float32 rounding.
  """
  vocab_local = logits_NxV.shape[-1] // mesh.shape[_VOCAB_AXIS]

  def local(uniforms_n, logits_nxv):
    shard = jax.lax.axis_index(_VOCAB_AXIS)
    offset = shard * vocab_local
    scaled_nxv = logits_nxv.astype(jnp.float32) / temperature
    max_n = jax.lax.pmax(jnp.max(scaled_nxv, axis=-1), _VOCAB_AXIS)
    weights_nxv = jnp.exp(scaled_nxv - max_n[:, None])
    mass_nxt = jax.lax.all_gather(jnp.sum(weights_nxv, axis=-1), _VOCAB_AXIS, axis=1)
    cdf_nxt = jnp.cumsum(mass_nxt, axis=-1)
    total_n = cdf_nxt[:, -1]
    if greedy:
      local_n = jnp.argmax(scaled_nxv, axis=-1).astype(jnp.int32)
      best_n = jnp.max(scaled_nxv, axis=-1)
      # The lowest id among the devices holding the maximum (argmax's tie rule).
      token_n = jax.lax.pmin(jnp.where(best_n == max_n, offset + local_n,
                                       jnp.iinfo(jnp.int32).max), _VOCAB_AXIS)
      mine_n = (token_n >= offset) & (token_n < offset + vocab_local)
      local_n = jnp.clip(token_n - offset, 0, vocab_local - 1)
    else:
      target_n = uniforms_n * total_n
      owner_n = _search(target_n, cdf_nxt)
      before_n = jnp.where(owner_n > 0, jnp.take_along_axis(
          cdf_nxt, jnp.maximum(owner_n - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
      mine_n = owner_n == shard
      local_n = _inverse_cdf(uniforms_n, weights_nxv, target_N=target_n - before_n)
      token_n = jax.lax.psum(jnp.where(mine_n, offset + local_n, 0), _VOCAB_AXIS)
    picked_n = jnp.take_along_axis(scaled_nxv, local_n[:, None], axis=-1)[:, 0]
    sums = [jnp.where(mine_n, picked_n, 0.0)]
    if return_entropy:
      # where(): a -inf logit (a masked token) has weight 0 and contributes 0, not nan.
      sums.append(jnp.sum(jnp.where(weights_nxv > 0, weights_nxv * scaled_nxv, 0.0), -1))
    sums = jax.lax.psum(sums, _VOCAB_AXIS)
    lse_n = max_n + jnp.log(total_n)
    entropy_n = lse_n - sums[1] / total_n if return_entropy else None
    return token_n.astype(jnp.int32), sums[0] - lse_n, entropy_n

  row_spec = P(rows)
  return jax.shard_map(local, mesh=mesh, in_specs=(row_spec, P(rows, _VOCAB_AXIS)),
                       out_specs=(row_spec, row_spec, row_spec if return_entropy else None),
                       check_vma=False)(uniforms_N, logits_NxV)


def _sample_scaled(uniforms_N, scaled_NxV, *, top_k, top_p):
  if top_k == 0 and top_p >= 1.0:
    return _inverse_cdf(uniforms_N, jnp.exp(scaled_NxV - jnp.max(scaled_NxV, -1, keepdims=True)))
  values_NxK, ids_NxK = truncate_logits(scaled_NxV, top_k=top_k, top_p=top_p)
  # Sorted in descending order: the first value is the row's maximum.
  choice_N = _inverse_cdf(uniforms_N, jnp.exp(values_NxK - values_NxK[:, :1]))
  return jnp.take_along_axis(ids_NxK, choice_N[:, None], axis=-1)[:, 0]


def _inverse_cdf(uniforms_N: jax.Array, weights_NxK: jax.Array,
                 target_N: jax.Array | None = None) -> jax.Array:
  """The first index whose cumulative weight exceeds u * total (weights >= 0, unnormalised),
  or target_N (>= 0) when given (`_sample_vocab_split`: a device's share of the target).

  Over a long vocabulary the search runs in two levels, blocks of ~sqrt(K) weights and
  then the weights of the chosen block, because a cumulative sum over K is XLA:CPU's
  slowest op in the decode step (a reduce-window: ~20% of the tiny model's rollout at
  K = 512); the law is the same, and the drawn index can differ from a flat search only
  where u * total falls within rounding of a cumulative weight.

  u * total can round up to the total: each level caps the index at the first position
  where its cumulative weight reaches its total, which holds weight > 0 (a float
  cumulative sum of non-negative terms never decreases), so a zero-weight index is never
  returned. The second level searches target minus the blocks' cumulative weight the
  first level compared it with, so its target is never negative.
  """
  n, k = weights_NxK.shape
  size = _cdf_block(k)
  if size == k:
    cdf_NxK = jnp.cumsum(weights_NxK, axis=-1)
    return _search(uniforms_N * cdf_NxK[:, -1] if target_N is None else target_N, cdf_NxK)
  blocks = -(-k // size)
  padded_NxBxS = jnp.pad(weights_NxK, ((0, 0), (0, blocks * size - k))).reshape(
      n, blocks, size)
  block_cdf_NxB = jnp.cumsum(jnp.sum(padded_NxBxS, axis=-1), axis=-1)
  if target_N is None:
    target_N = uniforms_N * block_cdf_NxB[:, -1]
  block_N = _search(target_N, block_cdf_NxB)
  previous_N = jnp.maximum(block_N - 1, 0)[:, None]
  before_N = jnp.where(block_N > 0,
                       jnp.take_along_axis(block_cdf_NxB, previous_N, axis=-1)[:, 0], 0.0)
  inner_NxS = jnp.take_along_axis(padded_NxBxS, block_N[:, None, None], axis=1)[:, 0]
  return block_N * size + _search(target_N - before_N, jnp.cumsum(inner_NxS, axis=-1))


def _cdf_block(k: int) -> int:
  """Block length of the two-level search: K itself up to 64, else ~sqrt(K), a power of 2."""
  return k if k <= 64 else 1 << math.ceil(math.log2(math.sqrt(k)))


def _search(target_N: jax.Array, cdf_NxK: jax.Array) -> jax.Array:
  """First index whose cumulative weight exceeds target (>= 0), capped at the first
  index where the cumulative weight reaches its total."""
  index_N = jnp.sum(cdf_NxK <= target_N[:, None], axis=-1, dtype=jnp.int32)
  last_N = jnp.sum(cdf_NxK < cdf_NxK[:, -1:], axis=-1, dtype=jnp.int32)
  return jnp.minimum(index_N, last_N)


def token_logps_and_entropy(logits_NxV: jax.Array, tokens_N: jax.Array, *,
                            temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """log softmax(logits / T)[token] and the Shannon entropy of softmax(logits / T).

  Both over the full vocabulary, untruncated (docs/METHOD.md section 1). Pass
  temperature=1 for greedy decoding. temperature may be traced here.

  Returns:
    (logps_N, entropy_N), float32.
  """
  chex.assert_rank([logits_NxV, tokens_N], [2, 1])
  chex.assert_equal_shape_prefix([logits_NxV, tokens_N], 1)
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}; "
                     "greedy decoding reports temperature-1 log-probs")
  scaled_NxV = logits_NxV.astype(jnp.float32) / temperature
  lse_N = jax.nn.logsumexp(scaled_NxV, axis=-1)
  picked_N = jnp.take_along_axis(scaled_NxV, tokens_N[:, None].astype(jnp.int32), axis=-1)
  probs_NxV = jnp.exp(scaled_NxV - lse_N[:, None])
  # where(): a -inf logit (a masked token) has p = 0 and contributes 0, not nan.
  entropy_N = lse_N - jnp.sum(jnp.where(probs_NxV > 0, probs_NxV * scaled_NxV, 0.0), axis=-1)
  return picked_N[:, 0] - lse_N, entropy_N


def check_sampling_args(temperature, top_k, top_p, vocab_size=None, *, greedy=False):
  """Raises a ValueError/TypeError naming the bad field; vocab_size None skips top_k <= V."""
  if isinstance(temperature, jax.Array) or isinstance(top_p, jax.Array):
    raise TypeError("temperature and top_p are static Python numbers (each value compiles "
                    "once); pass floats, not arrays")
  if not greedy and not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1.0 disables it), got {top_p}")
  if not isinstance(top_k, numbers.Integral) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
  if vocab_size is not None and top_k > vocab_size:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}; use "
                     "top_k <= vocab_size or 0 to disable it")
