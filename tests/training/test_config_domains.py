"""The config domain table: every field refused out of its domain (by name), also through
experiments.main (exit 2, one line, nothing written), the docs generated from the same
table (and their "What the user sees" lines through the real command line), choices read
from their registries, unknown fields."""

import os
import subprocess
import sys

import ml_collections
import pytest

from egpo_jax.core import registry
from egpo_jax.training import config as config_lib
from egpo_jax.training import config_domains as domains
from experiments import main as main_lib
from experiments.configs import default, paper, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def with_value(c: ml_collections.ConfigDict, name: str, value) -> ml_collections.ConfigDict:
  """`c` with field `name` set to `value` of any type (as a user's config file could)."""
  d = c.to_dict()
  *path, leaf = name.split(".")
  node = d
  for p in path:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


def test_docs_config_md_is_generated_from_the_table():
  with open(os.path.join(ROOT, "docs", "CONFIG.md")) as f:
    assert f.read() == domains.markdown(), (
        "docs/CONFIG.md is stale: python -m egpo_jax.training.config_domains > docs/CONFIG.md")


def test_the_table_covers_exactly_the_default_config_and_its_defaults():
  leaves = config_lib._leaves(default.get_config())  # pylint: disable=protected-access
  assert set(leaves) == set(domains.BY_NAME)
  for name, value in leaves.items():
    assert domains.BY_NAME[name].default == value, name
    assert domains.BY_NAME[name].domain.ok(value), name


@pytest.mark.parametrize("name", sorted(domains.BY_NAME))
def test_every_field_refuses_a_value_outside_its_domain(name):
  field = domains.BY_NAME[name]
  assert not field.domain.ok(field.domain.bad)
  with pytest.raises(config_lib.ConfigError, match=f"^config.{name}="):
    config_lib.validate(with_value(tiny.get_config(), name, field.domain.bad))


@pytest.mark.parametrize("name,value,why", [
    ("train.keep_checkpoints", 0, "delete every checkpoint"),
    ("rollout.temperature", 0.0, "greedy"),
    ("loss.dual_clip", 0.5, "0 \\(off\\) or a value > 1"),
    ("loss.dual_clip", 1.0, "0 \\(off\\) or a value > 1"),
    ("algo.variant", "c9", "EGPO variant"),
    ("optim.schedule", "linear", "learning-rate schedule"),
    ("model.dtype", "float64", "compute dtype"),
    ("model.name", "qwen3-8b", "named config"),
    ("task.on_bad_record", "ignore", "'skip'"),
    ("rollout.stop_strings", ("</answer>", ""), "non-empty strings"),
])
def test_values_that_lose_work_or_make_training_meaningless_are_refused(name, value, why):
  with pytest.raises(config_lib.ConfigError, match=why):
    config_lib.validate(with_value(tiny.get_config(), name, value))


def test_accepted_edge_values():
  for name, value in (("loss.dual_clip", 0.0), ("loss.dual_clip", 3.0),
                      ("algo.variant", "C3"), ("algo.variant", "lock_one"),
                      ("model.name", "tiny"), ("rollout.stop_strings", ("</answer>",)),
                      ("task.on_bad_record", "raise"), ("algo.edge_clamp", ())):
    config_lib.validate(with_value(tiny.get_config(), name, value))


def test_rules_across_fields():
  c = tiny.get_config()
  for overrides, field in (
      ({"task.name": "jsonl", "warmup.steps": 0, "task.reward": "math"}, "task.train_file"),
      ({"task.max_prompt_len": 4}, "task.max_prompt_len"),
      ({"rollout.max_new_tokens": 6}, "rollout.max_new_tokens"),
      ({"model.preset": "hf"}, "model.path"),
      ({"model.name": "small"}, "model.name"),
      ({"ppo.micro_batches": 3}, "ppo.minibatches/micro_batches"),
      ({"distributed.num_processes": 2, "distributed.process_id": 2},
       "distributed.process_id")):
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}="):
      config_lib.validate(config_lib.with_overrides(c, overrides))


def test_unknown_fields_are_refused_with_the_nearest_name():
  c = tiny.get_config()
  c.train.keep_checkpoint = 3
  with pytest.raises(config_lib.ConfigError, match="did you mean train.keep_checkpoints"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match="did you mean optim.lr"):
    config_lib.with_overrides(tiny.get_config(), {"optim.lrr": 1.0})


