"""Evaluates a checkpoint: accuracy (pass@k, maj@k) and calibration of its confidence.

    python -m experiments.evaluate --checkpoint=workdir/default --benchmarks=synthetic
    python -m experiments.evaluate --checkpoint=/models/Qwen2.5-Math-1.5B \\
        --benchmarks=math500,gsm8k,minerva_math,mmlu_stem,aime24,amc23 --num_samples=8
    python -m experiments.evaluate --checkpoint=workdir/default --step=0 \\
        --benchmarks=synthetic --out=eval_before_rl

--checkpoint is a training workdir (config.json + checkpoints/, e.g. the demo's
workdir/default; --step picks a checkpoint, default the newest), or a Hugging Face folder
(config.json + safetensors + tokenizer.json). The defaults are the paper's evaluation
(temperature 0.6, top-p 0.95, top-k 20, 8 samples, 3072 new tokens, prompts up to 1024
tokens); --limit evaluates the first N problems of each benchmark that fit.

The workdir is only read: a damaged checkpoint step is an error (exit 2) that names the
other steps, never skipped or moved; only the params are restored, not the optimizer.
Writes only to --out (default <workdir>/eval/step_<step>, or eval/<folder name> for a
Hugging Face folder): results.json, results.md, <benchmark>_reliability.png,
<benchmark>_entropy.png and responses_<benchmark>.jsonl (one line per response).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from egpo_jax.evaluation import benchmarks as benchmarks_lib

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _auto_bool(text: str) -> bool | None:
  key = text.strip().lower()
  if key == "auto":
    return None
  if key not in _BOOL:
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
  return _BOOL[key]


def _ks(text: str) -> tuple[int, ...]:
  try:
    ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ks must be comma-separated ints, got {text!r}") from None
  if not ks or ks[0] < 1:
    raise argparse.ArgumentTypeError(f"--ks must be positive ints, got {text!r}")
  return ks


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="training workdir (or its checkpoints/ or a step folder), or a Hugging "
                      "Face folder")
  p.add_argument("--step", type=int, default=None, help="workdir checkpoint step (default: newest)")
  p.add_argument("--benchmarks", default=",".join(benchmarks_lib.PAPER_BENCHMARKS),
                 help=f"comma-separated subset of {','.join(benchmarks_lib.BENCHMARKS)}")
  p.add_argument("--num_samples", type=int, default=8, help="responses per problem")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top_p", type=float, default=0.95)
  p.add_argument("--top_k", type=int, default=20)
  p.add_argument("--max_new_tokens", type=int, default=3072)
  p.add_argument("--max_prompt_len", type=int, default=1024,
                 help="longer prompts are skipped (counted and listed in the results)")
  p.add_argument("--limit", type=int, default=None, help="problems per benchmark")
  p.add_argument("--batch_size", type=int, default=16, help="prompts per sampler call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ks", type=_ks, default=(1, 2, 4, 8), help="pass@k / maj@k budgets")
  p.add_argument("--num_bins", type=int, default=10, help="equal-mass ECE bins")
  p.add_argument("--template", default="auto",
                 help="prompt template: qwen25_math | r1_distill | plain | auto (a workdir's "
                      "training template; r1_distill for R1-Distill folders; else qwen25_math)")
  p.add_argument("--chat", type=_auto_bool, default=None,
                 help="use the tokenizer's chat template: auto | true | false")
  p.add_argument("--add_bos", type=_auto_bool, default=None,
                 help="prepend BOS to rendered prompts: auto | true | false")
  p.add_argument("--segment_delimiter", default=None,
                 help="reasoning delimiter of the answer segment (default: the workdir's, "
                      "else </think>); '' to skip")
  p.add_argument("--data_dir", default=None,
                 help="folder with <benchmark>/test.jsonl (default: $EGPO_SHARED_DATA or "
                      "../shared/data)")
  p.add_argument("--tfds_dir", default=None, help="tfds data_dir when no local file exists")
  p.add_argument("--synthetic_difficulty", type=int, default=None,
                 help="synthetic task level (default: the workdir's, else 2)")
  p.add_argument("--synthetic_seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", help="compute dtype of a Hugging Face model")
  p.add_argument("--param_dtype", default="float32",
                 help="parameter dtype of a Hugging Face model (bfloat16 halves its memory)")
  p.add_argument("--verify_timeout", type=float, default=5.0)
  p.add_argument("--out", default=None, help="output folder")
  p.add_argument("--no_plots", action="store_true")
  p.add_argument("--no_save_responses", action="store_true")
  p.add_argument("--no_progress", action="store_true")
  return p


def _defaults(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
  """Fills the 'auto' settings from what was loaded."""
  workdir = info["kind"] == "workdir"
  template = args.template
  if template == "auto":
    if workdir:
      template = info.get("template") or "plain"
    else:
      template = "r1_distill" if "distill" in str(info.get("model", "")).lower() else "qwen25_math"
  # A workdir's model was trained on raw "<bos>problem" prompts, not a chat format.
  chat = (not workdir) if args.chat is None else args.chat
  add_bos = workdir if args.add_bos is None else args.add_bos
  delimiter = args.segment_delimiter
  if delimiter is None:
    delimiter = info.get("segment_delimiter") or "</think>"
  return {"template": template, "chat": chat, "add_bos": add_bos,
          "segment_delimiter": delimiter or None}


def default_out(info: dict[str, Any]) -> str:
  if info["kind"] == "workdir":
    return os.path.join(info["path"], "eval", f"step_{info['step']}")
  return os.path.join("eval", os.path.basename(info["path"].rstrip("/")))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
  """Loads, evaluates and writes everything; returns (results, output folder)."""
  from egpo_jax.evaluation import loading, plots, report, runner  # heavy: jax, models

  names = benchmarks_lib.parse_names(args.benchmarks)
  model = loading.load(args.checkpoint, step=args.step, dtype=args.dtype,
                       param_dtype=args.param_dtype)
  settings = runner.EvalSettings(
      num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
      top_k=args.top_k, max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
      limit=args.limit, batch_size=args.batch_size, seed=args.seed, ks=tuple(args.ks),
      num_bins=args.num_bins, verify_timeout=args.verify_timeout,
      **_defaults(args, model.info))
  settings.validate(model.config)
  difficulty = args.synthetic_difficulty
  if difficulty is None:
    difficulty = model.info.get("synthetic_difficulty", 2)
  load_kwargs = {"data_dir": args.data_dir, "tfds_dir": args.tfds_dir,
                 "synthetic_difficulty": difficulty, "synthetic_seed": args.synthetic_seed}
  out = args.out or default_out(model.info)
  os.makedirs(out, exist_ok=True)

  results = runner.evaluate(model, names, settings, load_kwargs=load_kwargs,
                            progress=not args.no_progress, keep_responses=True)
  responses = results.pop("responses")
  results = {"model": model.info, **results}
  figures: dict[str, list[str]] = {}
  for name, (prompts, resp) in responses.items():
    summary = results["benchmarks"][name]
    if not args.no_save_responses:
      with open(os.path.join(out, f"responses_{name}.jsonl"), "w") as f:
        for row in runner.response_rows(prompts, resp, settings.num_samples):
          f.write(json.dumps(row) + "\n")
    if args.no_plots or "calibration" not in summary:
      continue
    made = [plots.reliability_diagram(summary["reliability"],
                                      os.path.join(out, f"{name}_reliability.png"),
                                      title=f"{name}: reliability",
                                      ece=summary["calibration"]["ece"]),
            plots.entropy_histogram(resp.entropy, resp.correct,
                                    os.path.join(out, f"{name}_entropy.png"),
                                    title=f"{name}: H~ of correct vs wrong responses")]
    figures[name] = [os.path.basename(p) for p in made if p]
  results["figures"] = figures
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  markdown = report.results_markdown(results, figures=figures)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown + "\n")
  return results, out


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from egpo_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  done, code = checkpointing.run_tool(run, args)
  if code:
    return code
  results, out = done
  from egpo_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  print(report.results_markdown(results, brief=True))
  print(f"results: {os.path.abspath(out)} (results.json, results.md, figures, responses)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
