"""Model configuration: one frozen dataclass, named configs, and HF config.json mapping.

`ModelConfig` is hashable, so it is passed as a static jit argument (`config=`). The
named configs cover the paper's backbones (Qwen2.5-Math-1.5B/7B,
DeepSeek-R1-Distill-Qwen-1.5B/7B), Qwen2.5-0.5B, and the tiny models the tests, demo
and benchmarks train on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from egpo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Rope types this model implements; anything else is refused rather than approximated.
_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
# What each decoder layer keeps for the backward pass (transformer.REMAT_POLICIES maps them
# to jax.checkpoint policies): "none" keeps everything autodiff saves; "full" recomputes the
# layer from its input (nothing_saveable); "dots_saveable" keeps every matmul output;
# "dots_no_batch_saveable" keeps the projections' outputs but not batched (attention) ones.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch_saveable")


def to_dtype(name: str):
  """'float32' | 'bfloat16' | 'float16' -> the jnp dtype."""
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen2/Qwen2.5/Llama-family decoder.

  Attributes:
    vocab_size: V, rows of the token embedding.
    hidden_size: D, the model width.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: number of decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); divides num_heads.
    head_dim: per-head width; None means hidden_size // num_heads.
    rope_theta: RoPE base.
    rope_scaling: None, or a hashable tuple of (key, value) items, e.g. Llama-3's
      (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")).
    rms_norm_eps: RMSNorm epsilon.
    qkv_bias: q/k/v projections have biases (Qwen2: True; Llama: False).
    tie_word_embeddings: the output embedding is the token embedding.
    max_position_embeddings: longest sequence the checkpoint was trained for.
    param_dtype: dtype of the stored parameters.
    dtype: compute dtype (matmuls, activations, KV cache); logits are always float32.
    remat: the per-layer rematerialisation policy, one of REMAT_POLICIES. Deprecated: a
      bool, mapped to "full" (True) or "none" (False).
    attention: the attention implementation, one of ATTENTION_IMPLEMENTATIONS (see
      egpo_jax/models/attention.py): "blockwise" everywhere by default; "cudnn" (GPU,
      bfloat16/float16) and "splash" (TPU) when asked for; "reference" for tests.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str | bool = "none"
  attention: str = "blockwise"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly")
    if self.head_size % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_size} must be even for RoPE")
    to_dtype(self.param_dtype)
    to_dtype(self.dtype)
    if isinstance(self.remat, bool):    # deprecated spelling
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r} is not a remat policy; use one of "
                       f"{REMAT_POLICIES} (or True/False, deprecated)")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r} is not an attention "
                       f"implementation; use one of {ATTENTION_IMPLEMENTATIONS}")
    if self.rope_scaling is not None:
      if not isinstance(self.rope_scaling, tuple):
        raise ValueError("ModelConfig.rope_scaling must be a hashable tuple of (key, value) "
                         f"items or None, got {type(self.rope_scaling).__name__}; use "
                         "rope_scaling_items(dict)")
      rope_type = self.rope_scaling_dict.get("rope_type", "default")
      if rope_type not in _ROPE_TYPES:
        raise ValueError(f"ModelConfig.rope_scaling: rope_type {rope_type!r} is not "
                         f"supported; supported: {_ROPE_TYPES}")

  @property
  def head_size(self) -> int:
    """The resolved per-head width."""
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings included, the untied head counted once)."""
    d, hd = self.hidden_size, self.head_size
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
    layer = attn + 3 * d * self.intermediate_size + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + embed + d


def rope_scaling_items(scaling: Mapping[str, Any] | None) -> tuple | None:
  """A rope-scaling dict as the sorted, hashable tuple ModelConfig stores."""
  if not scaling:
    return None
  return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                      for k, v in scaling.items()))


_QWEN_MATH_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=10000.0,
                      rms_norm_eps=1e-6, qkv_bias=True)
_QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=10000.0,
                rms_norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=False)

