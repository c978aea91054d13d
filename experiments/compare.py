"""Side-by-side report of two or more runs (e.g. GRPO vs EGPO): tables and overlaid plots.

    python -m experiments.compare workdir/grpo workdir/egpo --out=report/
    python -m experiments.compare workdir/grpo workdir/egpo eval/qwen_base --labels=GRPO,EGPO,base

Each argument is a training workdir (metrics.jsonl, config.json, summary.json, and the
newest eval/step_<N>/results.json that `experiments.evaluate` wrote there, if any), an
evaluation folder holding results.json, or a results.json file.

Writes to --out: report.md (a training table and an evaluation table, runs side by side),
curves.png (training curves overlaid, validation metrics "val_*" included, each run's
before-RL evaluation from summary.json drawn as the validation point at iteration 0;
panels that are flat or repeat an earlier panel are left out and listed),
eval_pass1.png and eval_auroc.png (per benchmark and run), reliability.png (reliability
diagrams overlaid per benchmark) and comparison.json (the numbers of the tables).
A run without training metrics or without evaluation results is left out of those
tables and figures, and report.md and the output say which and why. Nothing is written
outside --out.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
from typing import Any

from absl import flags

from experiments import cli

CURVES = ("accuracy", "reward", "entropy_gap", "mean_entropy_correct", "mean_entropy_wrong",
          "frac_all_wrong", "frac_nsr_only_adv", "mean_weight_correct", "mean_weight_wrong",
          "response_length", "clipfrac_high", "grad_norm")
VALIDATION_PREFIXES = ("val_", "val/")
EVAL_COLUMNS = (("pass@1", "pass@1"), ("pass@max", "pass@k"), ("maj@max", "maj@k"),
                ("ece", "ECE"), ("brier", "Brier"), ("auroc", "AUROC"),
                ("mean_entropy_correct", "H~ correct"), ("mean_entropy_wrong", "H~ wrong"),
                ("entropy_gap", "gap"), ("overconfident_failure_frac", "overconf. fail."))

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", "report", "output folder", flag_values=FLAGS)
flags.DEFINE_list("labels", [], "comma-separated run labels, one per run", flag_values=FLAGS)
flags.DEFINE_list("keys", list(CURVES), "training metrics to overlay (val_* metrics are "
                  "added)", flag_values=FLAGS)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut off by a killed run
      if isinstance(row, dict):
        rows.append(row)
  return rows


def _newest_eval(workdir: str) -> str | None:
  found = []
  for path in glob.glob(os.path.join(workdir, "eval", "*", "results.json")):
    m = re.search(r"step_(\d+)$", os.path.dirname(path))
    found.append((int(m.group(1)) if m else -1, os.path.getmtime(path), path))
  return max(found)[2] if found else None


def load_run(path: str, label: str | None = None) -> dict[str, Any]:
  """What a run left behind: {"label", "path", "rows", "config", "summary", "eval"}."""
  path = os.path.abspath(path)
  run: dict[str, Any] = {"path": path, "rows": [], "config": None, "summary": None,
                         "eval": None, "eval_path": None}
  if os.path.isfile(path) and path.endswith(".json"):
    run["eval_path"] = path
  elif os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
      run["rows"] = _read_jsonl(os.path.join(path, "metrics.jsonl"))
    for key, name in (("config", "config.json"), ("summary", "summary.json")):
      if os.path.isfile(os.path.join(path, name)):
        run[key] = _read_json(os.path.join(path, name))
    if os.path.isfile(os.path.join(path, "results.json")):
      run["eval_path"] = os.path.join(path, "results.json")
    else:
      run["eval_path"] = _newest_eval(path)
  else:
    raise FileNotFoundError(f"{path}: not a workdir, an evaluation folder or a results.json")
  if run["eval_path"]:
    run["eval"] = _read_json(run["eval_path"])
  if not run["rows"] and run["eval"] is None:
    raise FileNotFoundError(f"{path}: found neither metrics.jsonl nor evaluation results "
                            "(run experiments.evaluate on it first)")
  algo = (run["config"] or {}).get("algo", {})
  if algo:  # The calibration variant only means something for EGPO.
    run["algo"] = (f"egpo/{algo.get('variant')}" if algo.get("advantage") == "egpo"
                   else str(algo.get("advantage")))
  else:
    run["algo"] = str(((run["eval"] or {}).get("model") or {}).get("algo") or "-")
  run["label"] = label or os.path.basename(path.rstrip("/"))
  return run


def curve_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
  """The run's metric rows, preceded by its before-RL evaluation as the validation
  point at iteration 0 (the trainer validates only after RL iterations)."""
  before = (run["summary"] or {}).get("eval_before_rl") or {}
  point = {f"val_{k}": v for k, v in before.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
  if not run["rows"] or not point:
    return list(run["rows"])
  return [{"step": 0, **point}] + list(run["rows"])


def left_out(runs: list[dict[str, Any]]) -> list[str]:
  """One line per run and part of the report it is missing from, with the reason."""
  lines = []
  for r in runs:
    if not r["rows"]:
      lines.append(f"{r['label']}: left out of the training table and curves (no "
                   f"metrics.jsonl in {r['path']})")
    if r["eval"] is None:
      lines.append(f"{r['label']}: left out of the evaluation table and figures (no "
                   f"results.json; run python -m experiments.evaluate --checkpoint={r['path']})")
    elif not any("pass@k" in b for b in (r["eval"].get("benchmarks") or {}).values()):
      lines.append(f"{r['label']}: left out of the evaluation table ({r['eval_path']} has "
                   "no benchmark with results)")
  return lines


def _tail_mean(rows: list[dict[str, Any]], key: str, n: int = 5) -> float | None:
  values = [r[key] for r in rows if isinstance(r.get(key), (int, float))][-n:]
  values = [v for v in values if math.isfinite(v)]
  return sum(values) / len(values) if values else None


def training_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for r in runs:
    rows, summary = r["rows"], r["summary"] or {}
    before, after = summary.get("eval_before_rl", {}), summary.get("eval_after_rl", {})
    out.append({
        "run": r["label"], "algo": r["algo"],
        "iterations": max((row.get("step", 0) for row in rows), default=None),
        "accuracy (last 5)": _tail_mean(rows, "accuracy"),
        "entropy_gap (last 5)": _tail_mean(rows, "entropy_gap"),
        "response_length (last 5)": _tail_mean(rows, "response_length"),
        "eval accuracy before RL": before.get("accuracy"),
        "eval accuracy after RL": after.get("accuracy"),
        "eval entropy gap before RL": before.get("entropy_gap"),
        "eval entropy gap after RL": after.get("entropy_gap"),
    })
  return out


def evaluation_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (benchmark, run), benchmarks in first-seen order, runs side by side."""
  order: list[str] = []
  for r in runs:
    for b in ((r["eval"] or {}).get("benchmarks") or {}):
      if b not in order:
        order.append(b)
  out = []
  for bench in order:
    for r in runs:
      b = ((r["eval"] or {}).get("benchmarks") or {}).get(bench)
      if not b or "pass@k" not in b:
        continue
      cal = b["calibration"]
      kmax = max(b["pass@k"], key=int)
      row = {"benchmark": bench, "run": r["label"], "problems": b["num_problems"],
             "k": int(kmax), "pass@1": b["pass@k"].get("1"), "pass@max": b["pass@k"][kmax],
             "maj@max": b["maj@k"].get(kmax)}
      row.update({k: cal.get(k) for k, _ in EVAL_COLUMNS if k in cal})
      out.append(row)
  return out


