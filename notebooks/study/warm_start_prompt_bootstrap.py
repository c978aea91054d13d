"""Warm starts of `default` and `overconfident` on the same 1,024 validation prompts x 2
samples: AUROC / ECE of exp(-H~) with prompt-bootstrap intervals, and their paired
difference (stats.bootstrap_calibration)."""
import json
import jax, jax.numpy as jnp, numpy as np
from egpo_jax.training import ablation
from egpo_jax.sampling import engine
from egpo_jax.core import entropy as E
from egpo_jax.evaluation import stats
from experiments import study
from experiments.configs import study as sc

cfg = sc.get_config()
out = {}
for regime in ("default", "overconfident"):
  s = ablation.setup(study.regime_config(cfg, regime), oversample=1, eval_prompts=1024,
                     eval_samples=2)
  k_prompts, k_sample = jax.random.split(s.eval_rng)
  ids, mask, answers = s.experiment.task.sample_prompts(k_prompts, 1024)
  gen = engine.rollout(s.state.params, ids, mask, k_sample, jnp.arange(1024),
                       config=s.experiment.model_config, spec=s.eval_spec)
  corr = s.experiment.task.verify(gen.completion_ids_NxT, gen.completion_mask_NxT,
                                  jnp.repeat(answers, 2))
  h = E.entropy_proxy(gen.logps_NxT, gen.completion_mask_NxT)
  out[regime] = (np.exp(-np.asarray(h)).reshape(1024, 2), np.asarray(corr, bool).reshape(1024, 2),
                 np.asarray(ids))
assert (out["default"][2] == out["overconfident"][2]).all()   # the same prompts
res = {r: stats.bootstrap_calibration(*out[r][:2]) for r in out}
res["overconfident - default"] = stats.bootstrap_calibration(*out["overconfident"][:2],
                                                            reference=out["default"][:2])
print(json.dumps(res, indent=1))
# Run from the repository root: PYTHONPATH=. python notebooks/study/warm_start_prompt_bootstrap.py
