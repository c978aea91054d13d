"""experiments.compare on hand-written runs: which runs it leaves out and why, the
panels it drops, the before-RL validation point, the title clear of the panels, and
its inputs left unchanged."""

import hashlib
import json
import os

import pytest

from egpo_jax.evaluation import plots
from experiments import compare


def _write_run(root, name, *, evaluated):
  path = root / name
  path.mkdir()
  rows = [{"step": s, "accuracy": 0.1 * s, "reward": 0.1 * s, "grad_norm": 1.0,
           **({"val_accuracy": 0.2 * s} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "summary.json").write_text(json.dumps(
      {"eval_before_rl": {"accuracy": 0.05, "auroc": None, "auroc_undefined_reason": "x"}}))
  (path / "config.json").write_text(json.dumps({"algo": {"advantage": "grpo"}}))
  if evaluated:
    bench = {"num_problems": 2, "pass@k": {"1": 0.5}, "maj@k": {"1": 0.5},
             "calibration": {"ece": 0.1}}
    ev = path / "eval" / "step_4"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text(json.dumps({"benchmarks": {"synthetic": bench}}))
  return str(path)


def _hashes(root):
  return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, names in os.walk(root) for f in names}


def test_compare_names_left_out_runs_and_drops_flat_and_repeated_panels(tmp_path, capsys):
  runs = tmp_path / "runs"
  runs.mkdir()
  a = _write_run(runs, "a", evaluated=True)
  b = _write_run(runs, "b", evaluated=False)
  before = _hashes(runs)
  out = str(tmp_path / "report")
  assert compare.main([a, b, "--out", out]) == 0
  assert _hashes(runs) == before   # read-only: nothing written next to the runs
  err = capsys.readouterr().err
  assert "b: left out of the evaluation table and figures (no results.json" in err
  with open(os.path.join(out, "report.md")) as f:
    md = f.read()
  assert "## Left out" in md and f"--checkpoint={b}" in md
  with open(os.path.join(out, "comparison.json")) as f:
    got = json.load(f)
  assert got["curves_left_out"] == {"reward": "same values as accuracy",
                                    "grad_norm": "constant 1.0"}
  assert len(got["left_out"]) == 1


def test_before_rl_evaluation_is_the_validation_point_at_iteration_0(tmp_path):
  run = compare.load_run(_write_run(tmp_path, "a", evaluated=False))
  rows = compare.curve_rows(run)
  assert rows[0] == {"step": 0, "val_accuracy": 0.05}   # None and strings left out
  assert rows[1:] == run["rows"]


def test_the_title_does_not_overlap_a_panel(tmp_path, monkeypatch):
  figures = []   # the figure as saved (laid out), kept open by a no-op close
  monkeypatch.setattr(plots._pyplot(), "close", figures.append)   # pylint: disable=protected-access
  rows = [{"step": s, **{f"k{i}": s * (i + 1) for i in range(5)}} for s in range(3)]
  plots.overlay_curves({"run": rows}, [f"k{i}" for i in range(5)], str(tmp_path / "c.png"),
                       title="training curves")
  (fig,) = figures
  renderer = fig.canvas.get_renderer()
  fig.canvas.draw()
  title = fig._suptitle.get_window_extent(renderer)   # pylint: disable=protected-access
  for ax in fig.axes:
    if ax.axison:
      box = ax.get_tightbbox(renderer)
      assert title.y0 >= box.y1 or not title.overlaps(box), ax.get_title()
  monkeypatch.undo()
  plots._pyplot().close(fig)   # pylint: disable=protected-access


