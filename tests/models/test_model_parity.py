"""Parity with an independent implementation: transformers' Qwen2 / Llama in torch (CPU).

Tiny random models are saved with save_pretrained (several safetensors shards plus the
index), loaded through our importer and compared on left-padded batches. Export goes the
other way: our params -> safetensors -> transformers -> the same logits. Tolerance:
max |logits_ours - logits_torch| <= 1e-5 at float32, over real (non-pad) positions, with
weights drawn at std 0.2 so that the logits span about +-1.5 (not near-uniform).
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from egpo_jax.models import attention as attention_lib  # noqa: E402
from egpo_jax.models import config as config_lib  # noqa: E402
from egpo_jax.models import hf_io  # noqa: E402
from egpo_jax.models import transformer as tr  # noqa: E402

ATOL = 1e-5
B, L = 3, 24
_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_COMMON, tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2_untied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    # Llama-3 rope scaling, no q/k/v bias, and head_dim != hidden / heads.
    "llama3_scaled": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_COMMON, head_dim=16, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
}
forward = jax.jit(tr.forward, static_argnames=("config", "return_hidden"))


def _batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 128, (B, L))
  mask = np.arange(L)[None, :] >= np.array([0, 5, 17])[:, None]
  return ids, mask


def _torch_logits(model, ids, mask):
  # transformers' generate derives position ids from the mask exactly like this.
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(pos))
  return out.logits.numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """name -> (torch model, checkpoint folder saved in several shards)."""
  torch.manual_seed(0)
  out = {}
  for name, make in MODELS.items():
    model = make().eval()
    with torch.no_grad():
      for p in model.parameters():
        p.normal_(0.0, 0.2)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path, max_shard_size="20KB")
    out[name] = (model, path)
  return out


@pytest.fixture(scope="module")
def imported(hf_models):
  return {name: hf_io.load_hf_checkpoint(path) for name, (_, path) in hf_models.items()}


def test_checkpoints_are_multi_shard(hf_models):
  for _, path in hf_models.values():
    with open(os.path.join(path, hf_io.INDEX_FILE)) as f:
      assert len(set(json.load(f)["weight_map"].values())) > 2


def test_config_mapping(imported):
  tied, untied, llama = (imported[k][1] for k in MODELS)
  assert tied.tie_word_embeddings and tied.qkv_bias and tied.head_size == 8
  assert not untied.tie_word_embeddings and untied.rms_norm_eps == 1e-5
  assert not llama.qkv_bias and llama.head_size == 16 and llama.rope_theta == 500000.0
  assert llama.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}
  assert "lm_head" not in imported["qwen2_tied"][0]


@pytest.mark.parametrize("attention", ["reference", "blockwise"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(hf_models, imported, name, attention, monkeypatch):
  # Every attention implementation a CPU runs ("cudnn" and "splash" need a GPU / TPU);
  # blockwise with 8-slot blocks, so the 24 positions span several of them.
  model, _ = hf_models[name]
  params, config = imported[name]
  config = config.replace(attention=attention)
  monkeypatch.setattr(attention_lib, "BLOCK_SIZE", 8)
  ids, mask = _batch()
  ref = _torch_logits(model, ids, mask)
  ours = np.asarray(jax.jit(functools.partial(tr.forward, config=config))(
      params, jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(ref).max() > 0.5  # logits are far from uniform
  assert np.abs(ours - ref)[mask].max() <= ATOL


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3_scaled"])
def test_export_loads_in_transformers_with_same_logits(imported, name, tmp_path):
  params, config = imported[name]
  files = hf_io.save_hf_checkpoint(params, config, str(tmp_path), dtype="float32",
                                   max_shard_bytes=30_000)
  assert hf_io.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(model).__name__ == ("Qwen2ForCausalLM" if config.qkv_bias else
                                  "LlamaForCausalLM")
  ids, mask = _batch()
  ours = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(mask), config=config))
  assert np.abs(_torch_logits(model, ids, mask) - ours)[mask].max() <= ATOL
  # And back: the exported folder re-imports to the identical params and config.
  params2, config2 = hf_io.load_hf_checkpoint(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_export_and_param_dtype(imported, tmp_path):
  params, config = imported["qwen2_untied"]
  hf_io.save_hf_checkpoint(params, config, str(tmp_path), dtype="bfloat16")
  assert os.listdir(tmp_path).count("model.safetensors") == 1  # one shard: no index
  params16, config16 = hf_io.load_hf_checkpoint(str(tmp_path), param_dtype="bfloat16")
  assert config16.param_dtype == "bfloat16"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)),
               params16, params)


def _copy(src, tmp_path):
  dst = str(tmp_path / "ckpt")
  shutil.copytree(src, dst)
  return dst


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(file, "w") as f:
    json.dump(cfg, f)


def test_missing_shard_is_named(hf_models, tmp_path):
  path = _copy(hf_models["qwen2_tied"][1], tmp_path)
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    hf_io.load_hf_checkpoint(path)


def test_wrong_shape_is_named(hf_models, tmp_path):
  path = _copy(hf_models["qwen2_tied"][1], tmp_path)
  _edit_config(path, intermediate_size=48)
  with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight: \(64, 32\) "
                                       r"\(expected \(48, 32\)\)"):
    hf_io.load_hf_checkpoint(path)


def test_unknown_architecture_is_named(hf_models, tmp_path):
  path = _copy(hf_models["qwen2_tied"][1], tmp_path)
  _edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
  with pytest.raises(ValueError, match="MistralForCausalLM.*not supported"):
    hf_io.load_hf_checkpoint(path)
  _edit_config(path, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
               use_sliding_window=True)
  with pytest.raises(ValueError, match="use_sliding_window"):
    hf_io.load_hf_checkpoint(path)


def test_missing_and_unexpected_tensors_are_named(hf_models, tmp_path):
  path = _copy(hf_models["qwen2_tied"][1], tmp_path)
  _edit_config(path, num_hidden_layers=1)
  with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.1\."):
    hf_io.load_hf_checkpoint(path)
  _edit_config(path, num_hidden_layers=2, tie_word_embeddings=False)
  with pytest.raises(ValueError, match=r"missing from the checkpoint: \['lm_head\.weight'\]"):
    hf_io.load_hf_checkpoint(path)


def test_no_weights_at_all(tmp_path):
  config = config_lib.get_config("tiny")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_lib.to_hf_dict(config), f)
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    hf_io.load_hf_checkpoint(str(tmp_path))
