"""Hugging Face checkpoint folders in and out: config.json + *.safetensors (+ index).

Import streams one tensor at a time: it is read from its shard (safetensors maps the
file, so only that tensor is copied into host memory), converted to the param dtype,
and placed straight onto its target sharding; a stacked layer parameter is filled one
layer at a time into a donated device buffer. A 7B checkpoint therefore never needs
two copies in host memory. Nothing is randomly initialised: a missing tensor, a shape
mismatch, an unknown tensor or an unsupported architecture is an error that names it.

Export writes the inverse mapping in shards of at most `max_shard_bytes`, with
`model.safetensors.index.json`, in the format transformers' `from_pretrained` loads.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from egpo_jax.models import config as config_lib
from egpo_jax.models import sharding as sharding_lib
from egpo_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some checkpoints carry that this model recomputes.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EXPORT_DTYPES = tuple(_NP_DTYPES)


def _layer_tensors(config: ModelConfig):
  """(our path under "layers", HF suffix, to_ours, to_hf) for each per-layer tensor.

  to_ours maps the HF array (torch Linear layout [out, in]) to ours; to_hf inverts it.
  """
  d, h, g, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_size

  def proj(heads):
    return (lambda w: w.T.reshape(d, heads, hd), lambda w: w.reshape(d, heads * hd).T)

  def bias(heads):
    return (lambda b: b.reshape(heads, hd), lambda b: b.reshape(heads * hd))

  ident = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)
  out = [
      (("input_norm", "scale"), "input_layernorm.weight", *ident),
      (("post_attn_norm", "scale"), "post_attention_layernorm.weight", *ident),
      (("q_proj", "kernel"), "self_attn.q_proj.weight", *proj(h)),
      (("k_proj", "kernel"), "self_attn.k_proj.weight", *proj(g)),
      (("v_proj", "kernel"), "self_attn.v_proj.weight", *proj(g)),
      (("o_proj", "kernel"), "self_attn.o_proj.weight",
       lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
      (("gate_proj", "kernel"), "mlp.gate_proj.weight", *transpose),
      (("up_proj", "kernel"), "mlp.up_proj.weight", *transpose),
      (("down_proj", "kernel"), "mlp.down_proj.weight", *transpose),
  ]
  if config.qkv_bias:
    out += [((name, "bias"), f"self_attn.{name}.bias", *bias(n))
            for name, n in (("q_proj", h), ("k_proj", g), ("v_proj", g))]
  return out


def _global_tensors(config: ModelConfig):
  """(our path, HF name) for the tensors outside the layers (no layout change)."""
  out = [(("embed", "embedding"), "model.embed_tokens.weight"),
         (("final_norm", "scale"), "model.norm.weight")]
  if not config.tie_word_embeddings:
    out.append((("lm_head",), "lm_head.weight"))
  return out


def hf_tensor_names(config: ModelConfig) -> list[str]:
  """Every tensor name a checkpoint of this config holds (transformers' naming)."""
  names = [name for _, name in _global_tensors(config)]
  for i in range(config.num_layers):
    names += [f"model.layers.{i}.{suffix}" for _, suffix, _, _ in _layer_tensors(config)]
  return names


class _ShardReader:
  """Maps tensor names to shard files and reads one tensor at a time."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.weight_map = dict(json.load(f)["weight_map"])
      files = sorted(set(self.weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
      if missing:
        raise FileNotFoundError(f"{path}: shard file(s) {missing} listed in {INDEX_FILE} "
                                "are missing; re-download or re-export the checkpoint")
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no {INDEX_FILE}; "
                                "pass a Hugging Face checkpoint folder")
      if len(files) > 1:
        raise FileNotFoundError(f"{path}: {len(files)} safetensors files but no {INDEX_FILE} "
                                "saying which tensor is where")
      with safe_open(os.path.join(path, files[0]), framework="numpy") as f:
        self.weight_map = {k: files[0] for k in f.keys()}
    self._shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
      with safe_open(os.path.join(path, file), framework="numpy") as f:
        for name in f.keys():
          self._shapes[name] = tuple(f.get_slice(name).get_shape())

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._shapes:
      raise KeyError(f"{self.path}: tensor {name!r} is listed in {INDEX_FILE} under "
                     f"{self.weight_map[name]} but that file does not hold it")
    return self._shapes[name]

  def read(self, name: str) -> np.ndarray:
    # One open per tensor: closing unmaps the file, so pages read so far leave the
    # process's resident memory instead of adding up to a second copy of the model.
    self.shape(name)
    with safe_open(os.path.join(self.path, self.weight_map[name]), framework="numpy") as f:
      return f.get_tensor(name)


def _place(array: np.ndarray, sharding) -> jax.Array:
  """Device array with `sharding`, built from host slices (each device reads its shard).

  Without a sharding the array is uncommitted (default device), like jnp arrays.
  """
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape: tuple[int, ...], dtype, sharding):
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
  return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


def _layer_sharding(sharding):
  """The sharding of one layer of a stacked parameter (its spec without the layer axis)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _hf_shapes(config: ModelConfig, abstract: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> the shape the checkpoint must hold for this config."""
  out = {name: tuple(_get(abstract, ours).shape) for ours, name in _global_tensors(config)}
  for ours, suffix, _, to_hf in _layer_tensors(config):
    ours_shape = _get(abstract, ("layers",) + ours).shape[1:]
    shape = tuple(jax.eval_shape(to_hf, jax.ShapeDtypeStruct(ours_shape, jnp.float32)).shape)
    out.update({f"model.layers.{i}.{suffix}": shape for i in range(config.num_layers)})
  return out


def load_hf_params(path: str, config: ModelConfig, *, mesh=None, shardings=None) -> dict:
  """Loads safetensors weights from a checkpoint folder into a params pytree.

  Args:
    path: folder with model.safetensors, or shards plus model.safetensors.index.json.
    config: the model config (e.g. from load_hf_config(path)); param_dtype is applied.
    mesh: place every parameter with `sharding.param_shardings` on this mesh.
    shardings: or an explicit pytree of shardings (overrides mesh).

  Raises:
    FileNotFoundError: no weights, or a shard listed in the index is missing.
    ValueError: tensors missing, of the wrong shape, or not part of this architecture.
  """
  reader = _ShardReader(path)
  expected = set(hf_tensor_names(config))
  present = set(reader.weight_map)
  ignorable = {n for n in present if _IGNORED.fullmatch(n)}
  if config.tie_word_embeddings:
    ignorable.add("lm_head.weight")  # some exporters store the tied head anyway
  missing = sorted(expected - present)
  unexpected = sorted(present - expected - ignorable)
  if missing:
    shown = missing[:8] + (["..."] if len(missing) > 8 else [])
    raise ValueError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {shown} "
                     "(is the config right, e.g. tie_word_embeddings or the layer count?)")
  if unexpected:
    shown = unexpected[:8] + (["..."] if len(unexpected) > 8 else [])
    raise ValueError(f"{path}: {len(unexpected)} tensor(s) this architecture does not use: "
                     f"{shown}; the checkpoint does not match the config")

  abstract = sharding_lib.abstract_params(config)
  wrong = [f"{name}: {reader.shape(name)} (expected {want})"
           for name, want in _hf_shapes(config, abstract).items() if reader.shape(name) != want]
  if wrong:
    raise ValueError(f"{path}: {len(wrong)} tensor(s) have the wrong shape for this config: "
                     f"{wrong[:8]}")
  if shardings is None and mesh is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh)
  np_dtype = _NP_DTYPES[config.param_dtype]

  def read(name: str, to_ours: Callable) -> np.ndarray:
    return to_ours(reader.read(name)).astype(np_dtype, copy=False)

  params: dict = {}
  for ours, name in _global_tensors(config):
    sharding = _get(shardings, ours) if shardings is not None else None
    _set(params, ours, _place(read(name, lambda w: w), sharding))
  for ours, suffix, to_ours, _ in _layer_tensors(config):
    path_ = ("layers",) + ours
    target = _get(abstract, path_)
    sharding = _get(shardings, path_) if shardings is not None else None
    stacked = _zeros_fn(target.shape, target.dtype, sharding)()
    for i in range(config.num_layers):
      layer = read(f"model.layers.{i}.{suffix}", to_ours)
      stacked = _set_layer(stacked, _place(layer, _layer_sharding(sharding)),
                           jnp.asarray(i, jnp.int32))
      del layer
    _set(params, path_, stacked)
  return params


def warm_up(config: ModelConfig, *, mesh=None, shardings=None) -> None:
  """Compiles the loader's device-side steps for `config` ahead of time, allocating nothing.

  Loading compiles one zero-fill and one layer-update function per distinct parameter
  shape (a few MB of host memory each, once per process); call this first to keep that
  out of a timing or memory measurement of the load itself.
  """
  abstract = sharding_lib.abstract_params(config)
  if shardings is None and mesh is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh)
  index = jax.ShapeDtypeStruct((), jnp.int32)
  for ours, _, _, _ in _layer_tensors(config):
    path_ = ("layers",) + ours
    target = _get(abstract, path_)
    sharding = _get(shardings, path_) if shardings is not None else None
    _zeros_fn(target.shape, target.dtype, sharding).lower().compile()
    _set_layer.lower(
        jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=sharding),
        jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=_layer_sharding(sharding)),
        index).compile()


def load_hf_checkpoint(path: str, *, param_dtype: str = "float32", dtype: str = "float32",
                       remat: bool = False, mesh=None) -> tuple[dict, ModelConfig]:
  """(params, config) from a Hugging Face folder: config.json + safetensors shards."""
  config = config_lib.load_hf_config(path, param_dtype=param_dtype, dtype=dtype, remat=remat)
  return load_hf_params(path, config, mesh=mesh), config


def _host(array: jax.Array) -> np.ndarray:
  if not getattr(array, "is_fully_addressable", True):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _export_tensors(params: dict, config: ModelConfig) -> Iterator[tuple[str, Callable]]:
  """(HF name, thunk producing the host array) in checkpoint order, one at a time."""
  for ours, name in _global_tensors(config):
    yield name, functools.partial(lambda p: _host(_get(params, p)), ours)
  for i in range(config.num_layers):
    for ours, suffix, _, to_hf in _layer_tensors(config):
      leaf = _get(params, ("layers",) + ours)
      yield f"model.layers.{i}.{suffix}", functools.partial(
          lambda x, j, f: np.ascontiguousarray(f(_host(x[j]))), leaf, i, to_hf)


def _mode_like_open(path: str) -> None:
  """Gives `path` the mode `open(path, "w")` would (0644 under umask 022): safetensors
  creates its files 0600, unreadable to the other users of a shared model folder."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_hf_checkpoint(params: dict, config: ModelConfig, path: str, *,
                       dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30,
                       extra_config: dict | None = None) -> list[str]:
  """Writes config.json, safetensors shards and the index; returns the files written.

  Tensors are gathered to the host one at a time and each shard is written as soon as
  it is full, so host memory peaks at one shard. Only process 0 writes.
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported for export; use {sorted(_NP_DTYPES)}")
  abstract = sharding_lib.abstract_params(config)
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  got = {jax.tree_util.keystr(k): tuple(v.shape)
         for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if want != got:
    diff = sorted(f"{k}: {got.get(k)} (expected {want.get(k)})"
                  for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise ValueError(f"save_hf_checkpoint: params do not match the config: {diff[:8]}")
  np_dtype = _NP_DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  # Plan the shards from shapes first, so that file names carry the shard count.
  names, sizes = [], []
  for ours, name in _global_tensors(config):
    names.append(name)
    sizes.append(int(np.prod(_get(abstract, ours).shape)) * itemsize)
  for i in range(config.num_layers):
    for ours, suffix, _, _ in _layer_tensors(config):
      names.append(f"model.layers.{i}.{suffix}")
      sizes.append(int(np.prod(_get(abstract, ("layers",) + ours).shape[1:])) * itemsize)
  groups: list[list[str]] = [[]]
  used = 0
  for name, size in zip(names, sizes):
    if groups[-1] and used + size > max_shard_bytes:
      groups.append([])
      used = 0
    groups[-1].append(name)
    used += size
  total = len(groups)
  file_of = {}
  for k, group in enumerate(groups):
    file = SINGLE_FILE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
    file_of.update({n: file for n in group})

  thunks = dict(_export_tensors(params, config))
  written = []
  for group in groups:
    tensors = {n: thunks[n]().astype(np_dtype) for n in group}
    if writer:
      file = os.path.join(path, file_of[group[0]])
      save_file(tensors, file, metadata={"format": "pt"})
      _mode_like_open(file)
      written.append(file_of[group[0]])
    del tensors
  if writer:
    if total > 1:
      with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": file_of}, f, indent=2)
      written.append(INDEX_FILE)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config_lib.to_hf_dict(config, torch_dtype=dtype, extra=extra_config), f,
                indent=2)
    written.append("config.json")
  return written