def _load_runs(argv: list[str] | None) -> list[dict[str, Any]]:
  """The runs the command line names, with unique labels; raises cli.Exit."""
  paths = cli.parse(FLAGS, argv, doc=__doc__)
  if len(paths) < 2:
    raise cli.error("give at least two runs to compare (workdirs, evaluation folders or "
                    "results.json files)")
  labels = [s.strip() for s in FLAGS.labels]
  if labels and len(labels) != len(paths):
    raise cli.error(f"--labels has {len(labels)} names for {len(paths)} runs")
  try:
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
  except (FileNotFoundError, ValueError) as e:
    raise cli.error(str(e)) from None
  seen: dict[str, int] = {}
  for r in runs:  # Unique labels, so that legends and tables tell runs apart.
    seen[r["label"]] = seen.get(r["label"], 0) + 1
    if seen[r["label"]] > 1:
      r["label"] = f"{r['label']} ({seen[r['label']]})"
  return runs


def _figures(runs, eval_rows, curves, keys, out_dir: str) -> dict[str, str | None]:
  """The overlaid curves and the per-benchmark bars and reliability diagrams."""
  from egpo_jax.evaluation import plots  # pylint: disable=g-import-not-at-top

  def per_run(key):
    return {r["label"]: {e["benchmark"]: e.get(key) for e in eval_rows
                         if e["run"] == r["label"]} for r in runs}
  return {
      "curves": plots.overlay_curves(curves, keys, os.path.join(out_dir, "curves.png"),
                                     title="training curves"),
      "pass@1": plots.grouped_bars(per_run("pass@1"), os.path.join(out_dir, "eval_pass1.png"),
                                   title="pass@1", ylabel="pass@1"),
      "AUROC": plots.grouped_bars(per_run("auroc"), os.path.join(out_dir, "eval_auroc.png"),
                                  title="AUROC of exp(-H~) for correctness", ylabel="AUROC"),
      "reliability": plots.overlay_reliability(
          {r["label"]: {b: v["reliability"] for b, v in r["eval"]["benchmarks"].items()
                        if "reliability" in v} for r in runs if r["eval"]},
          os.path.join(out_dir, "reliability.png")),
  }


