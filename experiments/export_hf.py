"""Exports a trained checkpoint of this project as a Hugging Face folder.

    python -m experiments.export_hf --checkpoint WORKDIR/checkpoints --model tiny \\
        --tokenizer byte --out exported/
    python -m experiments.export_hf --checkpoint WORKDIR/checkpoints --step 700 \\
        --hf-config /models/Qwen2.5-Math-1.5B --tokenizer /models/Qwen2.5-Math-1.5B \\
        --out exported/ --dtype bfloat16

Expected checkpoint layout (what egpo_jax.training.checkpointing writes): an orbax
CheckpointManager directory `<root>/<step>/<item>/`, where `<item>` (default "state") was
saved with `ocp.args.StandardSave(tree)` and `tree` has a "params" entry (a dict, or a
pytree node such as TrainState with a `params` field) holding the params pytree of
`egpo_jax.models.transformer`. `--checkpoint` may point at the root (the newest step is
used unless --step is given), at one step folder, or at the item folder itself. Only
"params" is read (partial restore), so the optimizer state never enters memory.

The output folder holds config.json, model*.safetensors (+ index when sharded),
generation_config.json and the tokenizer files, and loads with transformers'
AutoModelForCausalLM.from_pretrained and PreTrainedTokenizerFast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import jax
import orbax.checkpoint as ocp

from egpo_jax.models import config as config_lib
from egpo_jax.models import hf_io, sharding
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")


def resolve_item_dir(path: str, step: int | None = None, item: str = "state") -> str:
  """The orbax item folder under a manager root, a step folder, or the item itself."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path} is not a directory")
  steps = sorted(int(d) for d in os.listdir(path)
                 if re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(path, d)))
  if steps:
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
      raise FileNotFoundError(f"--step {step}: no such step under {path}; found {steps}")
    path = os.path.join(path, str(chosen))
  elif step is not None:
    raise FileNotFoundError(f"--step {step} given but {path} holds no numbered step folders")
  if os.path.isdir(os.path.join(path, item)):
    path = os.path.join(path, item)
  return path


def restore_params(item_dir: str, config: ModelConfig, mesh=None) -> dict:
  """Restores only the params of a StandardSave item, checked against `config`.

  The trainer's layout ({"train": TrainState, "rng": ...}) and a plain {"params": ...}
  tree are both read.
  """
  params = sharding.abstract_params(config, mesh)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          params)
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(item_dir).item_metadata.tree
    trainer_layout = isinstance(saved, dict) and "train" in saved
    target = {"train": {"params": params}} if trainer_layout else {"params": params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      out = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as err:
      raise ValueError(f"{item_dir}: cannot restore a 'params' tree matching the model config "
                       f"({type(err).__name__}: {err}); check --model/--hf-config and that "
                       "the checkpoint item holds a 'params' entry") from err
  return out["train"]["params"] if trainer_layout else out["params"]


def write_tokenizer(spec: str, out: str, config: ModelConfig, byte_special_tokens=()):
  """Tokenizer files: 'byte' writes ByteTokenizer's; a folder path copies its files."""
  if spec == "byte":
    tok = ByteTokenizer(extra_special_tokens=byte_special_tokens, vocab_size=config.vocab_size)
    written = tok.save_hf(out)
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.eos_ids),
                  "pad_token_id": tok.pad_id}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
    return written + ["generation_config.json"]
  if not os.path.isfile(os.path.join(spec, "tokenizer.json")):
    raise FileNotFoundError(f"--tokenizer {spec}: no tokenizer.json there; pass a Hugging Face "
                            "checkpoint folder or 'byte'")
  written = []
  for name in TOKENIZER_FILES:
    src = os.path.join(spec, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out, name))
      written.append(name)
  return written


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="orbax root, step or item folder")
  parser.add_argument("--step", type=int, default=None, help="step to export (default: newest)")
  parser.add_argument("--item", default="state", help="orbax item name holding 'params'")
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--model", help=f"named config: {sorted(config_lib.NAMED_CONFIGS)}")
  model.add_argument("--hf-config", help="config.json (or its folder) of the base checkpoint")
  parser.add_argument("--param-dtype", default="float32",
                      help="dtype the params were trained in (float32 | bfloat16)")
  parser.add_argument("--tokenizer", required=True, help="'byte' or a tokenizer folder")
  parser.add_argument("--byte-special-tokens", default="",
                      help="comma-separated extra special tokens of the byte tokenizer")
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--dtype", default="bfloat16", help="safetensors dtype of the export")
  parser.add_argument("--max-shard-gb", type=float, default=5.0)
  args = parser.parse_args(argv)

  if args.model:
    config = config_lib.get_config(args.model, param_dtype=args.param_dtype)
  else:
    config = config_lib.load_hf_config(args.hf_config, param_dtype=args.param_dtype)
  item_dir = resolve_item_dir(args.checkpoint, args.step, args.item)
  params = restore_params(item_dir, config)
  os.makedirs(args.out, exist_ok=True)
  files = hf_io.save_hf_checkpoint(params, config, args.out, dtype=args.dtype,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
  specials = tuple(t for t in args.byte_special_tokens.split(",") if t)
  files += write_tokenizer(args.tokenizer, args.out, config, specials)
  print(f"exported {item_dir} -> {args.out}: {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
