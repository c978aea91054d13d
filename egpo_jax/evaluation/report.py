"""Markdown tables of evaluation results (and the table helper `experiments.compare` uses),
and the plain-text before/after-RL table a training run prints (`before_after_table`).

pass@k and maj@k are printed in percent, like the paper's tables; an undefined metric
prints as "n/a" and its reason is listed under the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CAL_COLUMNS = (("ece", "ECE"), ("brier", "Brier"), ("auroc", "AUROC"),
               ("mean_entropy_correct", "H~ correct"), ("mean_entropy_wrong", "H~ wrong"),
               ("entropy_gap", "gap"), ("overconfident_failure_frac", "overconf. fail."))


def fmt(value: Any, *, percent: bool = False, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool) or isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{100 * value:.1f}" if percent else f"{value:.{digits}f}"
  return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _reasons(name: str, cal: Mapping[str, Any] | None, where: str) -> list[str]:
  if not cal:
    return []
  return [f"- {name}, {where} {k[:-len('_undefined_reason')]}: {v}"
          for k, v in cal.items() if k.endswith("_undefined_reason")]


def results_markdown(results: Mapping[str, Any], *, figures: Mapping[str, Sequence[str]] = (),
                     brief: bool = False) -> str:
  """The evaluation as Markdown: a main table, calibration, breakdowns, notes.

  brief: only the main table (what the command line prints).
  """
  s, benches = results["settings"], results["benchmarks"]
  ks = [str(k) for k in s["ks"] if k <= s["num_samples"]]
  kmax = ks[-1] if ks else "1"
  model = results.get("model", {})
  out = [f"# Evaluation: {model.get('path', '')}", ""]
  if model:
    out.append("Model: " + ", ".join(f"{k}={v}" for k, v in model.items() if k != "path"))
  out.append(f"Sampling: {s['num_samples']} samples, temperature {s['temperature']}, top-p "
             f"{s['top_p']}, top-k {s['top_k']}, max {s['max_new_tokens']} new tokens, "
             f"prompts <= {s['max_prompt_len']} tokens, seed {s['seed']}, template "
             f"{s['template']} (chat={s['chat']}).")
  out.append("")
  header = (["benchmark", "problems"] + [f"pass@{k}" for k in ks] + [f"maj@{kmax}"] +
            ["mean len", "trunc. %", "no answer %"] + [c for _, c in CAL_COLUMNS])
  rows, notes = [], []
  for name, b in benches.items():
    if "pass@k" not in b:
      rows.append([name, 0] + ["n/a"] * (len(header) - 2))
      notes.append(f"- {name}: {b.get('undefined_reason', 'not evaluated')}")
      continue
    cal = b["calibration"]
    rows.append([name, b["num_problems"]] + [fmt(b["pass@k"].get(k), percent=True) for k in ks]
                + [fmt(b["maj@k"].get(kmax), percent=True),
                   fmt(b["response_length"]["mean"], digits=1),
                   fmt(b["truncation_rate"], percent=True), fmt(b["no_answer_rate"], percent=True)]
                + [fmt(cal.get(k)) for k, _ in CAL_COLUMNS])
    notes += _reasons(name, cal, "whole response:")
  out += ["## Accuracy and calibration (confidence = exp(-H~) of the whole response)", "",
          table(header, rows), ""]
  if brief:
    return "\n".join(out)

  seg_rows = []
  for name, b in benches.items():
    seg = b.get("answer_segment")
    if not seg:
      continue
    if "calibration" in seg:
      seg_rows.append([name, seg["fallbacks"]] +
                      [fmt(seg["calibration"].get(k)) for k, _ in CAL_COLUMNS])
      notes += _reasons(name, seg["calibration"], "answer segment:")
    else:
      seg_rows.append([name, seg["fallbacks"]] + ["n/a"] * len(CAL_COLUMNS))
      notes.append(f"- {name}, answer segment: {seg['undefined_reason']}")
  if seg_rows:
    out += [f"## Answer-segment calibration (tokens after {s['segment_delimiter']!r}; "
            "responses without it fall back to the whole response)", "",
            table(["benchmark", "fallbacks"] + [c for _, c in CAL_COLUMNS], seg_rows), ""]

  for name, b in benches.items():
    for field in ("subject", "level"):
      groups = b.get(f"by_{field}")
      if not groups or len(groups) < 2:
        continue
      first = next(iter(groups.values()))
      keys = [k for k in first if k.startswith(("pass@", "maj@")) and k != "pass@1"]
      out += [f"### {name} by {field}", "",
              table([field, "problems", "pass@1"] + keys + ["AUROC", "gap"],
                    [[g, v["num_problems"], fmt(v["pass@1"], percent=True)] +
                     [fmt(v[k], percent=True) for k in keys] +
                     [fmt(v["auroc"]), fmt(v["entropy_gap"])] for g, v in groups.items()]),
              ""]

  skipped = [(n, b["skipped"]) for n, b in benches.items() if b["skipped"]["count"]]
  if skipped:
    out += ["## Skipped prompts", ""]
    for n, sk in skipped:
      reasons = "; ".join(f"{i}: {r}" for i, r in sk["records"][:5])
      more = " ..." if sk["count"] > 5 else ""
      out.append(f"- {n}: {sk['count']} of {sk['scanned']} scanned ({reasons}{more})")
    out.append("")
  if notes:
    out += ["## Undefined metrics", ""] + notes + [""]
  if figures:
    out += ["## Figures", ""]
    for name, paths in figures.items():
      out.append(f"- {name}: " + ", ".join(f"[{p}]({p})" for p in paths))
    out.append("")
  return "\n".join(out)


SUMMARY_ROWS = (("accuracy", "accuracy (sampled, pass@1)"), ("auroc", "AUROC conf. -> correct"),
                ("ece", "ECE (equal-mass bins)"),
                ("mean_entropy_correct", "entropy proxy, correct"),
                ("mean_entropy_wrong", "entropy proxy, wrong"),
                ("entropy_gap", "entropy gap (wrong - correct)"),
                ("response_length", "mean response length"))


def before_after_table(summary: Mapping[str, Any]) -> str:
  """The table `experiments.main` prints at the end of a training run (its summary.json).

  A metric the evaluation could not define (e.g. AUROC when every response was right)
  prints "undefined"; an evaluation that did not run prints "not run", with a note.
  """
  b, a = summary["eval_before_rl"], summary["eval_after_rl"]

  def cell(d, k):
    if not d:
      return "not run"
    if d.get(k) is None:
      return "undefined" if k in d else "-"
    return f"{d[k]:.4f}"

  lines = [f"{'metric':32s} {'before RL':>12s} {'after RL':>12s}"]
  for k, name in SUMMARY_ROWS:
    lines.append(f"{name:32s} {cell(b, k):>12s} {cell(a, k):>12s}")
  if not b and not a:
    lines.append("no evaluation ran: a host-verified task evaluates on train.eval_set "
                 "(a benchmark name or a JSONL of held-out problems)")
  spi = summary.get("median_seconds_per_iteration")
  if spi:
    lines.append(f"median seconds per RL iteration: {spi:.3f}")
  lines.append(f"updates skipped as non-finite: {summary['nonfinite_skipped']}")
  return "\n".join(lines)
