"""experiments.study: the config checks, the per-seed outcomes and the pre-registered
analysis on a hand-made result (the whole command at its tiny setting runs in the study
notebook's test), and the command's refusal to overwrite results."""

import json
import subprocess
import sys

import numpy as np
import pytest

from egpo_jax.evaluation import stats
from experiments import study
from experiments.configs import study as study_configs

NAMES = ["egpo", "grpo", "egpo_no_nsr"]
EVALS = np.array([0, 15, 30, 45, 60])


def _result(seed=0):
  """A result shaped like `ablation.run`'s: 3 arms x 6 seeds x 5 evaluations."""
  rng = np.random.default_rng(seed)
  a, s, e = len(NAMES), 6, EVALS.size
  base = np.linspace(0.3, 0.4, e)[None, None, :] + rng.normal(0, 0.01, (1, s, 1))
  acc = base + np.array([0.03, 0.0, 0.01])[:, None, None] + rng.normal(0, 0.005, (a, s, e))
  val = {k: rng.uniform(0.1, 0.9, (a, s, e)) for k in study.SECONDARY[1:]}
  val["accuracy"] = acc
  val["auroc"][0, 0, -1] = np.nan                    # an undefined metric drops its pair
  train = {k: rng.uniform(0, 1, (a, s, 60)) for k in study.TRAIN_MEANS}
  # GRPO from the weaker warm start: 4 points lower throughout, same noise level.
  weak = acc[1:2] - 0.04 + rng.normal(0, 0.005, (1, s, e))
  return {"names": NAMES, "seeds": list(range(s)), "iterations": np.arange(1, 61),
          "eval_iterations": EVALS, "val": val, "train": train, "seconds": 12.0,
          "warmup": {"steps": 500}, "regime": "default",
          "control_warmup": {"val": {"accuracy": weak}, "warmup": {"steps": 450},
                             "seconds": 4.0}}


def test_config_settings_and_checks():
  full, pilot = study_configs.get_config(), study_configs.get_config("pilot")
  assert full.num_seeds == 0 and min(study_configs.SEEDS_PER_ARM.values()) >= 16
  assert pilot.first_seed >= 1000 and pilot.num_seeds >= 2
  assert pilot.iterations == full.iterations and pilot.eval_prompts == full.eval_prompts
  study.check_config(full)
  study.check_config(pilot)
  study.check_config(study_configs.get_config("tiny"))
  sec = study_configs.get_config("secondary")
  study.check_config(sec)
  assert sec.arms[:3] == ("egpo", "grpo", "egpo_no_nsr") and len(sec.arms) == 11
  assert sec.num_seeds >= 2
  assert 0 < full.control_warmup_steps < full.trainer.warmup.steps
  bad = study_configs.get_config()
  bad.control_warmup_steps = bad.trainer.warmup.steps
  with pytest.raises(ValueError, match="control_warmup_steps"):
    study.check_config(bad)
  with pytest.raises(ValueError, match="setting"):
    study_configs.get_config("huge")
  bad = study_configs.get_config()
  bad.first_seed = 980     # + the largest pre-registered n (35) reaches the pilot's seeds
  with pytest.raises(ValueError, match="first_seed.*pilot"):
    study.check_config(bad)
  bad = study_configs.get_config()
  bad.iterations = 45
  with pytest.raises(ValueError, match="iterations"):
    study.check_config(bad)
  bad = study_configs.get_config()
  bad.arms = ("egpo", "egpo_no_nsr")
  with pytest.raises(ValueError, match="positive control"):
    study.check_config(bad)
  c = study.regime_config(full, "shortcut")
  assert c.task.difficulty == 8 and c.train.iterations == full.iterations
  assert study.regime_config(full, "all_wrong").task.difficulty == 3
  assert study.regime_config(full, "overconfident").task.difficulty == 9
  assert set(study_configs.SEEDS_PER_ARM) == set(study_configs.REGIMES)
  with pytest.raises(ValueError, match="regime"):
    study.regime_config(full, "easy")


