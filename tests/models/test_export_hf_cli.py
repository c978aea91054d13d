"""experiments/export_hf.py: an orbax training checkpoint -> a Hugging Face folder that
transformers loads with the same logits and the same tokenizer ids."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from egpo_jax.models import config as config_lib
from egpo_jax.models import transformer as tr
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from experiments import export_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A checkpoint in the trainer's layout: <root>/<step>/state (params + opt state), extra."""
  root = str(tmp_path_factory.mktemp("ckpt"))
  params = tr.init_params(TINY, jax.random.key(3))
  params = jax.tree.map(lambda x: x * 5, params)  # sharper logits than the 0.02 init
  state = {"step": jnp.asarray(7), "params": params,
           "opt_state": optax.adam(1e-3).init(params)}
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=True),
                             item_names=("state", "extra")) as manager:
    for step in (3, 7):
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 extra=ocp.args.JsonSave({"step": step})))
    manager.wait_until_finished()
  return root, params


def test_export_loads_in_transformers(trained, tmp_path, capsys):
  root, params = trained
  out = str(tmp_path / "hf")
  assert export_hf.main(["--checkpoint", root, "--model", "tiny", "--tokenizer", "byte",
                         "--byte-special-tokens", "<think>,</think>", "--out", out,
                         "--dtype", "float32"]) == 0
  assert f"{root}/7/state" in capsys.readouterr().out  # the newest step by default
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
  byte = ByteTokenizer(extra_special_tokens=["<think>", "</think>"], vocab_size=512)
  text = byte.apply_chat_template([{"role": "user", "content": "2+2? <think>"}])
  ids = byte.encode(text, add_bos=True)
  assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
  assert model.generation_config.eos_token_id in (byte.eos_id, [byte.eos_id])
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  ours = tr.forward(params, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), config=TINY)
  # float32 agreement relative to the logit scale (|logits| reach ~8 with these weights).
  assert np.abs(ref - np.asarray(ours)).max() <= 2e-5 * np.abs(ref).max()


def _error(capsys, argv):
  """export_hf.main's one-line error (it exits 2)."""
  capsys.readouterr()
  assert export_hf.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_step_and_config_errors(trained, tmp_path, capsys):
  root, _ = trained
  assert re.search(r"--step 5: no such step .*\[3, 7\]", _error(capsys, [
      "--checkpoint", root, "--step", "5", "--model", "tiny", "--tokenizer", "byte",
      "--out", str(tmp_path)]))
  assert "cannot restore a 'params' tree matching" in _error(capsys, [
      "--checkpoint", root, "--model", "small", "--tokenizer", "byte", "--out", str(tmp_path)])
  assert "no tokenizer.json" in _error(capsys, [
      "--checkpoint", root, "--step", "3", "--model", "tiny", "--tokenizer", str(tmp_path),
      "--out", str(tmp_path / "o")])
  assert not os.path.exists(tmp_path / "o")   # checked before anything is written
