"""experiments.main at start-up: every field of the domain table out of its domain exits 2
with one line naming it, writing nothing; the documented bad inputs print exactly the
documented line through the real command line."""

import os
import subprocess
import sys

import ml_collections
import pytest

from egpo_jax.training import config_domains as domains
from experiments import main as main_lib
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _with_value(c: ml_collections.ConfigDict, name: str, value) -> ml_collections.ConfigDict:
  d = c.to_dict()
  *path, leaf = name.split(".")
  node = d
  for p in path:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("name", sorted(domains.BY_NAME))
def test_every_field_out_of_its_domain_exits_2_naming_it_and_writes_nothing(name, tmp_path,
                                                                             capsys):
  workdir = tmp_path / "run"
  bad = domains.BY_NAME[name].domain.bad
  code = main_lib.run(_with_value(default.get_config(), name, bad), str(workdir))
  out, err = capsys.readouterr()
  assert code == main_lib.USAGE_ERROR == 2
  assert err.startswith(f"error: config.{name}=") and err.count("\n") == 1, err
  assert "Traceback" not in err and not out
  assert not workdir.exists()


def test_verbose_run_adds_the_traceback(tmp_path, capsys):
  c = _with_value(default.get_config(), "train.keep_checkpoints", 0)
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
