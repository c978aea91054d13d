"""The policy model: a Qwen2/Qwen2.5/Llama-family decoder in Flax Linen, with a KV cache.

Token embedding, RoPE (theta, linear or Llama-3 scaling), RMSNorm, grouped-query
attention with optional q/k/v bias, SwiGLU MLP, tied or untied output embedding. The
layers are one `nn.scan` over stacked parameters (leading axis = layer), so a 28-layer
model compiles like a 1-layer one and the KV cache is [num_layers, B, S, K, head_dim].
The one-token `decode` is the same maths in plain jnp with the layers unrolled; it writes
each new key/value into the stacked cache in place (a scan carrying the cache copied all
of it on every step).

Everything public is a pure function of a params pytree with `config` as a static
keyword argument:

    params = init_params(config, rng)
    logits_BxLxV = forward(params, ids_BxL, mask_BxL, config=config)
    logits_BxV, cache = prefill(params, prompt_BxP, mask_BxP, init_cache(config, B, S),
                                config=config)
    logits_BxV, cache = decode(params, tokens_B, cache, config=config)

For group rollouts, `share_prefix` turns a prefilled cache of B prompts into one of B * G
rows that hold each prompt's keys and values once (decode reads them once per group).

Padding is on the left; position ids are cumsum(mask) - 1, as transformers' generate
computes them, so a left-padded row gets the same logits as the unpadded one.

Sharding: under a mesh set with `jax.set_mesh`, the layers constrain their activations by
logical axis names (`sharding.LOGICAL_RULES`): rows over data x fsdp, heads and MLP
columns over tensor, so each device computes its own rows and FSDP gathers weights. Without
a mesh the constraints are the identity. `forward` and `response_hidden` cast the master
params to the compute dtype first (`compute_params`), so weight all-gathers move bfloat16
under a bfloat16 config.

Numerics: on GPUs JAX's default matmul precision runs float32 dots as TF32 (measured on
an H100: 8e-4 max logit difference from transformers at float32, 5e-7 under
`jax.default_matmul_precision("highest")`); bfloat16 compute differs by ~1e-2. Attention
goes through `attention.attend` (the implementation is `config.attention`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.models import attention, sharding
from egpo_jax.models.config import REMAT_POLICIES, ModelConfig, to_dtype

Params = Any
_INIT_STD = 0.02  # transformers' initializer_range for these models

# Logical axes of the activations (`sharding.LOGICAL_RULES` maps them to the mesh).
_BTD = ("activation_batch", "activation_length", "activation_embed")
_BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_BTGK = ("activation_batch", "activation_length", "activation_kv_heads",
         "activation_head_dim")
_BTI = ("activation_batch", "activation_length", "activation_mlp")
_BTV = ("activation_batch", "activation_length", "activation_vocab")

# ModelConfig.remat's names -> the jax.checkpoint policy of each scanned layer.
_REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(_REMAT_POLICY) | {"none"} == set(REMAT_POLICIES)


def _constrain_rows(x_MxF, b, t, logical_axes):
  """`sharding.constrain` of a [B*T, ...] array through its [B, T, ...] view, so that it
  splits by rows exactly as the [B, T, ...] arrays around it do."""
  if sharding.active_mesh() is None:
    return x_MxF
  return sharding.constrain(x_MxF.reshape((b, t) + x_MxF.shape[1:]), logical_axes).reshape(
      x_MxF.shape)


def compute_params(params: Params, config: ModelConfig) -> Params:
  """The params cast to the compute dtype (config.dtype) where it is narrower.

  The layers cast their weights to the compute dtype before every matmul anyway; casting
  the (sharded) master params first makes FSDP's weight all-gathers move the narrow
  dtype (bf16: half the bytes), with the same values. Their gradients flow back to the
  float32 master params through the cast.
  """
  dtype = to_dtype(config.dtype)
  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits > jnp.finfo(
        dtype).bits:
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, params)


class KVCache(flax.struct.PyTreeNode):
  """Keys and values of every layer, written slot by slot.

  Attributes:
    k: [num_layers, B, S, num_kv_heads, head_dim] keys (RoPE applied), as `init_cache`
      and `prefill` make them; or, after `decode_layout`, a tuple of num_layers arrays
      [B, num_kv_heads, head_dim, S], which `decode` reads without copying.
    v: values, laid out like k; after `decode_layout`, [B, num_kv_heads, S, head_dim].
    mask_BxS: bool, slot s of row b holds a valid key.
    positions_B: int32, position id of the next token of each row.
    index: int32 scalar, the next slot to write (the same for all rows).
    rope_cos_SxF, rope_sin_SxF: float32 RoPE tables for positions 0..capacity (the most a
      row of this cache reaches), so that `decode` gathers its rows instead of computing
      sin and cos: XLA:CPU fused that into every layer's q and k and recomputed it per
      element (about 7% of the small model's decode step).

    prefix_k, prefix_v, prefix_mask_BpxP: an optional shared prefix (`share_prefix`): P
      slots held once per group of N / Bp consecutive rows (row n reads prefix row
      n // (N / Bp)), laid out like `decode_layout`'s keys [Bp, kv heads, head_dim, P] and
      values [Bp, kv heads, P, head_dim]. Slot indices (`index`, `max_len`, `capacity`)
      count the prefix's P slots first, then the rows' own; `k`, `v` and `mask_BxS` hold
      only the rows' own slots.

  A cache may hold fewer slots (`max_len`) than its `capacity`, and `grow_cache` adds
  empty ones as decoding reaches them: attention reads every slot the cache holds, so a
  decode loop run in phases of growing caches reads fewer (see `sampling.engine`).
  """
  k: jax.Array
  v: jax.Array
  mask_BxS: jax.Array
  positions_B: jax.Array
  index: jax.Array
  rope_cos_SxF: jax.Array
  rope_sin_SxF: jax.Array
  prefix_k: tuple[jax.Array, ...] | None = None
  prefix_v: tuple[jax.Array, ...] | None = None
  prefix_mask_BpxP: jax.Array | None = None

  @property
  def prefix_len(self) -> int:
    """Slots in the shared prefix (0 without one)."""
    return 0 if self.prefix_mask_BpxP is None else self.prefix_mask_BpxP.shape[1]

  @property
  def mask(self) -> jax.Array:
    """[B, max_len]: slot s of row b holds a valid key (shared prefix slots first)."""
    if self.prefix_mask_BpxP is None:
      return self.mask_BxS
    group = self.mask_BxS.shape[0] // self.prefix_mask_BpxP.shape[0]
    return jnp.concatenate([jnp.repeat(self.prefix_mask_BpxP, group, axis=0), self.mask_BxS],
                           axis=1)

  @property
  def positions(self) -> jax.Array:
    return self.positions_B

  @property
  def max_len(self) -> int:
    """The slots the cache holds now (a shared prefix's included)."""
    return self.prefix_len + self.mask_BxS.shape[1]

  @property
  def capacity(self) -> int:
    """The slots it may grow to (its RoPE tables cover their positions)."""
    return self.rope_cos_SxF.shape[0] - 1


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2], float32, as transformers computes them."""
  hd = config.head_size
  exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  scaling = config.rope_scaling_dict
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif rope_type == "llama3":
    # Llama-3: keep high frequencies, divide low ones by `factor`, interpolate between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def _rope_tables(positions_BxT: jax.Array, config: ModelConfig):
  inv_freq = jnp.asarray(rope_inv_freq(config))
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x_BxTxHxK: jax.Array, cos_BxTxF: jax.Array, sin_BxTxF: jax.Array):
  """Rotate-half RoPE (the Hugging Face layout: first half pairs with second half)."""
  x = x_BxTxHxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos_BxTxF[:, :, None, :], sin_BxTxF[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale with the normalisation in float32 (Zhang & Sennrich, 2019)."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return _rms_norm(x, scale, self.eps, self.dtype)


def _rms_norm(x, scale, eps, dtype):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * x32.astype(dtype)


def _dense(features, name, config, *, axis=-1, use_bias=False):
  return nn.DenseGeneral(features=features, axis=axis, use_bias=use_bias,
                         dtype=to_dtype(config.dtype), param_dtype=to_dtype(config.param_dtype),
                         kernel_init=nn.initializers.normal(_INIT_STD), name=name)


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU MLP; one step of the layer scan.

  Attends causally among the T new tokens (kv_mask_BxS has S = T), or in mode "extend"
  after a shared prompt's P slots (S = P + T). mode "prefill" also returns
  the new keys/values; one-token decoding is `decode`, written with the same maths on
  the same parameters.
  """
  config: ModelConfig
  mode: str

  @nn.compact
  def __call__(self, x_BxTxD, cos_BxTxF, sin_BxTxF, kv_mask_BxS, past_kv=None):
    c = self.config
    dtype, pdtype = to_dtype(c.dtype), to_dtype(c.param_dtype)
    b, t, d = x_BxTxD.shape
    # Rows over data x fsdp, heads and MLP columns over tensor (no-ops without a mesh):
    # the weights are then all-gathered, never the activations all-reduced over fsdp.
    x_BxTxD = sharding.constrain(x_BxTxD, _BTD)
    # Projections on [B*T, D]: XLA:CPU computes the weight gradient of a dot whose
    # contraction spans two batch axes (B, T) about 3x slower than over one flat axis.
    x_MxD = x_BxTxD.reshape(b * t, d)
    h = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="input_norm")(x_MxD)
    q = _dense((c.num_heads, c.head_size), "q_proj", c, use_bias=c.qkv_bias)(h)
    k = _dense((c.num_kv_heads, c.head_size), "k_proj", c, use_bias=c.qkv_bias)(h)
    v = _dense((c.num_kv_heads, c.head_size), "v_proj", c, use_bias=c.qkv_bias)(h)
    q = _apply_rope(sharding.constrain(q.reshape(b, t, c.num_heads, c.head_size), _BTHK),
                    cos_BxTxF, sin_BxTxF)
    k = _apply_rope(sharding.constrain(k.reshape(b, t, c.num_kv_heads, c.head_size), _BTGK),
                    cos_BxTxF, sin_BxTxF)
    v = sharding.constrain(v.reshape(b, t, c.num_kv_heads, c.head_size), _BTGK)
    new_kv = (k, v)
    if past_kv is not None:
      # mode "extend": the shared prompt's keys/values [B', P, ...], repeated over each
      # prompt's b / B' rows in front of the new ones (their gradients sum back).
      k, v = (sharding.constrain(
          jnp.concatenate([jnp.repeat(past.astype(new.dtype), b // past.shape[0], 0), new],
                          axis=1), _BTGK) for past, new in zip(past_kv, (k, v)))
    attn = sharding.constrain(
        attention.attend(q, k, v, kv_mask_BxS, implementation=c.attention), _BTHK)
    attn = attn.reshape(b * t, c.num_heads, c.head_size)
    x_MxD = x_MxD + _dense(c.hidden_size, "o_proj", c, axis=(-2, -1))(attn)
    x_MxD = _constrain_rows(x_MxD, b, t, _BTD)
    h = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="post_attn_norm")(x_MxD)
    gate = _constrain_rows(_dense(c.intermediate_size, "gate_proj", c)(h), b, t, _BTI)
    up = _constrain_rows(_dense(c.intermediate_size, "up_proj", c)(h), b, t, _BTI)
    x_MxD = x_MxD + _dense(c.hidden_size, "down_proj", c)(nn.silu(gate) * up)
    x_BxTxD = sharding.constrain(x_MxD.reshape(b, t, d), _BTD)
    return x_BxTxD, (new_kv if self.mode == "prefill" else None)


class Decoder(nn.Module):
  """Embedding -> scanned layers -> final norm -> (optional) float32 logits."""
  config: ModelConfig
  mode: str = "forward"

  @nn.compact
  def __call__(self, input_ids_BxT, positions_BxT, kv_mask_BxS, *, logits: bool = True,
               last_only: bool = False, past_kv=None):
    c = self.config
    dtype, pdtype = to_dtype(c.dtype), to_dtype(c.param_dtype)
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.initializers.normal(_INIT_STD), name="embed")
    # The table is split over (tensor, fsdp); its rows land on every device's tokens.
    x = sharding.constrain(sharding.embedding_output(embed(input_ids_BxT)), _BTD)
    cos, sin = _rope_tables(positions_BxT, c)
    layer_cls = DecoderLayer
    if c.remat != "none":
      layer_cls = nn.remat(layer_cls, prevent_cse=False, policy=_REMAT_POLICY[c.remat])
    layers = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast)
                     + ((0,) if past_kv is not None else ()),
                     out_axes=0, length=c.num_layers)(c, self.mode, name="layers")
    x, new_kv = layers(x, cos, sin, kv_mask_BxS,
                       *(() if past_kv is None else (past_kv,)))
    x = sharding.constrain(RMSNorm(c.rms_norm_eps, dtype, pdtype, name="final_norm")(x),
                           _BTD)
    if last_only:
      x = x[:, -1]
    if c.tie_word_embeddings:
      table = embed.embedding
    else:
      table = self.param("lm_head", nn.initializers.normal(_INIT_STD),
                         (c.vocab_size, c.hidden_size), pdtype)
    if logits or self.is_initializing():
      x = jnp.einsum("...d,vd->...v", x, table.astype(dtype),
                     preferred_element_type=jnp.float32)
      if not last_only:
        x = sharding.constrain(x, _BTV)
    return x, new_kv


