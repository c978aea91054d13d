"""The shared model files: a random transformers `Qwen2ForCausalLM` per size, saved once as
safetensors with a word-level tokenizer ("w3" -> id 3), which every system loads.

    python -m benchmarks.peers.model [--force]    # writes <cache>/models/{tiny,small}

Runs in the project's virtualenv (transformers + torch). The architecture is egpo_jax's
"tiny"/"small" preset written by `config.to_hf_dict`, so the three systems see the same
config.json.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.peers import spec


def _tokenizer(workload: spec.Workload):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": workload.pad_id, "<unk>": 1, "<eos>": workload.eos_id}
  vocab.update({spec.token_text(i): i for i in range(workload.first_word_id,
                                                     spec.VOCAB_SIZE)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<unk>")


def write_model(name: str, path: str, *, seed: int = 0) -> None:
  import torch
  import transformers
  from egpo_jax.models import config as model_config
  config = model_config.get_config(name)
  hf = model_config.to_hf_dict(config, extra={"eos_token_id": spec.Workload().eos_id,
                                              "pad_token_id": spec.Workload().pad_id,
                                              "bos_token_id": None})
  for key, value in spec.MODELS[name].items():
    if hf[key] != value:
      raise ValueError(f"egpo_jax preset {name!r} has {key}={hf[key]}, the benchmark "
                       f"spec {value}: update benchmarks/peers/spec.py MODELS")
  torch.manual_seed(seed)
  qwen_config = transformers.Qwen2Config(**{k: v for k, v in hf.items()
                                            if k not in ("architectures", "model_type")})
  model = transformers.Qwen2ForCausalLM(qwen_config).to(torch.float32).eval()
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True)
  _tokenizer(spec.Workload()).save_pretrained(path)
  params = sum(p.numel() for p in model.parameters())
  with open(os.path.join(path, "benchmark_model.json"), "w") as f:
    json.dump({"name": name, "seed": seed, "params": params}, f)


def ensure_models(names=tuple(spec.MODELS), force: bool = False) -> dict[str, str]:
  """Writes the model files that are missing (or all of them with force)."""
  paths = {}
  for name in names:
    path = spec.model_dir(name)
    if force or not os.path.exists(os.path.join(path, "benchmark_model.json")):
      write_model(name, path)
    paths[name] = path
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--force", action="store_true", help="rewrite existing files")
  args = parser.parse_args()
  for name, path in ensure_models(force=args.force).items():
    with open(os.path.join(path, "benchmark_model.json")) as f:
      print(name, path, json.load(f)["params"], "params")


if __name__ == "__main__":
  main()
