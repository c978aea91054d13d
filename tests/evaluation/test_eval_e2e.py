"""End to end: a tiny model trained by `train.train` is evaluated on every shipped benchmark
and on the synthetic task, from its workdir and from its Hugging Face export; two runs are
compared. Accuracy is near zero; the tests check that every field is produced and that the
fields agree with each other."""

import glob
import hashlib
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from egpo_jax.evaluation import benchmarks, calibration, loading
from egpo_jax.models import hf_io
from egpo_jax.training import experiment, validation
from egpo_jax.training import train as train_lib
from experiments import compare, evaluate, export_hf
from experiments.configs import tiny

pytestmark = pytest.mark.slow

ALL = ",".join(benchmarks.BENCHMARKS)
# Small and shared by every evaluation of a test (one sampler compilation per test).
SMALL = ["--num_samples", "8", "--max_new_tokens", "16", "--no_progress"]


def tiny_config():
  """The trainer's tiny config, as test_train_e2e.py's "egpo" case (shared compilations)."""
  c = tiny.get_config()
  c.ppo.micro_batches = 2
  return c


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  train_lib.train(tiny_config(), workdir, progress=False)
  return workdir


def _results(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def _check_benchmark(name, b, limit, g):
  assert b["num_problems"] == limit, (name, b.get("skipped"))
  assert b["num_responses"] == limit * g
  assert b["skipped"]["scanned"] == b["num_problems"] + b["skipped"]["count"]
  pk = [b["pass@k"][k] for k in ("1", "2", "4", "8")]
  assert all(0.0 <= p <= 1.0 for p in pk) and pk == sorted(pk), (name, pk)
  assert b["pass@k"]["1"] == pytest.approx(b["accuracy"])
  assert set(b["maj@k"]) == {"1", "2", "4", "8"}
  assert all(0.0 <= v <= 1.0 for v in b["maj@k"].values())
  assert 1 <= b["response_length"]["mean"] <= b["response_length"]["max"] <= 16
  assert 0.0 <= b["truncation_rate"] <= 1.0 and 0.0 <= b["no_answer_rate"] <= 1.0
  cal = b["calibration"]
  assert cal["num_responses"] == limit * g
  assert cal["num_correct"] == round(b["accuracy"] * limit * g)
  for key in calibration.METRICS:  # a value, or None with the reason
    assert (cal[key] is not None) != (f"{key}_undefined_reason" in cal), (name, key)
  assert cal["ece"] is not None and 0.0 <= cal["brier"] <= 1.0
  assert sum(b["reliability"]["count"]) == limit * g
  assert sum(b["verdicts"].values()) == limit * g
  assert "answer_segment" in b


def test_evaluate_every_benchmark_from_a_trained_workdir(demo_workdir, shared_data_dir, tmp_path):
  out = str(tmp_path / "eval")
  rc = evaluate.main(["--checkpoint", demo_workdir, "--benchmarks", ALL, "--limit", "2",
                      "--max_prompt_len", "256", "--batch_size", "2", "--no_plots",
                      "--data_dir", shared_data_dir, "--out", out] + SMALL)
  assert rc == 0
  res = _results(out)
  assert res["model"]["kind"] == "workdir" and res["model"]["step"] == 2
  assert res["settings"]["temperature"] == 0.6 and res["settings"]["top_k"] == 20
  assert list(res["benchmarks"]) == list(benchmarks.BENCHMARKS)
  for name, b in res["benchmarks"].items():
    _check_benchmark(name, b, limit=2, g=8)
    with open(os.path.join(out, f"responses_{name}.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 16
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(b["accuracy"])
  # Long prompts were skipped, counted and listed with the reason.
  skipped = sum(b["skipped"]["count"] for b in res["benchmarks"].values())
  assert skipped > 0
  assert any("over max_prompt_len=256" in r for b in res["benchmarks"].values()
             for _, r in b["skipped"]["records"])
  assert "by_subject" in res["benchmarks"]["math500"]
  assert "by_level" in res["benchmarks"]["math500"]
  assert "by_level" in res["benchmarks"]["synthetic"]
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  for name in benchmarks.BENCHMARKS:
    assert f"| {name} | 2 |" in md


def test_synthetic_before_and_after_rl_and_from_the_hf_export(demo_workdir, tmp_path):
  common = ["--benchmarks", "synthetic", "--limit", "8", "--batch_size", "4",
            "--no_save_responses"] + SMALL
  before, after, hf_out = (str(tmp_path / n) for n in ("before", "after", "hf_eval"))
  assert evaluate.main(["--checkpoint", demo_workdir, "--step", "0", "--out", before,
                        "--no_plots"] + common) == 0
  assert evaluate.main(["--checkpoint", os.path.join(demo_workdir, "checkpoints"),
                        "--out", after] + common) == 0
  for png in ("synthetic_reliability.png", "synthetic_entropy.png"):
    assert os.path.exists(os.path.join(after, png)), png
  b0, b2 = (_results(p)["benchmarks"]["synthetic"] for p in (before, after))
  _check_benchmark("synthetic", b0, limit=8, g=8)
  _check_benchmark("synthetic", b2, limit=8, g=8)
  # Two RL updates moved the policy, so its confidence moved.
  assert b0["calibration"]["mean_confidence"] != b2["calibration"]["mean_confidence"]

  # The HF export of the same step, read through the HF tokenizer and verified on the
  # host, gives the same responses, hence the same numbers.
  hf = str(tmp_path / "hf")
  _, params, _, _, exp = loading.read_workdir(demo_workdir)
  model_config = exp.model_config
  hf_io.save_hf_checkpoint(params, model_config, hf, dtype="float32")
  export_hf.write_tokenizer("byte", hf, model_config, ("<think>", "</think>"))
  assert evaluate.main(["--checkpoint", hf, "--template", "plain", "--chat", "false",
                        "--synthetic_difficulty", "1", "--out", hf_out, "--no_plots"]
                       + common) == 0
  res = _results(hf_out)
  assert res["model"]["kind"] == "hf"
  bh = res["benchmarks"]["synthetic"]
  assert bh["pass@k"] == b2["pass@k"] and bh["maj@k"] == b2["maj@k"]
  for key in ("ece", "brier", "mean_confidence"):
    assert bh["calibration"][key] == pytest.approx(b2["calibration"][key], abs=1e-5)

  report = str(tmp_path / "report")
  assert compare.main([demo_workdir, after, hf_out, "--labels", "workdir,after,hf",
                       "--out", report]) == 0
  with open(os.path.join(report, "report.md")) as f:
    md = f.read()
  assert "| synthetic | after | 8 |" in md and "| synthetic | hf | 8 |" in md
  for png in ("curves.png", "eval_pass1.png", "reliability.png"):
    assert os.path.exists(os.path.join(report, png)), png


def test_validation_hook_for_the_trainer(demo_workdir):
  exp = experiment.build(tiny_config())
  _, params, _, _, _ = loading.read_workdir(demo_workdir)
  out = validation.evaluate_jax_task(params, jax.random.PRNGKey(3), task=exp.task,
                                 model_config=exp.model_config, spec=exp.settings.sampling,
                                 num_prompts=8, delimiter_ids=(300,))
  assert out["num_responses"] == 32 and 0.0 <= out["accuracy"] <= 1.0
  assert out["pass@1"] == pytest.approx(out["accuracy"]) and out["pass@4"] >= out["pass@1"]
  # Token 300 is no special token, but a barely trained model may still sample it.
  assert 0 <= out["answer_segment_fallbacks"] <= 32 and "answer_auroc" in out
  json.dumps(out)  # JSON-safe


def test_bad_arguments_name_the_flag(demo_workdir, tmp_path, capsys):
  assert evaluate.main(["--checkpoint", str(tmp_path), "--benchmarks", "synthetic"]) == 2
  assert "neither a training workdir" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", demo_workdir, "--benchmarks", "mathx"]) == 2
  assert "--benchmarks: unknown ['mathx']" in capsys.readouterr().err
  assert evaluate.main(["--checkpoint", demo_workdir, "--benchmarks", "synthetic",
                        "--max_new_tokens", "4000"]) == 2
  assert "max_position_embeddings" in capsys.readouterr().err


# --- read-only tools: nothing in the workdir changes; a damaged step is an error --------

def _snapshot(root):
  """{path: (sha256, mtime_ns, mode)} of every file and {path} of every folder under root
  (tests run as root, whom chmod does not stop: the contents are compared instead)."""
  files, dirs = {}, set()
  for d, subdirs, names in os.walk(root):
    dirs.update(os.path.join(d, s) for s in subdirs)
    for name in names:
      p = os.path.join(d, name)
      st = os.stat(p)
      with open(p, "rb") as f:
        files[p] = (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, st.st_mode)
  return files, dirs


def _read_only_copy(demo_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(demo_workdir, workdir, ignore=shutil.ignore_patterns("eval"))
  # A save in progress (orbax's temporary folder), which a CheckpointManager would delete.
  saving = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1")
  os.makedirs(saving)
  with open(os.path.join(saving, "partial"), "w") as f:
    f.write("being written")
  subprocess.run(["chmod", "-R", "a-w", workdir], check=True)
  return workdir


def _writable(workdir):
  subprocess.run(["chmod", "-R", "u+w", workdir], check=True)


def _garble_params(workdir, step):
  """Flips 8 bytes of one of the step's array files (largest first) at the first of 32
  fixed offsets where that damages params (the files hold params and AdamW moments,
  compressed, so where a flip lands is found by reading the params back; a flip that
  misses the params is undone before the next); returns the error's reason."""
  from egpo_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  for path in sorted(files, key=os.path.getsize, reverse=True)[:3]:
    with open(path, "rb") as f:
      clean = f.read()
    for i in range(32):
      data = bytearray(clean)
      at = int((i + 0.5) / 32 * len(data))
      data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
      with open(path, "wb") as f:
        f.write(bytes(data))
      try:
        loading.read_workdir(workdir, step)
      except checkpointing.CorruptCheckpointError as err:
        if "train/params/" in err.reason:
          return err.reason
    with open(path, "wb") as f:
      f.write(clean)
  raise AssertionError("no offset tried damages the params")


def test_evaluate_export_and_compare_leave_the_workdir_unchanged(demo_workdir, tmp_path,
                                                                 capsys):
  workdir = _read_only_copy(demo_workdir, tmp_path)
  files, dirs = _snapshot(workdir)
  try:
    assert evaluate.main(["--checkpoint", workdir, "--benchmarks", "synthetic", "--limit", "4",
                          "--batch_size", "4", "--no_plots"] + SMALL) == 0   # default --out
    assert evaluate.main(["--checkpoint", workdir, "--step", "0", "--benchmarks", "synthetic",
                          "--limit", "4", "--batch_size", "4", "--no_plots",
                          "--out", str(tmp_path / "ev0")] + SMALL) == 0
    out = str(tmp_path / "hf")
    capsys.readouterr()
    assert export_hf.main(["--checkpoint", workdir, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "dtype: float32 (as trained)" in printed
    # The README's form (restating the model and tokenizer) works; a contradiction does not.
    assert export_hf.main(["--checkpoint", os.path.join(workdir, "checkpoints"), "--model",
                           "tiny", "--tokenizer", "byte", "--byte-special-tokens",
                           "<think>,</think>", "--out", str(tmp_path / "hf2")]) == 0
    assert export_hf.main(["--checkpoint", workdir, "--model", "small",
                           "--out", str(tmp_path / "hf3")]) == 2
    assert "--model=small contradicts the workdir's model.preset=tiny" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf3")
    assert compare.main([workdir, str(tmp_path / "ev0"), "--out", str(tmp_path / "cmp")]) == 0
    after_files, after_dirs = _snapshot(workdir)
  finally:
    _writable(workdir)
  assert {p: after_files[p] for p in files} == files
  eval_dir = os.path.join(workdir, "eval")
  new = sorted(set(after_files) - set(files)) + sorted(after_dirs - dirs)
  assert new and all(p == eval_dir or p.startswith(eval_dir + os.sep) for p in new), new
  assert not glob.glob(os.path.join(workdir, "checkpoints*quarantine*"))
  # The export read the preset and the trainer's special tokens from the workdir.
  for name in os.listdir(out):
    assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name
  with open(os.path.join(out, "tokenizer.json")) as f:
    added = {t["content"] for t in json.load(f)["added_tokens"]}
  assert {"<think>", "</think>"} <= added


# orbax drops the other arrays' pending reads when one fails; Python reports them later.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_garbled_step_fails_evaluate_and_export_and_nothing_moves(demo_workdir, tmp_path,
                                                                    capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(demo_workdir, workdir, ignore=shutil.ignore_patterns("eval"))
  step_dir = os.path.join(workdir, "checkpoints", "2")
  reason = _garble_params(workdir, 2)
  files, dirs = _snapshot(workdir)
  out = str(tmp_path / "hf")
  capsys.readouterr()
  assert export_hf.main(["--checkpoint", workdir, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"checkpoint {step_dir} is incomplete or corrupt" in err
  assert reason in err and "differ from their save-time fingerprint" in err
  assert "pass --step with one of [0]" in err and not os.path.exists(out)
  assert evaluate.main(["--checkpoint", workdir, "--benchmarks", "synthetic", "--limit", "4",
                        "--out", str(tmp_path / "ev")] + SMALL) == 2
  err = capsys.readouterr().err
  assert f"checkpoint {step_dir} is incomplete or corrupt" in err and "[0]" in err
  assert not os.path.exists(tmp_path / "ev")
  assert _snapshot(workdir) == (files, dirs)   # nothing quarantined, moved or written
  # Naming another step reads it.
  assert export_hf.main(["--checkpoint", workdir, "--step", "0", "--out", out]) == 0


def test_read_workdir_shards_the_params_on_a_mesh(demo_workdir, num_devices):
  from egpo_jax.models import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=2, data=-1))
  step, params, extra, _, exp = loading.read_workdir(demo_workdir, mesh=mesh)
  _, one, _, _, _ = loading.read_workdir(demo_workdir)
  assert step == 2 and extra["iteration"] == 2 and "_integrity" not in extra
  want = sharding.param_shardings(params, mesh)
  for got, spec, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want),
                            jax.tree.leaves(one)):
    assert got.sharding == spec
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert any(len(x.sharding.device_set) == num_devices for x in jax.tree.leaves(params))
  assert jax.tree.structure(params) == jax.tree.structure(
      sharding.abstract_params(exp.model_config))