def _check_ids_mask(ids, mask, name):
  chex.assert_rank([ids, mask], 2)
  chex.assert_equal_shape([ids, mask])
  chex.assert_type(ids, int)
  if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.integer):
    raise TypeError(f"{name}: mask must be bool or int (1 = real token), got {mask.dtype}")


def padded_positions(mask_BxL: jax.Array) -> jax.Array:
  """Position ids of a left-padded batch: cumsum(mask) - 1, pads at 0 (as HF generate)."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def _causal_allowed(mask_BxL):
  """The attention mask `Decoder` takes for a causal pass over a left-padded batch: the
  keys' validity [B, L] (`attention.attend` applies causality itself)."""
  return mask_BxL.astype(jnp.bool_)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (normal(0.02) weights, unit norms) as a nested dict pytree.

  Layer parameters are stacked along a leading `num_layers` axis under "layers". Wrap in
  jax.eval_shape for abstract shapes of a large model without allocating it.
  """
  return _init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: ModelConfig, rng: jax.Array) -> Params:
  # Jitted: an eager Linen init with a layer scan retraces and recompiles on every call.
  ids = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1), jnp.bool_)
  variables = Decoder(config).init(rng, ids, padded_positions(mask), _causal_allowed(mask))
  return variables["params"]


def forward(params: Params, input_ids_BxL: jax.Array, mask_BxL: jax.Array, *,
            config: ModelConfig, return_hidden: bool = False) -> jax.Array:
  """Full causal pass over a left-padded batch.

  Args:
    params: from init_params or the Hugging Face importer.
    input_ids_BxL: int token ids.
    mask_BxL: bool/int, 1 for real tokens, 0 for (left) padding.
    config: the model's config (static).
    return_hidden: return the final-norm hidden states [B, L, D] in the compute dtype
      instead of logits (for the chunked log-prob path; see output_embedding).

  Returns:
    float32 logits [B, L, V], or hidden [B, L, D]. Padded positions hold finite garbage.
  """
  _check_ids_mask(input_ids_BxL, mask_BxL, "forward")
  params = compute_params(params, config)
  out, _ = Decoder(config).apply({"params": params}, input_ids_BxL, padded_positions(mask_BxL),
                                 _causal_allowed(mask_BxL), logits=not return_hidden)
  return out


def response_hidden(params: Params, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                    completion_ids_NxT: jax.Array, completion_mask_NxT: jax.Array, *,
                    config: ModelConfig) -> jax.Array:
  """Final-norm hidden states [N, T, D] that predict each completion token (position
  P - 1 + t predicts token t), N = B * G responses to B distinct prompts, rows b * G + g.

  The same values as `forward(..., return_hidden=True)` over each row's prompt +
  completion, but every prompt runs once instead of G times: a prefill over the B prompts
  gives each layer's prompt keys/values, and the N completions run after them ("extend"
  mode), attending to their prompt's keys/values repeated G times (whose gradients sum
  back over the group). Training FLOPs fall by about (G - 1) / G * P / (P + T).
  """
  _check_ids_mask(prompt_ids_BxP, prompt_mask_BxP, "response_hidden")
  _check_ids_mask(completion_ids_NxT, completion_mask_NxT, "response_hidden")
  (b, p), n = prompt_ids_BxP.shape, completion_ids_NxT.shape[0]
  if n % b:
    raise ValueError(f"response_hidden: {n} completions are not G per each of {b} prompts")
  group = n // b
  params = compute_params(params, config)
  prompt_mask = prompt_mask_BxP.astype(jnp.bool_)
  prompt_hidden, past_kv = Decoder(config, mode="prefill").apply(
      {"params": params}, prompt_ids_BxP, padded_positions(prompt_mask),
      _causal_allowed(prompt_mask), logits=False)
  # Positions and attention mask of the completions as `forward` makes them for each
  # row's prompt + completion: its last T positions (query rows) over all P + T slots.
  mask_NxL = jnp.concatenate([jnp.repeat(prompt_mask, group, 0),
                              completion_mask_NxT.astype(jnp.bool_)], axis=1)
  hidden_NxTxD, _ = Decoder(config, mode="extend").apply(
      {"params": params}, completion_ids_NxT, padded_positions(mask_NxL)[:, p:],
      _causal_allowed(mask_NxL), logits=False, past_kv=past_kv)
  # Left-padded prompts: slot P - 1 holds each prompt's last token.
  last_NxD = jnp.repeat(prompt_hidden[:, -1], group, 0)
  return jnp.concatenate([last_NxD[:, None], hidden_NxTxD[:, :-1]], axis=1)


def output_embedding(params: Params, config: ModelConfig) -> jax.Array:
  """The [V, D] output table: logits = hidden @ table.T (in float32)."""
  if config.tie_word_embeddings:
    return params["embed"]["embedding"]
  return params["lm_head"]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None, *,
               slots: int | None = None) -> KVCache:
  """An empty cache for max_len slots per row (dtype defaults to the compute dtype).

  slots: hold only the first `slots` of them for now (`grow_cache` adds the others);
  default all max_len.
  """
  slots = max_len if slots is None else slots
  if batch_size <= 0 or max_len <= 0 or not 0 < slots <= max_len:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_len={max_len} must be > 0 "
                     f"and slots={slots} in [1, max_len]")
  dtype = to_dtype(config.dtype) if dtype is None else dtype
  shape = (config.num_layers, batch_size, slots, config.num_kv_heads, config.head_size)
  cos_SxF, sin_SxF = _rope_tables(jnp.arange(max_len + 1), config)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 mask_BxS=jnp.zeros((batch_size, slots), jnp.bool_),
                 positions_B=jnp.zeros((batch_size,), jnp.int32),
                 index=jnp.zeros((), jnp.int32), rope_cos_SxF=cos_SxF, rope_sin_SxF=sin_SxF)


def prefill(params: Params, input_ids_BxP: jax.Array, mask_BxP: jax.Array, cache: KVCache, *,
            config: ModelConfig) -> tuple[jax.Array, KVCache]:
  """Runs a left-padded prompt batch and writes its keys/values to slots [0, P).

  The cache must be fresh (init_cache): the prompt attends only to itself, which costs
  P x P instead of P x S. Because prompts are left-padded, slot P - 1 holds each row's
  last real token, and its logits are returned.

  Returns:
    (float32 logits [B, V] at the last prompt slot, the filled cache with index = P).
  """
  _check_ids_mask(input_ids_BxP, mask_BxP, "prefill")
  b, p = input_ids_BxP.shape
  chex.assert_shape(cache.mask_BxS, (b, None))
  if p > cache.max_len:
    raise ValueError(f"prefill: prompt length {p} exceeds the cache's {cache.max_len} "
                     "slots; build it with more (init_cache's max_len and slots)")
  positions = padded_positions(mask_BxP)
  logits_BxV, (k, v) = Decoder(config, mode="prefill").apply(
      {"params": params}, input_ids_BxP, positions, _causal_allowed(mask_BxP),
      last_only=True)
  mask = mask_BxP.astype(jnp.bool_)
  cache = cache.replace(
      k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), 0, 2),
      v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), 0, 2),
      mask_BxS=jax.lax.dynamic_update_slice_in_dim(cache.mask_BxS, mask, 0, 1),
      positions_B=jnp.sum(mask, axis=-1, dtype=jnp.int32),
      index=jnp.asarray(p, jnp.int32))
  return logits_BxV, cache


def decode(params: Params, tokens_B: jax.Array, cache: KVCache, *,
           config: ModelConfig, read_slots_B: jax.Array | None = None,
           read_block: int = 64, read_kernel: str = "xla") -> tuple[jax.Array, KVCache]:
  """One new token per row at slot cache.index; returns (float32 logits [B, V], cache).

  The same maths as `forward` on the same parameters, written as plain jnp on [B, ...]
  arrays with the layers unrolled: a layer scan would take the stacked cache as a scanned
  input and output and copy all of it every step, and the Linen layer's length-1 token
  axis cost extra relayouts (together about 1.6x the time per step on CPU). Only the new
  token's key/value slot of each layer is written, so a donated cache is updated in place.
  Writing past the last slot is not checked inside jit: callers stop at max_len.
  cache.index may also be int32 [B], one slot per row (with the cache in `decode_layout`):
  rows then write where their own index says (`sampling.continuous`, whose slots hold
  responses of different lengths).
  read_slots_B: optional int32 [B], row b's valid own slots (after any prefix) all lie in
  its first read_slots_B[b], this step's included: attention reads only those, in blocks
  of read_block slots (`attention._attend_one_paged`; the own slots must be a multiple),
  by read_kernel (`attention.READ_KERNELS`: "pallas" is `attention.attend_one_pallas`).

  params may have their layers stacked (as `init_params` returns them) or be prepared by
  `decode_params`, and the cache may be stacked or in `decode_layout`; a decode loop
  should convert both once, before the loop (see there).
  """
  chex.assert_rank(tokens_B, 1)
  chex.assert_type(tokens_B, int)
  chex.assert_shape(cache.mask_BxS, (tokens_B.shape[0], None))
  c = config
  dtype = to_dtype(c.dtype)
  # The rows' own slots come after a shared prefix's. A per-row index [B] (the continuous
  # batching engine's slots, each at its own response length) writes by scatter.
  index = cache.index - cache.prefix_len
  if index.ndim == 1:
    mask_BxS = _write_rows(cache.mask_BxS, index, jnp.ones_like(tokens_B, jnp.bool_), 1)
  else:
    mask_BxS = jax.lax.dynamic_update_slice_in_dim(
        cache.mask_BxS, jnp.ones((tokens_B.shape[0], 1), jnp.bool_), index, 1)
  x_BxD = jnp.take(params["embed"]["embedding"].astype(dtype), tokens_B, axis=0)
  cos_Bx1xF, sin_Bx1xF = (jnp.take(table, cache.positions_B[:, None], axis=0)
                          for table in (cache.rope_cos_SxF, cache.rope_sin_SxF))
  per_layer = isinstance(cache.k, tuple)
  if index.ndim == 1 and not per_layer:
    raise ValueError("decode: a per-row cache.index needs the cache in decode_layout")
  if cache.prefix_mask_BpxP is not None and not per_layer:
    raise ValueError("decode: a cache with a shared prefix must be in decode_layout")
  k_cache, v_cache = (list(cache.k), list(cache.v)) if per_layer else (cache.k, cache.v)
  for i, p in enumerate(decode_params(params)["layers"]):
    h_BxD = _rms_norm(x_BxD, p["input_norm"]["scale"], c.rms_norm_eps, dtype)
    if "qkv_proj" in p:
      qkv = _project(h_BxD, p["qkv_proj"], dtype)
      b, q_dim, kv_dim = qkv.shape[0], c.num_heads * c.head_size, c.num_kv_heads * c.head_size
      q_BxHxK = qkv[:, :q_dim].reshape(b, c.num_heads, c.head_size)
      k_BxGxK = qkv[:, q_dim:q_dim + kv_dim].reshape(b, c.num_kv_heads, c.head_size)
      v_BxGxK = qkv[:, q_dim + kv_dim:].reshape(b, c.num_kv_heads, c.head_size)
    else:
      q_BxHxK, k_BxGxK, v_BxGxK = (_project(h_BxD, p[name], dtype)
                                   for name in ("q_proj", "k_proj", "v_proj"))
    q_BxHxK = _apply_rope(q_BxHxK[:, None], cos_Bx1xF, sin_Bx1xF)[:, 0]
    k_BxGxK = _apply_rope(k_BxGxK[:, None], cos_Bx1xF, sin_Bx1xF)[:, 0]
    if per_layer and index.ndim == 1:
      k_cache[i] = _write_rows(k_cache[i], index, k_BxGxK, 3)
      v_cache[i] = _write_rows(v_cache[i], index, v_BxGxK, 2)
      k_BxGxKxS, v_BxGxSxK = k_cache[i], v_cache[i]
    elif per_layer:
      k_cache[i] = _write_slot(k_cache[i], k_BxGxK[:, :, :, None], (0, 0, 0, index))
      v_cache[i] = _write_slot(v_cache[i], v_BxGxK[:, :, None], (0, 0, index, 0))
      k_BxGxKxS, v_BxGxSxK = k_cache[i], v_cache[i]
    else:
      k_cache = _write_slot(k_cache, k_BxGxK[None, :, None], (i, 0, index, 0, 0))
      v_cache = _write_slot(v_cache, v_BxGxK[None, :, None], (i, 0, index, 0, 0))
      # Transposed copies of the layer's keys and values (see decode_layout).
      k_BxGxKxS = jnp.transpose(k_cache[i], (0, 2, 3, 1))
      v_BxGxSxK = jnp.swapaxes(v_cache[i], 1, 2)
    prefix = None
    if cache.prefix_mask_BpxP is not None:
      prefix = (cache.prefix_k[i].astype(dtype), cache.prefix_v[i].astype(dtype),
                cache.prefix_mask_BpxP)
    attn_BxHxK = attention.attend(q_BxHxK, k_BxGxKxS.astype(dtype), v_BxGxSxK.astype(dtype),
                                  mask_BxS, prefix=prefix, implementation=c.attention,
                                  read_slots_B=read_slots_B, read_block=read_block,
                                  read_kernel=read_kernel)
    x_BxD = x_BxD + jnp.einsum("bhk,hkd->bd", attn_BxHxK, p["o_proj"]["kernel"].astype(dtype))
    h_BxD = _rms_norm(x_BxD, p["post_attn_norm"]["scale"], c.rms_norm_eps, dtype)
    if "gate_up_proj" in p:
      gate_BxI, up_BxI = jnp.split(h_BxD @ p["gate_up_proj"]["kernel"].astype(dtype), 2, -1)
    else:
      gate_BxI = h_BxD @ p["gate_proj"]["kernel"].astype(dtype)
      up_BxI = h_BxD @ p["up_proj"]["kernel"].astype(dtype)
    x_BxD = x_BxD + (nn.silu(gate_BxI) * up_BxI) @ p["down_proj"]["kernel"].astype(dtype)
  x_BxD = _rms_norm(x_BxD, params["final_norm"]["scale"], c.rms_norm_eps, dtype)
  logits_BxV = jnp.einsum("bd,vd->bv", x_BxD, output_embedding(params, c).astype(dtype),
                          preferred_element_type=jnp.float32)
  if per_layer:
    k_cache, v_cache = tuple(k_cache), tuple(v_cache)
  cache = cache.replace(k=k_cache, v=v_cache, mask_BxS=mask_BxS,
                        positions_B=cache.positions_B + 1, index=cache.index + 1)
  return logits_BxV, cache


def decode_layout(cache: KVCache) -> KVCache:
  """The cache as tuples of per-layer arrays: keys [B, num_kv_heads, head_dim, S], values
  [B, num_kv_heads, S, head_dim].

  For `decode` in a loop: attention contracts each layer's keys and values in these
  orders (scores = q @ K with the slots last, then probs @ V), so on the stacked
  [num_layers, B, S, num_kv_heads, head_dim] layout every step copies them into it (about
  8% of the small model's decode step on CPU), and with the keys' slots not last the
  score matmul ran at half the speed. Convert once, between `prefill` and the loop.
  Already converted caches are returned unchanged.
  """
  if isinstance(cache.k, tuple):
    return cache
  return cache.replace(k=tuple(jnp.transpose(layer, (0, 2, 3, 1)) for layer in cache.k),
                       v=tuple(jnp.swapaxes(layer, 1, 2) for layer in cache.v))


def grow_cache(cache: KVCache, slots: int) -> KVCache:
  """The cache with `slots` slots (<= its capacity): the added ones are empty and masked
  out, so decoding continues exactly as in a cache built with them. Works on the stacked
  layout and on `decode_layout`; copies the cache once (grow between decode loops)."""
  if not cache.max_len <= slots <= cache.capacity:
    raise ValueError(f"grow_cache: slots={slots} must be in [max_len={cache.max_len}, "
                     f"capacity={cache.capacity}]")
  extra = slots - cache.max_len
  if extra == 0:
    return cache

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)

  if isinstance(cache.k, tuple):   # decode_layout: keys [B, G, K, S], values [B, G, S, K]
    k = tuple(pad(layer, 3) for layer in cache.k)
    v = tuple(pad(layer, 2) for layer in cache.v)
  else:
    k, v = pad(cache.k, 2), pad(cache.v, 2)
  return cache.replace(k=k, v=v, mask_BxS=pad(cache.mask_BxS, 1))


def share_prefix(cache: KVCache, group_size: int, slots: int) -> KVCache:
  """A prefilled cache of B prompts as a cache of B * G rows that share each prompt's slots.

  Every slot the prefilled cache holds (its `max_len`, the prompt) becomes the shared
  prefix, stored once per prompt in `decode_layout`; row b * G + g reads prompt b's. The
  rows get `slots - max_len` empty slots of their own (`grow_cache` adds more), and the
  prompt's next position. Decoding then gives the tokens and logits of a cache that
  repeats the prompt G times (up to float rounding) while holding, and reading, the prompt's
  keys and values once per group instead of G times.
  """
  if cache.prefix_mask_BpxP is not None:
    raise ValueError("share_prefix: the cache already has a shared prefix")
  if group_size < 1 or not cache.max_len <= slots <= cache.capacity:
    raise ValueError(f"share_prefix: group_size={group_size} must be >= 1 and "
                     f"slots={slots} in [max_len={cache.max_len}, capacity={cache.capacity}]")
  laid = decode_layout(cache)
  rows, own = cache.mask_BxS.shape[0] * group_size, slots - cache.max_len
  k0, v0 = laid.k[0], laid.v[0]
  batch, kv_heads, head_dim = k0.shape[0], k0.shape[1], k0.shape[2]
  return laid.replace(
      k=tuple(jnp.zeros((rows, kv_heads, head_dim, own), k0.dtype) for _ in laid.k),
      v=tuple(jnp.zeros((rows, kv_heads, own, head_dim), v0.dtype) for _ in laid.v),
      mask_BxS=jnp.zeros((rows, own), jnp.bool_),
      positions_B=jnp.repeat(cache.positions_B, group_size, axis=0),
      prefix_k=laid.k, prefix_v=laid.v, prefix_mask_BpxP=cache.mask_BxS)


def _scatter_slots(buf, where, new):
  """buf.at[where].set(new) (one slot per row), bit for bit, written through an unsigned
  integer view of a 16-bit float buffer: XLA:CPU runs a bf16 scatter on a float32 copy
  of the WHOLE buffer (each layer's cache upcast, all layers' copies alive at once), an
  integer one on the buffer itself (in place when the caller carries the bits, as
  `sampling.continuous` does, so the views cancel); on a GPU or TPU the view is free."""
  new = new.astype(buf.dtype)
  if buf.dtype.itemsize != 2 or not jnp.issubdtype(buf.dtype, jnp.floating):
    return buf.at[where].set(new)
  bits = jax.lax.bitcast_convert_type
  return bits(bits(buf, jnp.uint16).at[where].set(bits(new, jnp.uint16)), buf.dtype)


def _write_rows(buf, index_B, new, slot_axis):
  """buf with row b's slot index_B[b] (along slot_axis) set to new[b], via `_scatter_slots`.

  Keys [B, kv heads, head_dim, S] (slot_axis 3), values [B, kv heads, S, head_dim] (2),
  new [B, kv heads, head_dim]; or a mask [B, S] (1), new [B]. Under a mesh the write runs
  per device (`jax.shard_map`: rows over the batch axes, kv heads over `tensor`, as the
  cache is split): traced globally, GSPMD cannot prove that the (row, index) pairs stay
  on their rows' device and all-gathers every row's new keys and values over the batch
  axes at every step (3.7 MB per token step for 1.5B on 4 x 2 devices). A pure scatter:
  the same bits either way."""
  def write(buf, index_B, new):
    where = ((jnp.arange(index_B.shape[0]),) + (slice(None),) * (slot_axis - 1)
             + (index_B,))
    return _scatter_slots(buf, where, new)

  mesh = sharding.per_device_mesh()
  if mesh is None:
    return write(buf, index_B, new)
  heads = ("activation_kv_heads",) if buf.ndim > 2 else ()
  spec = functools.partial(sharding.leading_spec, mesh=mesh)
  specs = (spec(buf, "activation_batch", *heads), spec(index_B, "activation_batch"),
           spec(new, "activation_batch", *heads))
  return jax.shard_map(write, mesh=mesh, in_specs=specs, out_specs=specs[0],
                       check_vma=False)(buf, index_B, new)


def _write_slot(buf, new, start):
  """Writes one token's keys or values into the cache buffer in place."""
  return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)