def test_optional_fields_may_be_missing_and_take_their_defaults():
  d = tiny.get_config().to_dict()
  del d["task"]["on_bad_record"], d["rollout"]["stop_strings"], d["mesh"]
  full = config_lib.checked(ml_collections.ConfigDict(d))
  assert full.task.on_bad_record == "skip" and tuple(full.rollout.stop_strings) == ()
  assert (full.mesh.data, full.mesh.fsdp, full.mesh.tensor) == (1, -1, 1)
  del d["train"]["iterations"]
  with pytest.raises(config_lib.ConfigError, match="config.train.iterations='<missing>'"):
    config_lib.validate(ml_collections.ConfigDict(d))


def test_choices_come_from_the_registry():
  name = "test_only_estimator"
  c = with_value(tiny.get_config(), "algo.advantage", name)
  with pytest.raises(config_lib.ConfigError, match="algo.advantage"):
    config_lib.validate(c)
  registry.advantage_estimators.register(name)(lambda rewards_BxG, **kw: rewards_BxG)
  try:
    config_lib.validate(c)
    assert repr(name) in domains.BY_NAME["algo.advantage"].domain.text
  finally:
    registry.advantage_estimators._table.pop(name)  # pylint: disable=protected-access


def test_paper_configs_validate_once_their_inputs_are_given(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"problem": "1+1", "answer": "2"}\n')
  for algorithm in paper.ALGORITHMS:
    for backbone in paper.BACKBONES:
      c = paper.paper_config(algorithm, backbone)
      with pytest.raises(config_lib.ConfigError, match="config.task.train_file"):
        config_lib.validate(c)
      config_lib.validate(config_lib.with_overrides(c, {"task.train_file": str(data)}))


def test_model_name_is_checked_against_the_checkpoint_and_gives_the_shapes_without_one(
    tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from egpo_jax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import experiment  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "config.json", "w") as f:
    json.dump(model_config_lib.to_hf_dict(model_config_lib.get_config("tiny")), f)
  c = config_lib.with_overrides(tiny.get_config(), {"model.preset": "hf",
                                                    "model.path": str(tmp_path)})
  config_lib.validate(config_lib.with_overrides(c, {"model.name": "tiny"}))
  config_lib.validate(c)   # no name: nothing to check against
  with pytest.raises(config_lib.ConfigError, match="model.name='small': .*hidden_size 64 != 512"):
    config_lib.validate(config_lib.with_overrides(c, {"model.name": "small"}))
  # No checkpoint folder: model.name gives the shapes (a dry run with random weights).
  dry = config_lib.with_overrides(c, {"model.path": "", "model.name": "small"})
  assert experiment.build(dry).model_config == model_config_lib.get_config("small")


@pytest.mark.parametrize("name", sorted(domains.BY_NAME))
def test_every_field_out_of_its_domain_exits_2_naming_it_and_writes_nothing(name, tmp_path,
                                                                             capsys):
  workdir = tmp_path / "run"
  bad = domains.BY_NAME[name].domain.bad
  code = main_lib.run(with_value(default.get_config(), name, bad), str(workdir))
  out, err = capsys.readouterr()
  assert code == main_lib.USAGE_ERROR == 2
  assert err.startswith(f"error: config.{name}=") and err.count("\n") == 1, err
  assert "Traceback" not in err and not out
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_exits_2(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert main_lib.run(default.get_config(), str(tmp_path / "file")) == 2
  assert capsys.readouterr().err.startswith(f"error: --workdir={tmp_path / 'file'}: ")
  assert (tmp_path / "file").read_text() == "x"


def test_verbose_run_adds_the_traceback(tmp_path, capsys):
  c = with_value(default.get_config(), "train.keep_checkpoints", 0)
  assert main_lib.run(c, str(tmp_path / "run"), verbose=True) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.splitlines()[-1].startswith("error: config.train.")


CLI_ROWS = [row for row in domains.WHAT_THE_USER_SEES if row[0].startswith("--")]


@pytest.mark.slow
@pytest.mark.parametrize("args,code,message", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_documented_bad_inputs_print_the_documented_line(args, code, message, tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "experiments.main", args,
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == code, done.stderr[-2000:]
  assert done.stderr.strip().splitlines() == [message]   # one line, no traceback
  assert not workdir.exists()


def test_a_finished_runs_config_builds_without_its_training_inputs(tmp_path):
  from egpo_jax.training import experiment  # pylint: disable=g-import-not-at-top
  c = config_lib.with_overrides(tiny.get_config(), {"task.train_file": "/gone/train.jsonl"})
  with pytest.raises(config_lib.ConfigError, match="config.task.train_file="):
    config_lib.validate(c)
  config_lib.validate(c, inputs_exist=False)
  assert experiment.build(c).model_config.hidden_size == 64
