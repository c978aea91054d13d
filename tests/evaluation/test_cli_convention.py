"""One command-line convention across experiments/ (experiments/cli.py): absl flags with
underscores; a bad flag is one line and exit 2 before anything is written; --help exits 0;
old spellings still work with a warning that names the new one."""

import ast
import os

import pytest

from experiments import cli, compare, evaluate, export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_line_error(capsys, fn, argv):
  capsys.readouterr()
  assert fn(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_no_tool_uses_argparse():
  for name in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
    if name.endswith(".py"):
      with open(os.path.join(ROOT, "experiments", name)) as f:
        tree = ast.parse(f.read())
      modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
      assert "argparse" not in modules, name


def test_old_export_spellings_warn_and_name_the_new_one(capsys):
  rest = cli.parse(export_hf.FLAGS, ["--checkpoint", "c", "--out=o", "--byte-special-tokens",
                                     "<a>,<b>", "--max-shard-gb=2", "--hf-config", "x"],
                   doc="", renamed=export_hf.RENAMED)
  assert rest == []
  assert export_hf.FLAGS.byte_special_tokens == "<a>,<b>"
  assert export_hf.FLAGS.max_shard_gb == 2.0 and export_hf.FLAGS.hf_config == "x"
  err = capsys.readouterr().err.splitlines()
  assert err == ["warning: --byte-special-tokens is deprecated; use --byte_special_tokens",
                 "warning: --max-shard-gb is deprecated; use --max_shard_gb",
                 "warning: --hf-config is deprecated; use --hf_config"]
  cli.parse(export_hf.FLAGS, ["--checkpoint=c", "--out=o", "--byte_special_tokens=<a>"],
            doc="", renamed=export_hf.RENAMED)
  assert capsys.readouterr().err == ""   # the new spelling: no warning
  assert export_hf.FLAGS.max_shard_gb == 5.0   # a second parse starts from the defaults


def test_bad_flags_are_one_line_and_exit_2_writing_nothing(capsys, tmp_path):
  out = str(tmp_path / "o")
  assert "Unknown command line flag 'bogus'" in _one_line_error(
      capsys, export_hf.main, ["--checkpoint", "c", "--out", out, "--bogus=1"])
  assert "--out" in _one_line_error(capsys, export_hf.main, ["--checkpoint", "c"])
  assert "At most one of (model, hf_config)" in _one_line_error(capsys, export_hf.main, [
      "--checkpoint", "c", "--out", out, "--model", "tiny", "--hf_config", "x"])
  assert "--dtype" in _one_line_error(capsys, export_hf.main, [
      "--checkpoint", "c", "--out", out, "--dtype", "float8"])
  assert "--ks must be comma-separated positive ints" in _one_line_error(
      capsys, evaluate.main, ["--checkpoint", "c", "--ks", "0,2", "--out", out])
  assert "--chat" in _one_line_error(capsys, evaluate.main,
                                     ["--checkpoint", "c", "--chat", "maybe", "--out", out])
  assert "--checkpoint" in _one_line_error(capsys, evaluate.main, ["--out", out])
  assert "at least two runs" in _one_line_error(capsys, compare.main, [out, "--out", out])
  assert "--labels has 1 names for 2 runs" in _one_line_error(
      capsys, compare.main, [out, out, "--labels=a", "--out", out])
  assert not os.path.exists(out)


@pytest.mark.parametrize("tool", [evaluate, export_hf, compare])
def test_help_lists_the_flags_and_exits_0(tool, capsys):
  assert tool.main(["--help"]) == 0
  printed = capsys.readouterr().out
  assert "--out" in printed and printed.startswith(tool.__doc__.strip().splitlines()[0])


def test_evaluate_values():
  args = evaluate.parse_args(["--checkpoint", "a", "--ks=8,1,2,2", "--chat", "TRUE",
                              "--limit", "3", "--no_plots"])
  assert args.ks == (1, 2, 8) and args.chat is True and args.add_bos is None
  assert args.limit == 3 and args.no_plots and args.checkpoint == "a"
  args = evaluate.parse_args(["--checkpoint=b", "--add_bos=no"])
  assert args.limit is None and not args.no_plots and args.ks == (1, 2, 4, 8)
  assert args.add_bos is False and args.chat is None
