"""The pure training pieces: micro-batch equality, non-finite skips, vmap over seeds and
over calibration variants (one compilation), on a toy jnp task and the tiny model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egpo_jax.core import advantages
from egpo_jax.models import transformer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import engine
from egpo_jax.training import iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import RolloutBatch, TrainState

CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
# Plain SGD maps gradients linearly to parameters, so gradient equality shows undimmed
# (Adam's first step is ~sign(g) and hides or magnifies float noise).
SGD = optax.sgd(0.5)


def _sample_prompts(rng, b):
  toks = jax.random.randint(rng, (b, 4), 10, 14)
  return toks, jnp.ones((b, 4), bool), toks[:, 0]


def _verify(ids, mask, answer):
  """Correct iff the first response token repeats the first prompt token."""
  return (ids[:, 0] == answer) & mask[:, 0]


TASK = iteration.JaxTask(_sample_prompts, _verify)
SPEC = engine.SamplingSpec(group_size=4, max_new_tokens=5, eos_ids=(2,))
SETTINGS = iteration.IterationSettings(prompts_per_batch=4, sampling=SPEC,
                                       update=update.UpdateSettings(micro_batches=2))


@pytest.fixture(scope="module")
def state():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  # Bias the output toward the task's tokens so that groups are mixed.
  return TrainState.create(params, OPT.init(params))


@pytest.fixture(scope="module")
def run_jit():
  return jax.jit(functools.partial(iteration.run_iterations, task=TASK, model_config=CFG,
                                   optimizer=OPT, settings=SETTINGS),
                 static_argnames="num_iterations")


def _fixed_batch(n=16, p=4, t=6, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  lengths = jax.random.randint(k[0], (n,), 1, t + 1)
  mask = jnp.arange(t)[None] < lengths[:, None]
  return RolloutBatch(
      prompt_ids_NxP=jax.random.randint(k[1], (n, p), 3, 300),
      prompt_mask_NxP=jnp.ones((n, p), bool),
      completion_ids_NxT=jax.random.randint(k[2], (n, t), 3, 300),
      completion_mask_NxT=mask,
      old_logps_NxT=-jax.random.uniform(k[3], (n, t), minval=4.0, maxval=8.0) * mask,
      adv_N=jax.random.normal(k[4], (n,)),
      ref_logps_NxT=jnp.zeros((n, t)), is_weights_NxT=jnp.ones((n, t)))


@functools.lru_cache(maxsize=None)
def _sgd_update(micro_batches: int):
  """Jitted SGD updates, shared between tests (one compilation each)."""
  return jax.jit(functools.partial(
      update.update, optimizer=SGD, model_config=CFG,
      settings=update.UpdateSettings(micro_batches=micro_batches)))


def test_one_update_equals_with_1_or_4_micro_batches(state):
  # Each aggregation mode's micro-batch equality is shown on the loss in test_losses.py;
  # here the whole update (forward, chunked log-probs, accumulation, optimizer) is.
  batch = _fixed_batch()
  sgd_state = TrainState.create(state.params, SGD.init(state.params))
  s1, m1 = _sgd_update(1)(sgd_state, batch, jax.random.PRNGKey(3))
  s4, m4 = _sgd_update(4)(sgd_state, batch, jax.random.PRNGKey(3))
  chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6, rtol=1e-5)
  for key in ("loss", "pg_loss", "ratio_mean", "grad_norm"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # The update did move the parameters.
  assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(state.params)[0])


def _grouped_batch(groups=4, g=4, p=5, t=6, seed=1):
  """G responses to each of `groups` left-padded prompts, rows b*G+g."""
  batch = _fixed_batch(n=groups * g, p=p, t=t, seed=seed)
  k = jax.random.split(jax.random.PRNGKey(seed + 10), 2)
  prompts = jax.random.randint(k[0], (groups, p), 3, 300)
  pads = jax.random.randint(k[1], (groups,), 0, p)
  mask = jnp.arange(p)[None] >= pads[:, None]
  return batch.replace(prompt_ids_NxP=jnp.repeat(jnp.where(mask, prompts, 0), g, 0),
                       prompt_mask_NxP=jnp.repeat(mask, g, 0))


def test_shared_prompt_update_equals_per_row_prompts(state):
  """group_size=G runs each prompt once (transformer.response_hidden); the update is the
  per-row one up to float rounding, here with two micro-batches of two whole groups."""
  batch = _grouped_batch()
  sgd_state = TrainState.create(state.params, SGD.init(state.params))
  settings = update.UpdateSettings(micro_batches=2)

  @jax.jit
  def both(sgd_state, batch):
    runs = [update.update(sgd_state, batch, jax.random.PRNGKey(3), optimizer=SGD,
                          model_config=CFG, settings=settings, group_size=g) for g in (1, 4)]
    logps = [update.response_logprobs(
        sgd_state.params, batch.prompt_ids_NxP, batch.prompt_mask_NxP,
        batch.completion_ids_NxT, batch.completion_mask_NxT, model_config=CFG,
        group_size=g) for g in (1, 4)]
    return runs, logps

  ((s1, m1), (s4, m4)), logps = both(sgd_state, batch)
  chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6, rtol=1e-5)
  for key in ("loss", "pg_loss", "ratio_mean", "grad_norm"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(logps[0], logps[1], atol=2e-5, rtol=0)
  # The shared path really differs from the per-row one: one prompt pass per group.
  jaxpr = lambda g: str(jax.make_jaxpr(functools.partial(
      update.response_logprobs, model_config=CFG, group_size=g))(
          state.params, batch.prompt_ids_NxP, batch.prompt_mask_NxP,
          batch.completion_ids_NxT, batch.completion_mask_NxT))
  assert "i32[4,5]" in jaxpr(4) and "i32[4,5]" not in jaxpr(1)


def test_nonfinite_gradient_skips_the_step(state):
  sgd_state = TrainState.create(state.params, SGD.init(state.params))
  batch = _fixed_batch()
  batch = batch.replace(adv_N=batch.adv_N.at[3].set(jnp.nan))
  f = _sgd_update(1)
  new, metrics = f(sgd_state, batch, jax.random.PRNGKey(0))
  chex.assert_trees_all_equal(new.params, sgd_state.params)
  chex.assert_trees_all_equal(new.opt_state, sgd_state.opt_state)
  assert int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1
  assert float(metrics["skipped_nonfinite"]) == 1.0
  # A finite batch afterwards trains again and resets the streak.
  newer, _ = f(new, _fixed_batch(), jax.random.PRNGKey(0))
  assert int(newer.nonfinite_streak) == 0 and int(newer.nonfinite_total) == 1
  assert not np.allclose(jax.tree.leaves(newer.params)[0], jax.tree.leaves(state.params)[0])


def test_vmap_over_seeds_and_variants_equals_separate_runs(state, run_jit):
  """One vmapped (hence one compiled) call trains 2 seeds x EGPO and 1 seed x C1 and
  1 seed x GRPO (EGPO with calibration and NSR off); each equals its separate run."""
  egpo = iteration.AlgoArrays.create("egpo")
  runs = [(7, egpo), (8, egpo), (7, iteration.AlgoArrays.create("C1")),
          (7, iteration.AlgoArrays.create("egpo", calibrate=False, nsr=False))]
  rngs = jnp.stack([jax.random.PRNGKey(seed) for seed, _ in runs])
  algos = jax.tree.map(lambda *x: jnp.stack(x), *[a for _, a in runs])
  vm = jax.jit(jax.vmap(functools.partial(iteration.run_iterations, task=TASK,
                                          model_config=CFG, optimizer=OPT, settings=SETTINGS,
                                          num_iterations=2), in_axes=(None, 0, 0)))
  s_v, _, m_v = vm(state, rngs, algos)
  for i, (seed, algo) in enumerate(runs):
    s_i, _, m_i = run_jit(state, jax.random.PRNGKey(seed), algo, num_iterations=2)
    # vmapped and plain reductions round differently; Adam's g / sqrt(v) turns that float
    # noise into up to a fraction of one step (lr = 1e-3) where a gradient is ~0. A wrong
    # seed or variant moves most parameters by about a whole step.
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], s_v.params), s_i.params,
                                atol=2e-4, rtol=1e-5)
    for key in ("accuracy", "mean_weight_wrong", "frac_nsr_only_adv"):
      np.testing.assert_allclose(m_v[key][i], m_i[key], rtol=1e-5, err_msg=key)
  # The runs really differ: seeds give different rollouts, and GRPO gives all-wrong
  # groups no signal where EGPO's NSR does.
  assert not np.allclose(jax.tree.leaves(s_v.params)[0][0], jax.tree.leaves(s_v.params)[0][1])
  assert float(m_v["frac_nsr_only_adv"][3].sum()) == 0.0
  assert float(m_v["frac_nsr_only_adv"][0].sum()) > 0.0


def test_grpo_settings_match_egpo_without_calibration(state):
  """The registered GRPO estimator and EGPO with calibrate=False, nsr=False agree."""
  rewards = jnp.array([[1., -1., -1., 1.], [-1., -1., -1., -1.]])
  h = jnp.array([[0.1, 0.4, 0.2, 0.5], [0.3, 0.2, 0.1, 0.9]])
  grpo = iteration.compute_advantages(
      rewards, rewards > 0, jnp.ones_like(rewards, bool), h, None,
      iteration.AlgoArrays.create("egpo"),
      iteration.IterationSettings(prompts_per_batch=2, sampling=SPEC,
                                  update=update.UpdateSettings(), advantage="grpo"))
  egpo_off = iteration.compute_advantages(
      rewards, rewards > 0, jnp.ones_like(rewards, bool), h, None,
      iteration.AlgoArrays.create("egpo", calibrate=False, nsr=False), SETTINGS)
  np.testing.assert_allclose(grpo.advantages, egpo_off.advantages, atol=1e-6)
  np.testing.assert_allclose(
      grpo.advantages, advantages.grpo_advantages(rewards).advantages, atol=1e-6)


def test_host_iteration_equals_jitted_iteration(state, run_jit):
  """The host-verified path (per-phase jits, Python verifier) computes the same update."""
  from egpo_jax.training import host_loop

  def host_sample(rng, b):
    ids, mask, answer = _sample_prompts(rng, b)
    return np.asarray(ids), np.asarray(mask), list(np.asarray(answer))

  def host_score(ids, mask, answers):
    return np.array([m[0] and i[0] == a for i, m, a in zip(ids, mask, answers)])

  algo = iteration.AlgoArrays.create("egpo")
  rng = jax.random.PRNGKey(5)
  key = jax.random.split(rng)[1]   # run_iterations splits (rng, key) per iteration
  s_host, m_host = host_loop.host_iteration(
      state, key, algo, task=host_loop.HostTask(host_sample, host_score), model_config=CFG,
      optimizer=OPT, settings=SETTINGS)
  s_jit, _, m_jit = run_jit(state, rng, algo, num_iterations=1)
  chex.assert_trees_all_close(s_host.params, s_jit.params, atol=1e-6, rtol=1e-6)
  for k in ("accuracy", "loss", "frac_all_wrong", "mean_weight_wrong"):
    np.testing.assert_allclose(m_host[k], m_jit[k][0], rtol=1e-6, err_msg=k)
  assert m_host["time_rollout"] > 0 and m_host["time_update"] > 0


def test_mask_truncated_takes_truncated_responses_out_of_the_group_and_the_loss(state):
  """DAPO's overlong filter (loss.mask_truncated): a truncated response leaves the group
  statistics (a group left with one valid response gets A = 0) and the loss mask."""
  b, g, p, t = 2, 2, 3, 4
  ids = jax.random.randint(jax.random.PRNGKey(1), (b, g, t), 3, 200)
  truncated = jnp.array([[True, False], [False, False]])
  gen = {"completion_ids_NxT": ids, "completion_mask_NxT": jnp.ones((b, g, t), bool),
         "logps_NxT": -jnp.ones((b, g, t)), "lengths_N": jnp.full((b, g), t),
         "truncated_N": truncated}
  correct = jnp.array([[True, False], [True, False]])
  groups = iteration.GroupBatch(
      prompt_ids=jnp.ones((b, g, p), jnp.int32), prompt_mask=jnp.ones((b, g, p), bool),
      gen=gen, correct=correct, rewards=jnp.where(correct, 1.0, -1.0),
      valid=jnp.ones((b, g), bool))
  for masked in (False, True):
    settings = iteration.IterationSettings(
        prompts_per_batch=b, sampling=SPEC, update=update.UpdateSettings(),
        advantage="grpo", mask_truncated=masked)
    batch, _ = iteration.prepare_batch(state.params, None, groups,
                                       iteration.AlgoArrays.create(), model_config=CFG,
                                       settings=settings)
    keep = ~truncated.reshape(-1) if masked else jnp.ones(b * g, bool)
    np.testing.assert_array_equal(batch.completion_mask_NxT.any(-1), keep)
    a = np.asarray(batch.adv_N).reshape(b, g)
    assert np.all(a[1] != 0) and (np.all(a[0] == 0) if masked else np.all(a[0] != 0))
