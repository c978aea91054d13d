"""One regime of the EGPO vs GRPO study: EGPO, GRPO and EGPO without NSR x seeds, as ONE
vmapped program (`egpo_jax.training.ablation`), then the pre-registered analysis.

    python -m experiments.study --regime=default --output_dir=study_results
    python -m experiments.study --regime=all_wrong \
        --config=experiments/configs/study.py:pilot --output_dir=/tmp/pilot

`--config.control_warmup_steps=0` runs the arms without amendment 1's control. Seeds of
one design run as ONE program: a run's values depend, through float32 rounding, on which
other runs share the vmapped program (PREREGISTRATION.md, amendment 4; RESULTS.md).

Writes <output_dir>/<regime>.json (the settings, per-seed raw values of every outcome,
the validation curves and the analysis) and <regime>.md (the tables). The design, the
measures and the tests are in notebooks/PREREGISTRATION.md; in short, per seed:

  accuracy              validation accuracy after the last iteration (PRIMARY): the mean
                        verdict of `eval_samples` samples at temperature 1 on the same
                        `eval_prompts` held-out prompts, with the same keys, for every arm
  learning_speed        area under the validation accuracy curve / iterations (trapezoid
                        over the evaluation points 0, eval_every, ..., iterations)
  entropy_gap, auroc, ece, overconfident_wrong   calibration of exp(-H~) (Eq. 5) on those
                        samples, after the last iteration
  grpo accuracy at iterations / 2   the pre-registered positive control (GRPO with half
                        the iterations; flat curves make it show nothing)
  control_warmup        amendment 1's positive control: GRPO from a warm start with
                        `control_warmup_steps` supervised steps instead of the regime's,
                        the same seeds and validation (a deficit known to be real)

AUROC and ECE also get percentile bootstrap intervals over seeds (per arm, and paired
differences to the reference), bounded to [0, 1] (`stats.bootstrap_mean_ci`).

Tests: paired over seeds (paired t, with the sign-flip permutation p alongside); the
primary family is {egpo vs grpo, egpo vs egpo_no_nsr} on accuracy, Holm at `alpha`; the
secondary outcomes form a second Holm family (exploratory).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from egpo_jax.evaluation import stats
from experiments.configs import study as study_configs

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "study.py")
# The study's own flag set: experiments.main defines --config too, and both modules may be
# imported by one process (the test suite).
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Study config (a Python file; "
                                          "':pilot' or ':tiny' picks a setting).",
                                          flag_values=FLAGS)
_REGIME = flags.DEFINE_enum("regime", None, list(study_configs.REGIMES), "The regime to run.",
                            flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "study_results",
                                  "Where <regime>.json and <regime>.md are written.",
                                  flag_values=FLAGS)


def _parse_flags(argv: list[str]) -> list[str]:
  """Run as a program: the study's flags join absl's own (so --help lists them); a bad
  flag is one line and exit 2, as in experiments.main.

  The study's own set parses its flags first: parsing --config defines the --config.<field>
  overrides there (ml_collections), so they exist when absl's set takes the flags over;
  absl's set then parses what is left (its own flags; anything unknown is an error).
  """
  try:
    rest = FLAGS(argv, known_only=True)
    flags.FLAGS.append_flag_values(FLAGS)
    for name in FLAGS:   # --help lists the key flags of the main module
      flags.declare_key_flag(name, flag_values=flags.FLAGS)
    return flags.FLAGS(rest)
  except flags.Error as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


PRIMARY = "accuracy"
BOOTSTRAPPED = ("auroc", "ece")
SECONDARY = ("learning_speed", "entropy_gap", "auroc", "ece", "overconfident_wrong")
CONTROL = "grpo"
TRAIN_MEANS = ("accuracy", "frac_all_wrong", "frac_nsr_only_adv")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises one line naming the field and the fix; before anything runs or is written."""
  def need(ok, field, fix):
    if not ok:
      raise ValueError(f"config.{field}={cfg[field]!r}: {fix}")
  need(len(cfg.arms) == len(set(cfg.arms)) >= 2 and cfg.reference in cfg.arms, "arms",
       f"give distinct algorithm names including the reference {cfg.reference!r}")
  need(CONTROL in cfg.arms, "arms", f"the positive control needs {CONTROL!r} among the arms")
  need(cfg.num_seeds == 0 or cfg.num_seeds >= 2, "num_seeds",
       "paired tests need at least 2 seeds (0: the regime's pre-registered n)")
  largest = cfg.num_seeds or max(study_configs.SEEDS_PER_ARM.values())
  need(cfg.setting == "pilot" or cfg.first_seed + largest <= 1000, "first_seed",
       "seeds from 1000 are the pilot's; keep the confirmatory sample below 1000")
  need(cfg.iterations % (2 * cfg.eval_every) == 0, "iterations",
       "use a multiple of 2 x eval_every, so the control's half-way point is evaluated")
  need(cfg.eval_prompts >= 1, "eval_prompts", "give a positive number of prompts")
  need(0 <= cfg.control_warmup_steps < cfg.trainer.warmup.steps, "control_warmup_steps",
       f"give fewer supervised steps than the regime's {cfg.trainer.warmup.steps} (0: off)")


