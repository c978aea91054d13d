"""Finds and loads the model behind a --checkpoint path.

Accepted:
  * a workdir written by `training.train.train` (config.json + checkpoints/<step>/), the
    demo's `workdir/default` included; also its `checkpoints/` folder or one step folder
    of it (the step is then taken from the path);
  * a Hugging Face checkpoint folder: config.json (architectures Qwen2ForCausalLM or
    LlamaForCausalLM) + *.safetensors + tokenizer.json (e.g. `experiments.export_hf`'s
    output).
Nothing is unpickled: orbax reads array files, the HF loader safetensors, configs JSON.

A workdir is read read-only (`read_workdir`, also export's reader): only the params of
one step, picked by `checkpointing.read_step` and checked by `checkpointing.read_params`
(commit markers, fingerprints); a damaged step is an error naming it and the other
steps, never a silent fallback, and nothing in the workdir is moved, deleted or written.

`model_spec` turns a training config's `model` section into a ModelConfig and tokenizer;
the trainer builds its model through it too. Evaluation imports no training module but
the checkpoint reader (`training.checkpointing`, which imports no evaluation): the
arrows go one way (tests/evaluation/test_layering.py).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, NamedTuple

import jax

from egpo_jax.evaluation.runner import Model

KINDS = ("workdir", "hf")

# Special tokens the byte tokenizer of a named preset adds (the reasoning delimiters).
BYTE_SPECIAL_TOKENS = ("<think>", "</think>")


class ModelSpec(NamedTuple):
  """The model a training config names: its ModelConfig and tokenizer."""
  model_config: Any   # models.config.ModelConfig
  tokenizer: Any      # ByteTokenizer or models.tokenizer.HFTokenizer


def loads_hf_checkpoint(model_section) -> bool:
  """Whether a training config's `model` section names a Hugging Face checkpoint folder."""
  return model_section.preset == "hf" and bool(model_section.path)


def model_spec(model_section) -> ModelSpec:
  """The ModelConfig and tokenizer of a training config's `model` section (preset, name,
  path, dtype, remat): the one place a config becomes a model, for training and reading.

  A named preset, or "hf" without a checkpoint folder (model.name's shapes, random
  weights: a dry run of a paper config on its real shapes), uses the byte tokenizer.
  """
  # pylint: disable=g-import-not-at-top
  from egpo_jax.models import byte_tokenizer, config as model_config_lib, tokenizer
  m = model_section
  # remat_policy and attention are absent from the config.json of older runs.
  kwargs = {"remat": m.get("remat_policy") or m.get("remat", False)}
  if m.get("attention"):
    kwargs["attention"] = m.attention
  if loads_hf_checkpoint(m):
    return ModelSpec(model_config_lib.load_hf_config(m.path, dtype=m.dtype, **kwargs),
                     tokenizer.HFTokenizer.from_pretrained(m.path))
  name = m.name if m.preset == "hf" else m.preset
  return ModelSpec(model_config_lib.get_config(name, dtype=m.dtype, **kwargs),
                   byte_tokenizer.ByteTokenizer(extra_special_tokens=BYTE_SPECIAL_TOKENS))


def read_workdir(folder: str, step: int | None = None, *, mesh=None
                 ) -> tuple[int, Any, dict[str, Any], Any, ModelSpec]:
  """(step, params, extra, config, model spec) of a training workdir, read-only.

  Args:
    folder: the workdir (config.json + checkpoints/).
    step: the checkpoint to read; default the newest step folder. A damaged step raises
      CorruptCheckpointError naming the other steps (pass one of them as `step`).
    mesh: shard the params on this mesh; default this process's first device.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from egpo_jax.models import sharding  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(_read_json(os.path.join(folder, "config.json")))
  spec = model_spec(c.model)
  abstract = sharding.abstract_params(spec.model_config, mesh)
  if mesh is None:
    abstract = checkpointing.on_first_device(abstract)
  chosen, (params, extra) = checkpointing.read_step(
      os.path.join(folder, "checkpoints"), step,
      lambda path: checkpointing.read_params(path, abstract))
  return chosen, params, extra, c, spec


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path} must hold a JSON object")
  return data


def resolve(path: str, step: int | None = None) -> tuple[str, str, int | None]:
  """(kind, folder, step): what `path` is, normalised to a workdir or an HF folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint={path} is not a directory; pass a training workdir "
                            "(config.json + checkpoints/) or a Hugging Face folder")
  parent, base = os.path.split(path)
  if re.fullmatch(r"\d+", base) and os.path.basename(parent) == "checkpoints":
    if step is not None and step != int(base):
      raise ValueError(f"--step={step} contradicts the step folder {path}")
    return resolve(os.path.dirname(parent), int(base))
  if base == "checkpoints" and os.path.isfile(os.path.join(parent, "config.json")):
    return resolve(parent, step)
  has_config = os.path.isfile(os.path.join(path, "config.json"))
  if has_config and os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir", path, step
  if has_config and glob.glob(os.path.join(path, "*.safetensors")):
    if step is not None:
      raise ValueError(f"--step={step} given, but {path} is a Hugging Face folder (one model)")
    return "hf", path, None
  raise FileNotFoundError(
      f"--checkpoint={path} is neither a training workdir (config.json and checkpoints/) nor "
      "a Hugging Face folder (config.json and *.safetensors)")


def load(path: str, *, step: int | None = None, dtype: str = "float32",
         param_dtype: str = "float32") -> Model:
  """Loads params, model config and tokenizer; `info` says what was loaded.

  Args:
    path: a workdir (or its checkpoints/ or a step folder), or a Hugging Face folder.
    step: the checkpoint step of a workdir (default: the newest; a damaged one is an
      error, see `read_workdir`).
    dtype: compute dtype of a Hugging Face model (float32 | bfloat16).
    param_dtype: parameter dtype of a Hugging Face model.
  """
  kind, folder, step = resolve(path, step)
  if kind == "workdir":
    restored_step, params, extra, c, spec = read_workdir(folder, step)
    info = {"kind": kind, "path": folder, "step": int(restored_step),
            "model": c.model.preset, "algo": c.algo.advantage, "variant": c.algo.variant,
            "task": c.task.name, "synthetic_difficulty": int(c.task.difficulty),
            "template": c.task.template, "segment_delimiter": c.algo.segment_delimiter,
            "rl_iteration": extra.get("iteration")}
    return Model(params, spec.model_config, spec.tokenizer, info)
  from egpo_jax.models import hf_io, tokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise FileNotFoundError(f"{folder}: no tokenizer.json; the evaluation needs the model's "
                            "tokenizer next to its weights")
  params, config = hf_io.load_hf_checkpoint(folder, param_dtype=param_dtype, dtype=dtype)
  # Committed to one device like restored checkpoints, so both share compiled samplers.
  params = jax.device_put(params, jax.devices()[0])
  tok = tokenizer.load_tokenizer(folder)
  hf = _read_json(os.path.join(folder, "config.json"))
  info = {"kind": kind, "path": folder, "step": None,
          "model": hf.get("_name_or_path") or os.path.basename(folder),
          "architectures": hf.get("architectures")}
  return Model(params, config, tok, info)
