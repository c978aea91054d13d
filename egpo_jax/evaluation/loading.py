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
one step, checked by `checkpointing.read_params` (commit markers, fingerprints); a
damaged step is an error naming it and the other steps, never a silent fallback, and
nothing in the workdir is moved, deleted or written.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import jax

from egpo_jax.evaluation.runner import Model

KINDS = ("workdir", "hf")


def read_workdir(folder: str, step: int | None = None, *, mesh=None
                 ) -> tuple[int, Any, dict[str, Any], Any, Any]:
  """(step, params, extra, config, experiment) of a training workdir, read-only.

  Args:
    folder: the workdir (config.json + checkpoints/).
    step: the checkpoint to read; default the newest step folder. A damaged step raises
      CorruptCheckpointError naming the other steps (pass one of them as `step`).
    mesh: shard the params on this mesh; default this process's first device.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from egpo_jax.models import sharding  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import checkpointing, train  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(_read_json(os.path.join(folder, "config.json")))
  exp = train.build(c)
  directory = os.path.join(folder, "checkpoints")
  steps = checkpointing.step_folders(directory)
  if not steps:
    raise FileNotFoundError(f"{directory} holds no checkpoint step folder")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise FileNotFoundError(f"--step={step}: no such checkpoint under {directory}; "
                            f"found steps {steps}")
  abstract = sharding.abstract_params(exp.model_config, mesh)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                            abstract)
  try:
    params, extra = checkpointing.read_params(os.path.join(directory, str(chosen)), abstract)
  except checkpointing.CorruptCheckpointError as err:
    others = [s for s in steps if s != chosen]
    raise checkpointing.CorruptCheckpointError(
        err.path, f"{err.reason}. Nothing was changed; "
        + (f"pass --step with one of {others} to read another checkpoint" if others
           else "no other checkpoint to read")) from err
  return chosen, params, extra, c, exp


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
    restored_step, params, extra, c, exp = read_workdir(folder, step)
    info = {"kind": kind, "path": folder, "step": int(restored_step),
            "model": c.model.preset, "algo": c.algo.advantage, "variant": c.algo.variant,
            "task": c.task.name, "synthetic_difficulty": int(c.task.difficulty),
            "template": c.task.template, "segment_delimiter": c.algo.segment_delimiter,
            "rl_iteration": extra.get("iteration")}
    return Model(params, exp.model_config, exp.tokenizer, info)
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
