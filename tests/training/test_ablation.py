"""The ablation's traced algorithm switches.

Switched AlgoArrays (one compilation for GRPO, Dr.GRPO, RLOO, DAPO, EDGE-GRPO, EGPO, C1-C6
and EGPO without NSR, and any other registered estimator that traces) must reproduce the static estimators and settings they stand for. (The
statistics over seeds are tested in tests/evaluation/test_stats.py.)
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core import advantages, registry
from egpo_jax.models import transformer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import engine
from egpo_jax.training import ablation, iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import TrainState

CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
# EOS on every third token id: lengths vary, so DAPO's overlong penalty varies.
SPEC = engine.SamplingSpec(group_size=4, max_new_tokens=6, eos_ids=tuple(range(0, 512, 3)),
                           return_entropy=True)


def _sample_prompts(rng, b):
  toks = jax.random.randint(rng, (b, 4), 10, 300)
  return toks, jnp.ones((b, 4), bool), toks[:, 0]


def _verify(ids, mask, answer):
  """Correct iff the first response token is even: about half, so groups are mixed."""
  del answer
  return (ids[:, 0] % 2 == 0) & mask[:, 0]


TASK = iteration.JaxTask(_sample_prompts, _verify)


def _settings(**kw):
  upd = kw.pop("update", update.UpdateSettings())
  return iteration.IterationSettings(prompts_per_batch=4, sampling=SPEC, update=upd, **kw)


# Hand-made groups: mixed, all wrong, all correct, and one with an invalid response.
REWARDS = jnp.array([[1., -1., -1., 1.], [-1., -1., -1., -1.], [1., 1., 1., 1.],
                     [1., -1., 1., -1.]])
CORRECT = REWARDS > 0
VALID = jnp.ones((4, 4), bool).at[3, 3].set(False)
H = jnp.array([[0.1, 0.4, 0.2, 0.5], [0.3, 0.2, 0.1, 0.9], [0.2, 0.2, 0.3, 0.1],
               [0.5, 0.1, 0.3, 0.4]])
SHANNON = jnp.array([[1.0, 2.0, 0.5, 1.5], [0.3, 0.6, 0.9, 1.2], [1., 1., 2., 2.],
                     [0.7, 0.7, 1.4, 0.2]])


def _expected(name):
  """The static estimator each named algorithm stands for, on the hand-made groups."""
  if name in ("grpo", "dapo"):
    return advantages.grpo_advantages(REWARDS, valid_BxG=VALID)
  if name == "dr_grpo":
    return advantages.dr_grpo_advantages(REWARDS, valid_BxG=VALID)
  if name == "rloo":
    return advantages.rloo_advantages(REWARDS, valid_BxG=VALID)
  if name == "edge_grpo":
    return advantages.edge_grpo_advantages(REWARDS, valid_BxG=VALID, shannon_BxG=SHANNON,
                                           clamp=(0.5, 2.0))
  return advantages.egpo_advantages(REWARDS, H, correct_BxG=CORRECT, valid_BxG=VALID,
                                    variant=name)


class SwitchedAdvantagesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_each_algorithm_equals_its_registered_estimator(self):
    settings = _settings(edge_clamp=(0.5, 2.0))
    fn = self.variant(lambda a: iteration.compute_advantages(
        REWARDS, CORRECT, VALID, H, SHANNON, a, settings))
    for name in ablation.ALGORITHMS:   # arrays: one compilation for all of them
      got, want = fn(ablation.algorithm(name)), _expected(name)
      np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-6, atol=1e-7,
                                 err_msg=name)
      np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, err_msg=name)

  def test_the_algorithms_really_differ(self):
    settings = _settings(edge_clamp=(0.5, 2.0))
    out = {n: np.asarray(iteration.compute_advantages(
        REWARDS, CORRECT, VALID, H, SHANNON, ablation.algorithm(n), settings).advantages)
           for n in ablation.ALGORITHMS}
    # Every distinct estimator (dapo shares GRPO's) differs from the others somewhere.
    distinct = [n for n in ablation.ALGORITHMS if n != "dapo"]
    for i, a in enumerate(distinct):
      for b in distinct[i + 1:]:
        assert not np.allclose(out[a], out[b]), (a, b)
    # NSR: all-wrong group (row 1) gets signal only from EGPO-family algorithms.
    assert np.all(out["grpo"][1] == 0) and np.all(out["dr_grpo"][1] == 0)
    assert np.all(out["egpo"][1] < 0)

  def test_egpo_without_nsr_silences_all_wrong_groups_only(self):
    settings = _settings(edge_clamp=(0.5, 2.0))
    got = iteration.compute_advantages(REWARDS, CORRECT, VALID, H, SHANNON,
                                       ablation.algorithm("egpo_no_nsr"), settings)
    want = advantages.egpo_advantages(REWARDS, H, correct_BxG=CORRECT, valid_BxG=VALID,
                                      nsr=False)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-6, atol=1e-7)
    egpo = np.asarray(iteration.compute_advantages(
        REWARDS, CORRECT, VALID, H, SHANNON, ablation.algorithm("egpo"), settings).advantages)
    np.testing.assert_array_equal(np.asarray(got.advantages)[1], 0.0)   # all-wrong group
    assert np.all(egpo[1] < 0)
    np.testing.assert_allclose(np.asarray(got.advantages)[[0, 2, 3]], egpo[[0, 2, 3]])

  def test_dr_grpo_and_dapo_arrays(self):
    dr = ablation.algorithm("dr_grpo")
    assert int(dr.estimator) == iteration.estimator_codes().index("dr_grpo")
    assert bool(dr.seq_sum_norm) and not bool(dr.dynamic_sampling)
    dapo = ablation.algorithm("dapo")
    assert float(dapo.eps_high) == pytest.approx(0.28)
    assert bool(dapo.overlong) and bool(dapo.dynamic_sampling)
    assert float(ablation.algorithm("egpo").eps_high) == pytest.approx(0.2)
    chex.assert_trees_all_equal(ablation.algorithm("lock_one"), ablation.algorithm("c3"))


def test_bad_algorithms_raise_clearly():
  with pytest.raises(ValueError, match="unknown algorithm"):
    ablation.algorithm("ppo")
  with pytest.raises(ValueError, match="all switches"):
    ablation.stack([ablation.algorithm("egpo"), iteration.AlgoArrays.create("egpo")])
  with pytest.raises(ValueError, match="estimator"):
    iteration.AlgoArrays.create_switched(estimator="ppo_gae")
  with pytest.raises(ValueError, match="unique"):
    ablation.algorithms(["egpo", "egpo"])
  with pytest.raises(ValueError, match="eval_batch=0"):
    ablation.run(None, ablation.algorithms(["egpo"]), seeds=(0,), num_iterations=4,
                 eval_every=2, eval_batch=0)
  with pytest.raises(ValueError, match="multiple of eval_every"):
    ablation.run(None, ablation.algorithms(["egpo"]), seeds=(0,), num_iterations=5,
                 eval_every=2)
  with pytest.raises(ValueError, match="return_entropy"):
    iteration.compute_advantages(REWARDS, CORRECT, VALID, H, None,
                                 ablation.algorithm("grpo"), _settings())


@pytest.fixture
def scratch_estimator():
  """Registers estimators for one test and removes them afterwards."""
  names = []

  def register(name, fn):
    registry.advantage_estimators.register(name)(fn)
    names.append(name)
  yield register
  for name in names:
    registry.advantage_estimators.unregister(name)


def test_every_registered_estimator_is_covered_or_named_as_host_only(scratch_estimator):
  """RLOO and a newly registered jnp estimator join the vmapped ablation by name; one
  that needs concrete values is refused, naming why."""
  assert set(registry.advantage_estimators.names()) <= (
      set(ablation.ALGORITHMS) | set(iteration.host_only_estimators()))

  def doubled(rewards_BxG, *, valid_BxG=None):
    out = advantages.rloo_advantages(rewards_BxG, valid_BxG=valid_BxG)
    return out._replace(advantages=2 * out.advantages)

  def host_only(rewards_BxG, *, valid_BxG=None):
    r = np.asarray(rewards_BxG)   # needs concrete values: no tracing
    return advantages.AdvantageOutput(jnp.asarray(r - r.mean()), jnp.ones_like(rewards_BxG))

  codes_before = iteration.estimator_codes()
  scratch_estimator("rloo_doubled", doubled)
  scratch_estimator("numpy_centred", host_only)
  assert iteration.estimator_codes() == codes_before + ("rloo_doubled",)  # none renumbered
  assert "numpy_centred" in iteration.host_only_estimators()
  with pytest.raises(ValueError, match="numpy_centred.*does not trace as arrays"):
    ablation.algorithm("numpy_centred")
  settings = _settings(edge_clamp=(0.5, 2.0))
  got = jax.jit(lambda a: iteration.compute_advantages(
      REWARDS, CORRECT, VALID, H, SHANNON, a, settings))(ablation.algorithm("rloo_doubled"))
  np.testing.assert_allclose(got.advantages, 2 * _expected("rloo").advantages, rtol=1e-6)


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def state():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  return TrainState.create(params, OPT.init(params))


def _run_static(state, rng, settings, algo=None):
  f = jax.jit(functools.partial(iteration.run_iterations, task=TASK, model_config=CFG,
                                optimizer=OPT, settings=settings, num_iterations=2))
  return f(state, rng, algo or iteration.AlgoArrays.create("egpo"))


def _run_vmapped(state, rngs, names, settings):
  f = jax.jit(jax.vmap(functools.partial(
      iteration.run_iterations, task=TASK, model_config=CFG, optimizer=OPT,
      settings=settings, num_iterations=2), in_axes=(None, 0, 0)))
  return f(state, rngs, ablation.stack([ablation.algorithm(n) for n in names]))


def _assert_same_run(vmapped, i, static, name):
  s_v, _, m_v = vmapped
  s_i, _, m_i = static
  # vmapped and plain reductions round differently; Adam turns float noise into a
  # fraction of one step (lr = 1e-3) where a gradient is ~0. A wrong switch moves most
  # parameters by about a whole step.
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], s_v.params), s_i.params,
                              atol=2e-4, rtol=1e-5, custom_message=name)
  for key in ("accuracy", "reward", "frac_mixed", "pg_loss", "clipfrac_high",
              "dynamic_sampling_fill_rate"):
    np.testing.assert_allclose(m_v[key][i], m_i[key], rtol=1e-4, atol=1e-6,
                               err_msg=f"{name}: {key}")


@pytest.mark.slow
def test_switched_runs_equal_static_runs(state):
  """One vmapped program trains Dr.GRPO and EDGE-GRPO; each equals the run that the
  static settings of that algorithm give (advantage, aggregation, Shannon entropy).
  (GRPO and EGPO through the switches are checked on the advantages above; their
  update path is the one EDGE-GRPO takes here.)"""
  rng = jax.random.PRNGKey(3)
  names = ("dr_grpo", "edge_grpo")
  shared = _settings(overlong_buffer=2)   # only DAPO switches the penalty on
  vm = _run_vmapped(state, jnp.stack([rng] * len(names)), names, shared)
  static = {
      "dr_grpo": _settings(advantage="dr_grpo", update=update.UpdateSettings(
          aggregation="seq-mean-token-sum-norm")),
      "edge_grpo": _settings(advantage="edge_grpo"),
  }
  for i, name in enumerate(names):
    _assert_same_run(vm, i, _run_static(state, rng, static[name]), name)
  # Same rollouts, different updates.
  p0 = jax.tree.leaves(vm[0].params)[0]
  assert not np.allclose(p0[0], p0[1])


@pytest.mark.slow
def test_switched_dapo_equals_static_dapo(state):
  """DAPO's clip-higher, overlong shaping and dynamic sampling as switches equal DAPO's
  static settings; GRPO in the same over-sampled program uses the first B groups."""
  rng = jax.random.PRNGKey(4)
  shared = _settings(overlong_buffer=3, dynamic_sampling_oversample=2)
  vm = _run_vmapped(state, jnp.stack([rng, rng]), ("dapo", "grpo"), shared)
  dapo = _settings(advantage="grpo", overlong_buffer=3, dynamic_sampling_oversample=2,
                   update=update.UpdateSettings(eps_high=0.28))
  _assert_same_run(vm, 0, _run_static(state, rng, dapo), "dapo")
  m = vm[2]
  assert float(m["dynamic_sampling_fill_rate"][1].min()) == 1.0   # grpo: no filtering
  # Without the overlong switch GRPO's rewards are exactly +-1.
  np.testing.assert_allclose(np.abs(m["reward"][1]) <= 1.0, True)
  assert not np.allclose(m["reward"][0], m["reward"][1])