def decode_params(params: Params, *, fuse: bool = True) -> Params:
  """params for `decode` in a loop: "layers" as a tuple of per-layer trees (the leading
  layer axis removed) and, with fuse=True, each layer's q/k/v kernels (and biases)
  concatenated into "qkv_proj" ([D, (H + 2 G) * head_dim]) and gate/up into
  "gate_up_proj" ([D, 2 I]).

  Slicing layer i out of the stacked weights inside the loop body makes XLA:CPU copy that
  layer's weights on every step (a quarter of the small model's decode time), so convert
  once, before the loop; the copy costs one extra set of layer weights in memory while it
  lives. Fusing turns 7 thin matmuls per layer into 4 wider ones (14% less time for the
  small model's decode-shaped matmuls on CPU). Leave fuse off under tensor parallelism:
  the fused columns no longer split by head. Prepared params are returned unchanged.
  """
  layers = params["layers"]
  if isinstance(layers, tuple):
    return params
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  qkv, gate_up = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
  prepared = []
  for i in range(num_layers):
    layer = jax.tree.map(lambda a, i=i: a[i], layers)
    if fuse:
      d = layer["q_proj"]["kernel"].shape[0]
      fused = {"kernel": jnp.concatenate([layer[n]["kernel"].reshape(d, -1) for n in qkv], -1)}
      if "bias" in layer["q_proj"]:
        fused["bias"] = jnp.concatenate([layer[n]["bias"].reshape(-1) for n in qkv])
      layer = {name: sub for name, sub in layer.items() if name not in qkv + gate_up} | {
          "qkv_proj": fused,
          "gate_up_proj": {"kernel": jnp.concatenate(
              [layer[n]["kernel"] for n in gate_up], -1)}}
    prepared.append(layer)
  return {**params, "layers": tuple(prepared)}


def _project(h_BxD, layer_params, dtype):
  """h @ kernel [D, ...] (+ bias), as the Linen DenseGeneral computes it."""
  out = jnp.einsum("bd,d...->b...", h_BxD, layer_params["kernel"].astype(dtype))
  if "bias" in layer_params:
    out = out + layer_params["bias"].astype(dtype)
  return out
