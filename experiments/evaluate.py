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

import json
import os
import sys
import types
from typing import Any

from absl import flags

from egpo_jax.evaluation import benchmarks as benchmarks_lib
from experiments import cli

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

FLAGS = flags.FlagValues()
_flag = dict(flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "training workdir (or its checkpoints/ or a step "
                    "folder), or a Hugging Face folder", **_flag)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "workdir checkpoint step (default: newest)", **_flag)
flags.DEFINE_string("benchmarks", ",".join(benchmarks_lib.PAPER_BENCHMARKS),
                    f"comma-separated subset of {','.join(benchmarks_lib.BENCHMARKS)}", **_flag)
flags.DEFINE_integer("num_samples", 8, "responses per problem", **_flag)
flags.DEFINE_float("temperature", 0.6, "sampling temperature", **_flag)
flags.DEFINE_float("top_p", 0.95, "nucleus sampling mass", **_flag)
flags.DEFINE_integer("top_k", 20, "top-k sampling (0 = off)", **_flag)
flags.DEFINE_integer("max_new_tokens", 3072, "response length limit", **_flag)
flags.DEFINE_integer("max_prompt_len", 1024, "longer prompts are skipped (counted and "
                     "listed in the results)", **_flag)
flags.DEFINE_integer("limit", None, "problems per benchmark", **_flag)
flags.DEFINE_integer("batch_size", 16, "prompts per sampler call", **_flag)
flags.DEFINE_integer("seed", 0, "sampling seed", **_flag)
flags.DEFINE_list("ks", ["1", "2", "4", "8"], "pass@k / maj@k budgets (comma-separated)",
                  **_flag)
flags.register_validator(
    "ks", lambda ks: bool(ks) and all(k.strip().isdigit() and int(k) >= 1 for k in ks),
    "--ks must be comma-separated positive ints", flag_values=FLAGS)
flags.DEFINE_integer("num_bins", 10, "equal-mass ECE bins", **_flag)
flags.DEFINE_string("template", "auto", "prompt template: qwen25_math | r1_distill | plain | "
                    "auto (a workdir's training template; r1_distill for R1-Distill folders; "
                    "else qwen25_math)", **_flag)
flags.DEFINE_enum("chat", "auto", ["auto", *_BOOL], "use the tokenizer's chat template: "
                  "auto | true | false", case_sensitive=False, **_flag)
flags.DEFINE_enum("add_bos", "auto", ["auto", *_BOOL], "prepend BOS to rendered prompts: "
                  "auto | true | false", case_sensitive=False, **_flag)
flags.DEFINE_string("segment_delimiter", None, "reasoning delimiter of the answer segment "
                    "(default: the workdir's, else </think>); '' to skip", **_flag)
flags.DEFINE_string("data_dir", None, "folder with <benchmark>/test.jsonl (default: "
                    "$EGPO_SHARED_DATA or ../shared/data)", **_flag)
flags.DEFINE_string("tfds_dir", None, "tfds data_dir when no local file exists", **_flag)
flags.DEFINE_integer("synthetic_difficulty", None, "synthetic task level (default: the "
                     "workdir's, else 2)", **_flag)
flags.DEFINE_integer("synthetic_seed", 0, "seed of the synthetic benchmark's problems", **_flag)
flags.DEFINE_string("dtype", "float32", "compute dtype of a Hugging Face model", **_flag)
flags.DEFINE_string("param_dtype", "float32", "parameter dtype of a Hugging Face model "
                    "(bfloat16 halves its memory)", **_flag)
flags.DEFINE_float("verify_timeout", 5.0, "seconds per response for the answer check", **_flag)
flags.DEFINE_string("out", None, "output folder", **_flag)
flags.DEFINE_bool("no_plots", False, "write no figures", **_flag)
flags.DEFINE_bool("no_save_responses", False, "write no responses_<benchmark>.jsonl", **_flag)
flags.DEFINE_bool("no_progress", False, "print no progress lines", **_flag)


def parse_args(argv: list[str] | None = None) -> types.SimpleNamespace:
  """The flags of `argv` as attributes; chat/add_bos are None for auto, ks a sorted tuple.
  Raises cli.Exit (help shown, or a bad flag reported in one line)."""
  cli.parse(FLAGS, argv, doc=__doc__)
  args = cli.namespace(FLAGS)
  args.ks = tuple(sorted({int(k) for k in args.ks}))
  for name in ("chat", "add_bos"):
    value = getattr(args, name).lower()
    setattr(args, name, None if value == "auto" else _BOOL[value])
  return args


def _defaults(args: types.SimpleNamespace, info: dict[str, Any]) -> dict[str, Any]:
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


def run(args: types.SimpleNamespace) -> tuple[dict[str, Any], str]:
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
  try:
    args = parse_args(argv)
  except cli.Exit as done:
    return done.code
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
