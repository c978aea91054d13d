"""Exports a trained checkpoint of this project as a Hugging Face folder.

    python -m experiments.export_hf --checkpoint=WORKDIR --out=exported/
    python -m experiments.export_hf --checkpoint=WORKDIR --step=700 --dtype=bfloat16 \\
        --out=exported/
    python -m experiments.export_hf --checkpoint=ROOT/checkpoints --model=tiny \\
        --tokenizer=byte --byte_special_tokens='<think>,</think>' --out=exported/

--checkpoint is a training workdir (config.json + checkpoints/, or its checkpoints/ or
one step folder): the model preset and the tokenizer (the byte tokenizer with the
trainer's special tokens, or the Hugging Face model's own) come from its config.json.
Or it is a bare orbax checkpoint root, step or `state` item folder in the layout
egpo_jax.training.checkpointing writes (`<root>/<step>/{state,extra}`, the params at
`train.params` or `params`); then --model or --hf_config and --tokenizer say what it is.

The checkpoint is only read, and verified before anything is written (commit markers,
save-time fingerprints of every params array; `checkpointing.read_params`): a damaged
step exits 2 with one line naming it and the other steps, exports nothing and changes
nothing. Only the params are read, never the optimizer state. --step picks a step
(default: the newest). The weights keep the dtype they were trained in unless --dtype
says otherwise; the dtype used is printed.

The output folder holds config.json, model*.safetensors (+ index when sharded),
generation_config.json and the tokenizer files (all mode 0644 under the usual umask),
and loads with transformers' AutoModelForCausalLM.from_pretrained and
PreTrainedTokenizerFast.

The flags follow experiments/cli.py; the old spellings --hf-config, --param-dtype,
--byte-special-tokens and --max-shard-gb still work, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import types

import jax
from absl import flags

from egpo_jax.evaluation import loading
from egpo_jax.models import config as config_lib
from egpo_jax.models import hf_io, sharding
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import ModelConfig
from egpo_jax.training import checkpointing
from experiments import cli

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


def read_bare(path: str, step: int | None, config: ModelConfig) -> tuple[str, dict]:
  """(step folder, params) of a bare orbax root, step or item folder, read-only and
  verified (`checkpointing.read_params`), on this process's first device."""
  item_dir = resolve_item_dir(path, step)
  step_dir = os.path.dirname(item_dir) if os.path.basename(item_dir) == "state" else item_dir
  abstract = checkpointing.on_first_device(sharding.abstract_params(config))
  params, _ = checkpointing.read_params(step_dir, abstract)
  return step_dir, params


def check_tokenizer(spec: str) -> None:
  """Raises FileNotFoundError unless `spec` is 'byte' or a folder with tokenizer.json."""
  if spec != "byte" and not os.path.isfile(os.path.join(spec, "tokenizer.json")):
    raise FileNotFoundError(f"--tokenizer {spec}: no tokenizer.json there; pass a Hugging Face "
                            "checkpoint folder or 'byte'")


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
  check_tokenizer(spec)
  written = []
  for name in TOKENIZER_FILES:
    src = os.path.join(spec, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out, name))
      written.append(name)
  return written


FLAGS = flags.FlagValues()
_flag = dict(flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ or a step "
                    "folder), or a bare orbax root, step or item folder", **_flag)
flags.DEFINE_integer("step", None, "step to export (default: newest)", **_flag)
flags.DEFINE_string("model", None, f"named config {sorted(config_lib.NAMED_CONFIGS)} (a "
                    "workdir's own is read from its config.json)", **_flag)
flags.DEFINE_string("hf_config", None, "config.json (or its folder) of the base checkpoint "
                    "(a workdir's own is read from its config.json)", **_flag)
flags.DEFINE_string("param_dtype", "float32", "bare checkpoints only: the model config's "
                    "param dtype", **_flag)
flags.DEFINE_string("tokenizer", None, "'byte' or a tokenizer folder (default for a "
                    "workdir: its own; required for a bare checkpoint)", **_flag)
flags.DEFINE_string("byte_special_tokens", None, "comma-separated extra special tokens of "
                    "the byte tokenizer (default for a workdir: the trainer's "
                    "<think>,</think>)", **_flag)