def test_outcomes_and_analysis_by_hand():
  cfg, res = study_configs.get_config(), _result()
  per_seed = study.outcomes(res)
  acc = res["val"]["accuracy"]
  np.testing.assert_array_equal(per_seed["accuracy"], acc[:, :, -1])
  curve = acc[1, 2]   # trapezoid by hand, equal steps of 15 over 60 iterations
  by_hand = 15 * (curve[0] / 2 + curve[1:-1].sum() + curve[-1] / 2) / 60
  assert per_seed["learning_speed"][1, 2] == pytest.approx(by_hand)
  out = study.analyse(per_seed, NAMES, acc, list(EVALS), cfg)
  p1, p2 = out["primary"]
  assert (p1["name"], p1["reference"], p2["reference"]) == ("egpo", "grpo", "egpo_no_nsr")
  d = acc[0, :, -1] - acc[1, :, -1]
  assert p1["diff"] == pytest.approx(d.mean()) and p1["sd"] == pytest.approx(d.std(ddof=1))
  np.testing.assert_allclose([p1["p_holm"], p2["p_holm"]], stats.holm([p1["p"], p2["p"]]))
  assert p1["significant"]                    # +3 points with 0.7-point noise at 6 seeds
  assert len(out["secondary"]) == 10
  for o, rows in out["arms"].items():        # fractions keep their intervals in [0, 1]
    if o != "entropy_gap":
      assert all(0.0 <= r["low"] <= r["high"] <= 1.0 for r in rows), o
  auroc = [t for t in out["secondary"] if t["outcome"] == "auroc"]
  assert all(t["n"] == 5 for t in auroc)      # the NaN dropped one pair
  c = out["control"]
  assert c["diff"] == pytest.approx((acc[1, :, -1] - acc[1, :, 2]).mean())
  assert out["control_warmup"] is None        # no weaker warm start given
  weak = res["control_warmup"]["val"]["accuracy"]
  cw = study.analyse(per_seed, NAMES, acc, list(EVALS), cfg,
                     control_val_acc=weak)["control_warmup"]
  assert cw["diff"] == pytest.approx((acc[1, :, -1] - weak[0, :, -1]).mean())
  assert cw["warm_start_diff"] == pytest.approx(acc[1, 0, 0] - weak[0, 0, 0])
  assert cw["p"] < 0.05                       # the known 4-point deficit is detected
  # Bootstrap intervals over seeds: AUROC and ECE per arm within [0, 1], around the mean;
  # the paired differences are those of the same pairs the t-tests use.
  for o in study.BOOTSTRAPPED:
    for r, t in zip(out["bootstrap"][o]["arms"], out["arms"][o]):
      assert 0.0 <= r["low"] <= r["mean"] <= r["high"] <= 1.0
      assert r["mean"] == pytest.approx(t["mean"]) and r["n"] == t["n"]
    for r in out["bootstrap"][o]["diffs"]:
      t = next(t for t in out["secondary"]
               if t["outcome"] == o and t["reference"] == r["reference"])
      assert r["diff"] == pytest.approx(t["diff"]) and r["n"] == t["n"]
      assert r["diff_low"] <= r["diff"] <= r["diff_high"]
  design = out["design"]
  sd = max(p1["sd"], p2["sd"])
  assert design["sd_diff"] == pytest.approx(sd) and design["alpha_planning"] == 0.025
  sd_plan = stats.sd_upper_bound(sd, 6)
  assert design["sd_plan"] == pytest.approx(sd_plan)
  assert design["n_required"] == stats.required_n(sd_plan, 0.02, alpha=0.025, n_min=16)
  assert design["power_at_n"] == pytest.approx(stats.power_paired(6, sd, 0.02, 0.025))