def regime_config(cfg: ml_collections.ConfigDict, regime: str) -> ml_collections.ConfigDict:
  """The trainer config of a regime: cfg.trainer with the regime's overrides."""
  from egpo_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  if regime not in study_configs.REGIMES:
    raise ValueError(f"regime={regime!r}: use one of {list(study_configs.REGIMES)}")
  c = config_lib.with_overrides(cfg.trainer, study_configs.REGIMES[regime])
  return config_lib.with_overrides(c, {"train.iterations": cfg.iterations})


def run_regime(cfg: ml_collections.ConfigDict, regime: str, *, progress: bool = True
               ) -> dict[str, Any]:
  """Warm-starts the regime's model once and trains every arm x seed as one program;
  with `control_warmup_steps`, then GRPO x the same seeds from the weaker warm start.

  Returns `ablation.run`'s result with the "regime" added, and "control_warmup" (that
  run's "val", "warmup" and "seconds") when the control ran.
  """
  from egpo_jax.training import ablation  # pylint: disable=g-import-not-at-top
  from egpo_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  check_config(cfg)
  seeds = range(cfg.first_seed,
                cfg.first_seed + (cfg.num_seeds or study_configs.SEEDS_PER_ARM[regime]))

  def run(trainer_cfg, arms):
    setup = ablation.setup(trainer_cfg, oversample=1, eval_prompts=cfg.eval_prompts,
                           eval_samples=cfg.eval_samples,
                           overconfident_at=cfg.overconfident_at)
    return ablation.run(setup, ablation.algorithms(arms), seeds,
                        num_iterations=cfg.iterations, eval_every=cfg.eval_every,
                        progress=progress, eval_batch=cfg.eval_batch or None)

  trainer_cfg = regime_config(cfg, regime)
  result = {**run(trainer_cfg, cfg.arms), "regime": regime}
  if cfg.control_warmup_steps:
    weak = run(config_lib.with_overrides(
        trainer_cfg, {"warmup.steps": cfg.control_warmup_steps}), (CONTROL,))
    result["control_warmup"] = {k: weak[k] for k in ("val", "warmup", "seconds")}
  return result