NAMED_CONFIGS: dict[str, ModelConfig] = {
    # Tiny models for tests and the CPU demo (byte tokenizer fits in vocab 512).
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=4096),
    "small": ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1408,
                         num_layers=8, num_heads=8, num_kv_heads=2,
                         max_position_embeddings=4096),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2,
                                rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-math-1.5b": ModelConfig(**_QWEN_MATH_15B, tie_word_embeddings=True,
                                     max_position_embeddings=4096),
    "qwen2.5-math-7b": ModelConfig(**_QWEN_7B, max_position_embeddings=4096),
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(**_QWEN_MATH_15B, tie_word_embeddings=False,
                                                 max_position_embeddings=131072),
    "deepseek-r1-distill-qwen-7b": ModelConfig(**_QWEN_7B, max_position_embeddings=131072),
}
# Hugging Face repo ids are accepted as aliases of the names above.
_ALIASES = {
    "qwen/qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen/qwen2.5-math-1.5b": "qwen2.5-math-1.5b",
    "qwen/qwen2.5-math-7b": "qwen2.5-math-7b",
    "deepseek-ai/deepseek-r1-distill-qwen-1.5b": "deepseek-r1-distill-qwen-1.5b",
    "deepseek-ai/deepseek-r1-distill-qwen-7b": "deepseek-r1-distill-qwen-7b",
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A named config (case-insensitive; HF repo ids work too), with field overrides."""
  key = name.lower()
  key = _ALIASES.get(key, key)
  if key not in NAMED_CONFIGS:
    raise KeyError(f"unknown model config {name!r}; known: {sorted(NAMED_CONFIGS)}")
  return NAMED_CONFIGS[key].replace(**overrides) if overrides else NAMED_CONFIGS[key]


def from_hf_dict(hf: Mapping[str, Any], *, param_dtype: str = "float32",
                 dtype: str = "float32", remat: bool | str = "none",
                 attention: str = "blockwise") -> ModelConfig:
  """Maps a Hugging Face config.json dict to a ModelConfig, refusing what it cannot run."""
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  if not archs and model_type in ("qwen2", "llama"):
    archs = ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"]
  if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"config.json: architectures={archs} (model_type={model_type!r}) is not "
                     f"supported; supported: {SUPPORTED_ARCHITECTURES}")
  arch = archs[0]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (silu)")
  if (arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False)) or any(
      t != "full_attention" for t in hf.get("layer_types") or ()):
    raise ValueError("config.json: use_sliding_window=true is not supported; this model "
                     "implements full attention only")
  if hf.get("mlp_bias", False):
    raise ValueError("config.json: mlp_bias=true is not supported")
  # transformers >= 5 nests rope settings in rope_parameters; older files use top-level keys.
  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = dict(hf.get("rope_scaling") or rope)
  scaling.pop("rope_theta", None)
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  if scaling.get("rope_type", "default") == "default":
    scaling = {}
  num_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim == hf["hidden_size"] // num_heads:
    head_dim = None  # the default: keeps configs equal however the file spells it
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=head_dim,
      rope_theta=float(theta),
      rope_scaling=rope_scaling_items(scaling),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=True if arch == "Qwen2ForCausalLM" else bool(hf.get("attention_bias", False)),
      # Both transformers config classes default to untied when the key is absent.
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      param_dtype=param_dtype, dtype=dtype, remat=remat, attention=attention)


def to_hf_dict(config: ModelConfig, *, torch_dtype: str = "float32",
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json transformers needs to load this model (Qwen2 if qkv_bias, else Llama)."""
  qwen = config.qkv_bias
  rope = {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling_dict}
  out = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_size,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": rope,
      "tie_word_embeddings": config.tie_word_embeddings,
      "torch_dtype": torch_dtype,
      "dtype": torch_dtype,
      "use_cache": True,
  }
  if config.rope_scaling is not None:
    out["rope_scaling"] = dict(rope)
  if qwen:
    out.update(use_sliding_window=False, sliding_window=None, attention_dropout=0.0)
  else:
    out.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0)
  out.update(extra or {})
  return out


def load_hf_config(path: str, **kwargs) -> ModelConfig:
  """Reads `path/config.json` (or a config.json path) as a ModelConfig."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json at {file}; pass a Hugging Face checkpoint folder")
  with open(file) as f:
    return from_hf_dict(json.load(f), **kwargs)