flags.DEFINE_string("out", None, "output folder (created)", **_flag)
flags.DEFINE_enum("dtype", None, sorted(hf_io.EXPORT_DTYPES), "safetensors dtype (default: "
                  "the dtype the params were trained in, which is printed)", **_flag)
flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors file, in GiB", **_flag)
flags.mark_flags_as_required(["checkpoint", "out"], flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["model", "hf_config"], flag_values=FLAGS)
# Spellings before the experiments/ convention (cli.py); they still work, with a warning.
RENAMED = {"hf-config": "hf_config", "param-dtype": "param_dtype",
           "byte-special-tokens": "byte_special_tokens", "max-shard-gb": "max_shard_gb"}


def _workdir(path: str, step: int | None) -> tuple[str, int | None] | None:
  """(workdir, step) when `path` is a training workdir (or inside one), else None."""
  try:
    kind, folder, step = loading.resolve(path, step)
  except FileNotFoundError:
    return None
  return (folder, step) if kind == "workdir" else None


def _check_model_flags(args: types.SimpleNamespace, c) -> None:
  """--model/--hf_config may restate a workdir's model, not contradict it."""
  preset = c.model.preset
  if args.model and args.model != preset:
    raise ValueError(f"--model={args.model} contradicts the workdir's model.preset={preset}; "
                     "drop --model (a workdir's config.json names its model)")
  if args.hf_config and (preset != "hf" or os.path.realpath(args.hf_config).rstrip("/")
                         not in (os.path.realpath(c.model.path),
                                 os.path.join(os.path.realpath(c.model.path), "config.json"))):
    raise ValueError(f"--hf_config={args.hf_config} contradicts the workdir's model "
                     f"({preset} {c.model.path}); drop --hf_config")


def export(args: types.SimpleNamespace) -> tuple[str, list[str]]:
  """Reads and verifies the checkpoint, then writes the HF folder; (source, files)."""
  workdir = _workdir(args.checkpoint, args.step)
  if workdir is not None:
    step, params, _, c, exp = loading.read_workdir(*workdir)
    _check_model_flags(args, c)
    config = exp.model_config
    source = os.path.join(workdir[0], "checkpoints", str(step), "state")
    hf_model = c.model.preset == "hf"
    tokenizer = args.tokenizer or (c.model.path if hf_model else "byte")
    specials = (() if hf_model else loading.BYTE_SPECIAL_TOKENS)
  else:
    if not (args.model or args.hf_config) or not args.tokenizer:
      raise ValueError(f"--checkpoint={args.checkpoint} is no training workdir (no "
                       "config.json), so give --model or --hf_config, and --tokenizer")
    if args.model:
      config = config_lib.get_config(args.model, param_dtype=args.param_dtype)
    else:
      config = config_lib.load_hf_config(args.hf_config, param_dtype=args.param_dtype)
    step_dir, params = read_bare(args.checkpoint, args.step, config)
    source = os.path.join(step_dir, "state")
    tokenizer, specials = args.tokenizer, ()
  if args.byte_special_tokens is not None:
    specials = tuple(t for t in args.byte_special_tokens.split(",") if t)
  check_tokenizer(tokenizer)   # before anything is written
  trained = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
  dtype = args.dtype or trained[0]
  how = "as trained" if [dtype] == trained else f"trained in {'/'.join(trained)}"
  print(f"dtype: {dtype} ({how})")
  os.makedirs(args.out, exist_ok=True)
  files = hf_io.save_hf_checkpoint(params, config, args.out, dtype=dtype,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
  files += write_tokenizer(tokenizer, args.out, config, specials)
  return source, files


def main(argv: list[str] | None = None) -> int:
  try:
    cli.parse(FLAGS, argv, doc=__doc__, renamed=RENAMED)
  except cli.Exit as done:
    return done.code
  args = cli.namespace(FLAGS)
  done, code = checkpointing.run_tool(export, args)
  if done:
    print(f"exported {done[0]} -> {args.out}: {', '.join(done[1])}")
  return code


if __name__ == "__main__":
  sys.exit(main())