def outcomes(result: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{outcome: float [arms, seeds]}: the measures of the module doc, per seed."""
  val = result["val"]
  x = np.asarray(result["eval_iterations"], np.float64)
  out = {PRIMARY: val["accuracy"][:, :, -1],
         "learning_speed": np.trapezoid(val["accuracy"], x, axis=-1) / x[-1]}
  for k in SECONDARY[1:]:
    out[k] = val[k][:, :, -1]
  return out


def analyse(per_seed: Mapping[str, np.ndarray], names: Sequence[str], result_val_acc: Any,
            eval_iterations: Sequence[int], cfg: ml_collections.ConfigDict,
            control_val_acc: Any = None) -> dict[str, Any]:
  """The pre-registered analysis of one regime.

  Args:
    per_seed: `outcomes(result)`.
    names: the arms, in the rows' order.
    result_val_acc: validation accuracy [arms, seeds, evaluations] (for the control).
    eval_iterations: the iterations of the evaluations.
    cfg: the study config (reference, alpha, mde, power).
    control_val_acc: validation accuracy [1, seeds, evaluations] of GRPO from the weaker
      warm start (amendment 1's control), or None.

  Returns:
    {"primary": [tests], "secondary": [tests], "arms": {outcome: rows},
     "control": test, "control_warmup": test or None, "bootstrap": {...},
     "design": {...}}: tests as `stats.paired_test` plus "outcome", "name", "reference",
    "p_holm", "significant" (and in the primary family "power_mde": the power for `mde`
    at alpha / (the family's size) and the test's n, from its own observed SD, post hoc);
    "arms" the per-arm mean and 95% t-interval (clipped to
    [0, 1] but for the entropy gap); "bootstrap" {outcome: {"arms": rows, "diffs": rows}}
    for `BOOTSTRAPPED`, percentile intervals over seeds; "design" is `design` of the
    primary tests' SDs: the power the design had for `mde`, and the n it asks for.
  """
  idx = {n: i for i, n in enumerate(names)}
  ref = cfg.reference
  others = [n for n in names if n != ref]

  def family(outcomes_: Sequence[str]) -> list[dict[str, Any]]:
    tests = [{"outcome": o, "name": ref, "reference": n,
              **stats.paired_test(per_seed[o][idx[ref]], per_seed[o][idx[n]])}
             for o in outcomes_ for n in others]
    for t, p in zip(tests, stats.holm([t["p"] for t in tests])):
      t["p_holm"] = float(p)
      t["significant"] = bool(np.isfinite(p) and p < cfg.alpha)
    return tests

  primary, secondary = family([PRIMARY]), family(SECONDARY)
  for t in primary:
    t["power_mde"] = power_mde(t, cfg.mde, cfg.alpha / len(primary))
  arms = {o: [{"name": n, **dict(zip(("mean", "low", "high", "n"), stats.mean_ci(
      v, bounds=None if o == "entropy_gap" else (0.0, 1.0))))}
              for n, v in zip(names, per_seed[o])] for o in (PRIMARY, *SECONDARY)}
  acc = np.asarray(result_val_acc, np.float64)[idx[CONTROL]]
  half = list(eval_iterations).index(eval_iterations[-1] // 2)
  control = {"name": f"{CONTROL} at {eval_iterations[-1]}",
             "reference": f"{CONTROL} at {eval_iterations[half]}",
             **stats.paired_test(acc[:, -1], acc[:, half])}
  control_warmup = None
  if control_val_acc is not None:
    weak = np.asarray(control_val_acc, np.float64)[0]
    control_warmup = {"name": f"{CONTROL} from the regime's warm start",
                      "reference": f"{CONTROL} from {cfg.control_warmup_steps} warm-up steps",
                      "warm_start_diff": float(acc[0, 0] - weak[0, 0]),
                      **stats.paired_test(acc[:, -1], weak[:, -1])}
  boot = {o: {"arms": [{"name": n, **dict(zip(("mean", "low", "high", "n"),
                                              stats.bootstrap_mean_ci(v, bounds=(0.0, 1.0))))}
                       for n, v in zip(names, per_seed[o])],
              "diffs": [{"name": ref, "reference": n, **dict(zip(
                  ("diff", "diff_low", "diff_high", "n"),
                  stats.bootstrap_paired_ci(per_seed[o][idx[ref]], per_seed[o][idx[n]])))}
                        for n in others]}
          for o in BOOTSTRAPPED}
  sds = [t["sd"] for t in primary]
  return {"primary": primary, "secondary": secondary, "arms": arms, "control": control,
          "control_warmup": control_warmup, "bootstrap": boot,
          "design": design(sds, int(min(t["n"] for t in primary)), cfg,
                           num_tests=len(primary))}


def power_mde(test: Mapping[str, Any], mde: float, alpha: float) -> float:
  """Post-hoc power of a paired test (`stats.paired_test`'s dict, or its JSON) for a
  difference of `mde` at `alpha`, from its own n and observed SD; NaN without one."""
  sd, n = test.get("sd"), test.get("n") or 0
  if n < 2 or sd is None or not np.isfinite(sd) or sd <= 0:
    return math.nan
  return stats.power_paired(int(n), sd, mde, alpha)


def arms_table(rep: Mapping[str, Any]) -> str:
  """Per arm: n, final accuracy [95% t-interval], the reference minus the arm [95%
  t-interval], p, Holm p (over the primary family) and the power for `mde` at the
  family's level (`power_mde`, post hoc): the secondary arms' summary."""
  f, a, c = stats.fmt, rep["analysis"], rep["config"]
  tests = {t["reference"]: t for t in a["primary"]}
  level = c["alpha"] / len(tests)
  lines = [f"| arm | n | final accuracy [95% CI] | {c['reference']} - arm [95% CI] | p | "
           f"p (Holm, {len(tests)} tests) | power for {f(c['mde'], 3)} at alpha "
           f"{f(level, 4)} |", "|---|---|---|---|---|---|---|"]
  for r in a["arms"][PRIMARY]:
    t = tests.get(r["name"])
    lines.append(f"| {r['name']} | {r['n']} | {f(r['mean'])} [{f(r['low'])}, {f(r['high'])}] | "
                 + (f"{f(t['diff'], 4)} [{f(t['diff_low'], 4)}, {f(t['diff_high'], 4)}] | "
                    f"{f(t['p'], 4)} | {f(t['p_holm'], 4)} | "
                    f"{f(power_mde(t, c['mde'], level), 2)} |" if t else "| | | |"))
  return "\n".join(lines) + "\n"


def design(sds: Sequence[float], n: int, cfg: ml_collections.ConfigDict, *,
           num_tests: int = 2) -> dict[str, Any]:
  """Power at n pairs and the n to plan for, from the SDs of the primary paired
  differences (PREREGISTRATION.md, "Sample size").

  The planning level is alpha / num_tests (Bonferroni, which bounds Holm's first step);
  the SD is the largest of `sds`; n is planned with its 80% upper confidence limit
  (`stats.sd_upper_bound`), never below 16 seeds.
  """
  alpha = cfg.alpha / num_tests
  finite = [x for x in sds if x is not None and np.isfinite(x) and x > 0]
  out = {"mde": cfg.mde, "power_target": cfg.power, "alpha_planning": alpha, "n": n,
         "sd_diff": max(finite) if finite else math.nan}
  if finite and n >= 2:
    sd = max(finite)
    sd_plan = stats.sd_upper_bound(sd, n)
    out.update(power_at_n=stats.power_paired(n, sd, cfg.mde, alpha),
               mde_at_n=stats.mde_paired(n, sd, alpha=alpha, power=cfg.power),
               sd_plan=sd_plan,
               n_required=stats.required_n(sd_plan, cfg.mde, alpha=alpha, power=cfg.power,
                                           n_min=16))
  return out


def markdown(rep: Mapping[str, Any]) -> str:
  """A regime's tables from its report (`report`, or the JSON it is written as)."""
  f, analysis = stats.fmt, rep["analysis"]
  seeds, arms = rep["seeds"], analysis["arms"]
  lines = [f"# Study regime `{rep['regime']}` ({rep['setting']} setting)", "",
           f"{len(seeds)} seeds per arm ({seeds[0]}..{seeds[-1]}), "
           f"{rep['config']['iterations']} iterations, warm-up {rep['warmup']}, "
           f"{rep['seconds_rl']:.0f} s for the RL of all runs.", "",
           *(["In this setting the `primary` family is amendment 1's secondary analysis: "
              "EGPO vs each other arm on final accuracy, Holm over that family "
              "(PREREGISTRATION.md).", ""] if rep["setting"] == "secondary" else []),
           "| outcome | " + " | ".join(r["name"] for r in arms[PRIMARY]) + " |",
           "|---|" + "---|" * len(arms[PRIMARY])]
  for o, rows in arms.items():
    lines.append(f"| {o} | " + " | ".join(
        f"{f(r['mean'])} [{f(r['low'])}, {f(r['high'])}]" for r in rows) + " |")
  mde = rep["config"]["mde"]
  lines += ["", "| family | outcome | comparison | diff [95% CI] | p (t) | p (sign flip) | "
            f"p (Holm) | significant | power for {f(mde, 3)} (post hoc) |",
            "|---|---|---|---|---|---|---|---|---|"]
  for fam in ("primary", "secondary"):
    for t in analysis[fam]:
      lines.append(f"| {fam} | {t['outcome']} | {t['name']} - {t['reference']} | "
                   f"{f(t['diff'], 4)} [{f(t['diff_low'], 4)}, {f(t['diff_high'], 4)}] | "
                   f"{f(t['p'], 4)} | {f(t['p_sign_flip'], 4)} | {f(t['p_holm'], 4)} | "
                   f"{'yes' if t['significant'] else 'no'} | {f(t.get('power_mde'), 2)} |")
  boot = analysis.get("bootstrap") or {}
  if boot:
    lines += ["", "Bootstrap 95% intervals over seeds (percentile, 10,000 resamples; "
              "arms bounded to [0, 1]):", "",
              "| outcome | " + " | ".join(r["name"] for r in arms[PRIMARY]) + " | " +
              " | ".join(f"{d['name']} - {d['reference']}"
                         for d in next(iter(boot.values()))["diffs"]) + " |",
              "|---|" + "---|" * (len(arms[PRIMARY]) + len(next(iter(boot.values()))["diffs"]))]
    for o, b in boot.items():
      lines.append(f"| {o} | " + " | ".join(
          f"{f(r['mean'])} [{f(r['low'])}, {f(r['high'])}]" for r in b["arms"]) + " | " +
          " | ".join(f"{f(r['diff'], 4)} [{f(r['diff_low'], 4)}, {f(r['diff_high'], 4)}]"
                     for r in b["diffs"]) + " |")
  c, d = analysis["control"], analysis["design"]
  lines += ["", f"Positive control (pre-registered), accuracy {c['name']} - "
            f"{c['reference']}: {f(c['diff'], 4)} [{f(c['diff_low'], 4)}, "
            f"{f(c['diff_high'], 4)}], p = {f(c['p'], 4)}.", ""]
  cw = analysis.get("control_warmup")
  if cw:
    lines += [f"Positive control (amendment 1), final accuracy {cw['name']} - "
              f"{cw['reference']}: {f(cw['diff'], 4)} [{f(cw['diff_low'], 4)}, "
              f"{f(cw['diff_high'], 4)}], p = {f(cw['p'], 4)} (warm starts: "
              f"{f(cw['warm_start_diff'], 4)}).", ""]
  lines += [
            f"Design: n = {d['n']} pairs, SD of the primary paired differences "
            f"{f(d['sd_diff'], 4)}; at alpha {f(d['alpha_planning'], 4)} the power for a "
            f"{f(d['mde'], 3)} difference is {f(d.get('power_at_n'), 3)} and the 80%-power "
            f"MDE {f(d.get('mde_at_n'), 4)}; planned with the SD's 80% upper limit "
            f"{f(d.get('sd_plan'), 4)}, 80% power for {f(d['mde'], 3)} needs n = "
            f"{d.get('n_required', '-')}."]
  return "\n".join(lines) + "\n"


def jsonable(x: Any) -> Any:
  """x with arrays as lists and NaN / inf as None (JSON has neither)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def report(cfg: ml_collections.ConfigDict, result: Mapping[str, Any]) -> dict[str, Any]:
  """Everything the regime's JSON holds: settings, per-seed raw values, curves, analysis."""
  per_seed = outcomes(result)
  control = result.get("control_warmup")
  analysis = analyse(per_seed, result["names"], result["val"]["accuracy"],
                     [int(i) for i in result["eval_iterations"]], cfg,
                     control_val_acc=control["val"]["accuracy"] if control else None)
  return {"regime": result["regime"], "setting": cfg.setting, "config": cfg.to_dict(),
          "arms": result["names"], "seeds": result["seeds"],
          "seconds_rl": result["seconds"], "warmup": result["warmup"],
          "per_seed": per_seed, "eval_iterations": result["eval_iterations"],
          "val_curves": result["val"],
          # [arms, seeds] means over all iterations: what the regime gives NSR to act on.
          "train_means": {k: result["train"][k].mean(-1) for k in TRAIN_MEANS},
          # GRPO from the weaker warm start (amendment 1's control): curves, warm-up, time.
          "control_warmup": control,
          "analysis": analysis}


def main(argv):
  del argv
  cfg, regime, out_dir = _CONFIG.value, _REGIME.value, _OUTPUT_DIR.value
  if regime is None:
    raise app.UsageError(f"--regime is required: one of {list(study_configs.REGIMES)}")
  try:
    check_config(cfg)
  except ValueError as err:   # a bad --config.<field> is one line, like a bad flag
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  paths = [os.path.join(out_dir, f"{regime}.{ext}") for ext in ("json", "md")]
  for p in paths:
    if os.path.exists(p):
      raise FileExistsError(f"{p} exists: give another --output_dir or remove it (the "
                            "study never overwrites results)")
  result = run_regime(cfg, regime)
  rep = jsonable(report(cfg, result))
  os.makedirs(out_dir, exist_ok=True)
  with open(paths[0], "w") as fh:
    json.dump(rep, fh, indent=1)
  with open(paths[1], "w") as fh:
    fh.write(markdown(rep))
  print(open(paths[1]).read())
  print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=_parse_flags))