def _markdown(runs, missing, train_rows, eval_rows, made, dropped_curves) -> list[str]:
  """report.md's lines: the runs, what was left out, the two tables, the figures."""
  from egpo_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  md = ["# Run comparison", ""]
  md += [f"- {r['label']}: {r['path']} (algo {r['algo']}"
         + (f"; evaluation {r['eval_path']}" if r["eval_path"] else "") + ")" for r in runs]
  md.append("")
  if missing:
    md += ["## Left out", ""] + [f"- {line}" for line in missing] + [""]
  if any(r["rows"] for r in runs):
    header = list(train_rows[0])
    md += ["## Training", "",
           report.table(header, [[report.fmt(row[h]) for h in header] for row in train_rows]),
           ""]
  if eval_rows:
    header = ["benchmark", "run", "problems"] + [name for _, name in EVAL_COLUMNS]
    body = [[e["benchmark"], e["run"], e["problems"]] +
            [report.fmt(e.get(k), percent=k.startswith(("pass", "maj")))
             for k, _ in EVAL_COLUMNS] for e in eval_rows]
    md += ["## Evaluation (pass@k and maj@k in %, k = samples per problem; calibration of "
           "exp(-H~))", "", report.table(header, body), ""]
  else:
    md += ["No run has evaluation results; run `python -m experiments.evaluate "
           "--checkpoint=WORKDIR` first.", ""]
  if made:
    md += ["## Figures", ""] + [f"- {name}: ![{name}]({p})" for name, p in made.items()] + [""]
  if dropped_curves:
    md += ["Curves without a panel: " + "; ".join(f"{k} ({why})" for k, why in
                                                   dropped_curves.items()), ""]
  return md


def main(argv: list[str] | None = None) -> int:
  """Runs are the positional arguments (workdirs, evaluation folders or results.json)."""
  try:
    runs = _load_runs(argv)
  except cli.Exit as done:
    return done.code
  from egpo_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  out_dir = FLAGS.out
  os.makedirs(out_dir, exist_ok=True)
  train_rows = training_rows(runs)
  eval_rows = evaluation_rows(runs)
  curves = {r["label"]: curve_rows(r) for r in runs if r["rows"]}
  keys = [k for k in FLAGS.keys if k]
  keys += sorted({k for rows in curves.values() for row in rows for k in row
                  if k.startswith(VALIDATION_PREFIXES) and k not in keys})
  keys, dropped_curves = plots.informative_keys(curves, keys)
  missing = left_out(runs)
  for line in missing:
    print(f"note: {line}", file=sys.stderr)
  figures = _figures(runs, eval_rows, curves, keys, out_dir)
  made = {name: os.path.basename(p) for name, p in figures.items() if p}
  md = _markdown(runs, missing, train_rows, eval_rows, made, dropped_curves)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(out_dir, "comparison.json"), "w") as f:
    json.dump({"runs": [{k: r[k] for k in ("label", "path", "algo", "eval_path")} for r in runs],
               "training": train_rows, "evaluation": eval_rows, "figures": made,
               "left_out": missing, "curves_left_out": dropped_curves}, f, indent=2)
  print("\n".join(md))
  print(f"report: {os.path.abspath(out_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