def test_report_is_json_and_renders():
  cfg, res = study_configs.get_config(), _result()
  rep = json.loads(json.dumps(study.jsonable(study.report(cfg, res))))
  assert rep["per_seed"]["accuracy"] == res["val"]["accuracy"][:, :, -1].tolist()
  assert rep["val_curves"]["auroc"][0][0][-1] is None       # NaN -> null
  assert np.shape(rep["train_means"]["frac_all_wrong"]) == (3, 6)
  assert np.shape(rep["control_warmup"]["val"]["accuracy"]) == (1, 6, 5)
  md = study.markdown(rep)
  assert "| primary | accuracy | egpo - grpo |" in md
  assert "| accuracy | " in md and "Positive control (pre-registered)" in md
  assert "Positive control (amendment 1)" in md and "| auroc | " in md


def test_command_writes_and_never_overwrites(tmp_path, monkeypatch):
  monkeypatch.setattr(study, "run_regime", lambda cfg, regime: _result())
  study.FLAGS.unparse_flags()
  study.FLAGS(["study", "--regime=default", f"--output_dir={tmp_path}"])
  try:
    study.main([])
    rep = json.loads((tmp_path / "default.json").read_text())
    assert rep["regime"] == "default" and len(rep["seeds"]) == 6
    assert "| primary | accuracy" in (tmp_path / "default.md").read_text()
    with pytest.raises(FileExistsError, match="never overwrites"):
      study.main([])
  finally:
    study.FLAGS.unparse_flags()


def test_command_line_lists_its_flags_and_refuses_bad_ones_in_one_line():
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.study", *a],
                                  capture_output=True, text=True, timeout=300)
  shown = run("--help")
  # The flags' own help lines (the module docstring alone also names --regime).
  assert "The regime to run" in shown.stdout
  assert "Where <regime>.json and <regime>.md are written" in shown.stdout
  # --config.<field> overrides reach the config (they are defined only when --config is
  # parsed): a bad value fails the config check, in one line, before anything runs.
  for bad, word in ((["--regime=nope"], "--regime"), (["--bogus=1"], "bogus"),
                    (["--regime=default", "--config.num_seeds=1"],
                     "config.num_seeds=1: paired tests")):
    done = run(*bad)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and word in done.stderr, done.stderr


def test_primary_tests_carry_their_post_hoc_power():
  cfg, res = study_configs.get_config(), _result()
  out = study.analyse(study.outcomes(res), NAMES, res["val"]["accuracy"], list(EVALS), cfg)
  for t in out["primary"]:   # each comparison's own SD, at alpha / 2 (the family of 2)
    assert t["power_mde"] == pytest.approx(stats.power_paired(6, t["sd"], 0.02, 0.025))
  assert all("power_mde" not in t for t in out["secondary"])
  rep = json.loads(json.dumps(study.jsonable(study.report(cfg, res))))
  table = study.arms_table(rep).splitlines()
  assert len(table) == 2 + len(NAMES) and table[2].startswith("| egpo | 6 |")
  t = out["primary"][0]
  assert table[3].startswith(f"| grpo | 6 |") and table[3].endswith(
      f" | {stats.fmt(t['p_holm'], 4)} | {stats.fmt(t['power_mde'], 2)} |")


def test_control_off_runs_only_the_arms(monkeypatch):
  from egpo_jax.training import ablation
  calls = []
  monkeypatch.setattr(ablation, "setup", lambda c, **kw: c)
  monkeypatch.setattr(ablation, "algorithms", lambda arms: {a: None for a in arms})

  def run(setup, algos, seeds, **kw):
    calls.append((setup.warmup.steps, list(algos), list(seeds)))
    return {"val": None, "warmup": None, "seconds": 0.0}
  monkeypatch.setattr(ablation, "run", run)
  cfg = study_configs.get_config("secondary")
  cfg.first_seed, cfg.num_seeds = 4, 4
  study.run_regime(cfg, "overconfident", progress=False)
  assert calls[0][2] == [4, 5, 6, 7] and len(calls) == 2 and calls[1][1] == ["grpo"]
  assert calls[1][0] == cfg.control_warmup_steps
  calls.clear()
  cfg.control_warmup_steps = 0   # the primary comparison alone, without the control
  assert "control_warmup" not in study.run_regime(cfg, "overconfident", progress=False)
  assert len(calls) == 1 and len(calls[0][1]) == 11
