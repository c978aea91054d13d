"""Tests of egpo_jax.core.advantages against a loop-based NumPy reference, plus invariants."""

import functools

from absl.testing import parameterized
import chex
import egpo_numpy_reference as ref
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core import advantages as adv_lib

PRESETS = adv_lib.EGPO_VARIANT_NAMES  # egpo, c1..c6, lock_one
# Property-test shapes; (16, 6) is also make_batch's, so its compiled functions are reused.
SHAPES = ((1, 2), (3, 4), (16, 6))
TOL = dict(rtol=1e-5, atol=1e-5)


def make_batch(seed, b=16, g=6, shaped=False):
  """Random groups with every special case: all-correct, all-wrong, zero entropy, padding.

  NaN sits at some invalid positions: it must not leak into any statistic.
  """
  rng = np.random.default_rng(seed)
  correct = rng.random((b, g)) < 0.5
  correct[0] = True  # all-correct
  correct[1] = False  # all-wrong
  correct[2, :2] = [True, False]  # mixed, zero entropy below
  correct[9] = False  # all-wrong with a padded member
  entropy = rng.uniform(0.02, 2.0, (b, g))
  entropy[2] = 0.0  # a zero-entropy group
  entropy[3, :2] = 0.0  # some zero entropies
  entropy[1, 0] = entropy[1, 1]  # ties
  valid = np.ones((b, g), bool)
  valid[4] = False  # a padding row (filtered group)
  valid[5, 3:] = False  # a partially padded group
  valid[6, 1:] = False  # one valid response: no group statistic
  valid[7, ::2] = False
  valid[9, -1] = False
  rewards = np.where(correct, 1.0, -1.0)
  if shaped:  # DAPO-style length penalty on some responses (dyadic: exact in float32)
    rewards = rewards - 0.5 * rng.integers(0, 2, (b, g))
  rewards[5, 4] = np.nan
  entropy[5, 5] = np.nan
  entropy[4] = -1.0  # invalid row: never checked, never used
  return (rewards.astype(np.float32), entropy.astype(np.float32), correct, valid)


@functools.lru_cache(maxsize=None)
def _batch(seed, shaped=False):
  return make_batch(seed, shaped=shaped)


# One compiled function for every preset: the variants are arrays, stacked on axis 0.
_trace_count = {"egpo_all": 0}


@jax.jit
def egpo_all(rewards, entropy, correct, valid, variants, eps_h, nsr, nsr_advantage):
  _trace_count["egpo_all"] += 1
  fn = lambda v: adv_lib.egpo_advantages(  # noqa: E731
      rewards, entropy, correct_BxG=correct, valid_BxG=valid, variant=v, eps_h=eps_h,
      nsr=nsr, nsr_advantage=nsr_advantage)
  return jax.vmap(fn)(variants)


@functools.lru_cache(maxsize=None)
def stacked_presets(lam_min=0.8, lam_max=2.0):
  return adv_lib.stack_variants(
      [adv_lib.egpo_variant(n, lam_min=lam_min, lam_max=lam_max) for n in PRESETS])


@jax.jit
def baselines_jit(rewards, correct, valid, shannon):
  return {
      "grpo": adv_lib.grpo_advantages(rewards, valid_BxG=valid),
      "grpo0": adv_lib.grpo_advantages(rewards, valid_BxG=valid, ddof=0),
      "dr_grpo": adv_lib.dr_grpo_advantages(rewards, valid_BxG=valid),
      "rloo": adv_lib.rloo_advantages(rewards, valid_BxG=valid),
      "edge": adv_lib.edge_grpo_advantages(rewards, valid_BxG=valid, shannon_BxG=shannon),
      "edge_clip": adv_lib.edge_grpo_advantages(
          rewards, valid_BxG=valid, shannon_BxG=shannon, clamp=(0.5, 2.0)),
      "egpo_grpo": adv_lib.egpo_advantages(
          rewards, shannon, correct_BxG=correct, valid_BxG=valid, calibrate=False,
          nsr=False),
  }


# ---------------------------------------------------------------- worked example


def test_worked_example_mixed_group():
  h = jnp.array([[0.1, 0.4, 0.2, 0.5]])
  correct = jnp.array([[True, True, False, False]])
  rewards = jnp.where(correct, 1.0, -1.0)
  out = adv_lib.egpo_advantages(rewards, h, correct_BxG=correct, eps_h=0.0)
  np.testing.assert_allclose(out.weights, [[2.0, 1.0, 1.0, 0.8]], atol=1e-6)
  np.testing.assert_allclose(out.advantages, [[1.7321, 0.8660, -0.8660, -0.6928]],
                             atol=1e-4)
  base = adv_lib.grpo_advantages(rewards).advantages
  np.testing.assert_allclose(base, [[0.8660, 0.8660, -0.8660, -0.8660]], atol=1e-4)
  # Eqs. 6-7 before the clamp: C1 (symmetric) exposes clip(w^, 0.8, 2.0).
  w_c1 = adv_lib.egpo_weights(h, correct, eps_h=0.0, variant="C1")
  np.testing.assert_allclose(w_c1, [[2.0, 0.8, 1.5, 0.8]], atol=1e-6)


def test_worked_example_all_wrong_group():
  h = jnp.array([[0.1, 0.4, 0.2, 0.5]])
  rewards = -jnp.ones((1, 4))
  out = adv_lib.egpo_advantages(rewards, h, eps_h=0.0, require_pm1_rewards=True)
  np.testing.assert_allclose(out.weights, [[1.0, 0.8, 1.0, 0.8]], atol=1e-6)
  np.testing.assert_allclose(out.advantages, [[-1.0, -0.8, -1.0, -0.8]], atol=1e-4)


# ---------------------------------------------------------------- NumPy reference


@pytest.mark.parametrize("seed,shaped", [(0, False), (1, True), (2, False)])
def test_baselines_match_reference(seed, shaped):
  rewards, entropy, correct, valid = _batch(seed, shaped)
  out = baselines_jit(rewards, correct, valid, entropy)
  np.testing.assert_allclose(out["grpo"].advantages, ref.grpo(rewards, valid), **TOL)
  np.testing.assert_allclose(out["grpo0"].advantages, ref.grpo(rewards, valid, ddof=0),
                             **TOL)
  np.testing.assert_allclose(out["dr_grpo"].advantages, ref.dr_grpo(rewards, valid), **TOL)
  np.testing.assert_allclose(out["rloo"].advantages, ref.rloo(rewards, valid), **TOL)
  for key, clip in (("edge", (None, None)), ("edge_clip", (0.5, 2.0))):
    e_adv, e_w = ref.edge_grpo(rewards, entropy, valid, clip_min=clip[0], clip_max=clip[1])
    np.testing.assert_allclose(out[key].advantages, e_adv, **TOL)
    np.testing.assert_allclose(out[key].weights, e_w, **TOL)
  for o in out.values():
    assert o.advantages.dtype == jnp.float32 and o.weights.dtype == jnp.float32
    assert np.all(np.asarray(o.advantages)[~valid] == 0)
  for key in ("grpo", "grpo0", "dr_grpo", "rloo"):
    np.testing.assert_array_equal(out[key].weights, 1.0)


@pytest.mark.parametrize("seed,shaped,lam,eps_h,nsr,nsr_adv", [
    (0, False, (0.8, 2.0), 1e-5, True, -1.0),
    (1, True, (0.5, 3.0), 1e-5, True, -0.5),
    (2, False, (0.8, 2.0), 1e-3, False, -1.0),
])
def test_egpo_presets_match_reference(seed, shaped, lam, eps_h, nsr, nsr_adv):
  rewards, entropy, correct, valid = _batch(seed, shaped)
  out = egpo_all(rewards, entropy, correct, valid, stacked_presets(*lam), eps_h, nsr,
                 nsr_adv)
  for k, name in enumerate(PRESETS):
    exp_adv, exp_w = ref.egpo(rewards, entropy, correct, valid, variant=name,
                              lam_min=lam[0], lam_max=lam[1], eps_h=eps_h, nsr=nsr,
                              nsr_advantage=nsr_adv)
    np.testing.assert_allclose(out.weights[k], exp_w, err_msg=name, **TOL)
    np.testing.assert_allclose(out.advantages[k], exp_adv, err_msg=name, **TOL)


def test_vmapped_presets_equal_separate_calls_and_compile_once():
  rewards, entropy, correct, valid = _batch(0)
  before = _trace_count["egpo_all"]
  for lam in ((0.8, 2.0), (0.6, 1.5)):
    out = egpo_all(rewards, entropy, correct, valid, stacked_presets(*lam), 1e-5, True,
                   -1.0)
    for k, name in enumerate(PRESETS):
      single = adv_lib.egpo_advantages(rewards, entropy, correct_BxG=correct,
                                       valid_BxG=valid, variant=name.upper(),
                                       lam_min=lam[0], lam_max=lam[1])
      np.testing.assert_allclose(out.advantages[k], single.advantages, err_msg=name,
                                 rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(out.weights[k], single.weights, err_msg=name, rtol=1e-6,
                                 atol=1e-6)
  # Other bounds, NSR flags and eps_h reuse the same executable (at most one trace here,
  # zero if another test compiled it already).
  assert _trace_count["egpo_all"] - before <= 1
  assert egpo_all._cache_size() == 1


def test_lock_one_is_c3_and_names_are_case_insensitive():
  for a, b in (("lock_one", "C3"), ("EGPO", "egpo"), ("c5", "C5")):
    chex.assert_trees_all_equal(adv_lib.egpo_variant(a), adv_lib.egpo_variant(b))


# ---------------------------------------------------------------- invariants


def test_egpo_with_unit_weights_and_no_nsr_equals_grpo():
  for seed in (0, 1, 2):
    rewards, entropy, correct, valid = _batch(seed)
    out = baselines_jit(rewards, correct, valid, entropy)
    np.testing.assert_allclose(out["egpo_grpo"].advantages, out["grpo"].advantages,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["egpo_grpo"].weights, 1.0)
  # Also with every bound at [1, 1] instead of calibrate=False.
  ones = adv_lib.EGPOVariant(1.0, 1.0, 1.0, 1.0, False, adv_lib.RENORM_NONE)
  rewards, entropy, correct, valid = _batch(0)
  out = adv_lib.egpo_advantages(rewards, entropy, correct_BxG=correct, valid_BxG=valid,
                                variant=ones, nsr=False)
  np.testing.assert_allclose(out.advantages, ref.grpo(rewards, valid), **TOL)


def test_all_correct_groups_get_exactly_zero():
  rewards, entropy, correct, valid = _batch(0)
  out = egpo_all(rewards, entropy, correct, valid, stacked_presets(), 1e-5, True, -1.0)
  assert np.all(np.asarray(out.advantages)[:, 0] == 0.0)
  base = baselines_jit(rewards, correct, valid, entropy)
  for key, o in base.items():
    assert np.all(np.asarray(o.advantages)[0] == 0.0), key


def test_no_gradient_through_weights():
  rewards, entropy, correct, valid = _batch(1, shaped=True)
  entropy = np.where(valid, entropy, 0.5).astype(np.float32)

  def total(h, variants):
    out = jax.vmap(lambda v: adv_lib.egpo_advantages(
        rewards, h, correct_BxG=correct, valid_BxG=valid, variant=v))(variants)
    return jnp.sum(out.advantages) + jnp.sum(out.weights)

  grad = jax.jit(jax.grad(total))(jnp.asarray(entropy), stacked_presets())
  assert np.all(np.asarray(grad) == 0.0)
  w_grad = jax.jit(jax.grad(lambda h: jnp.sum(adv_lib.egpo_weights(h, correct, valid))))(
      entropy)
  assert np.all(np.asarray(w_grad) == 0.0)
  e_grad = jax.jit(jax.grad(lambda p: jnp.sum(adv_lib.edge_grpo_advantages(
      rewards, valid_BxG=valid, shannon_BxG=p).advantages)))(entropy)
  assert np.all(np.asarray(e_grad) == 0.0)


def test_correct_defaults_to_positive_rewards():
  rewards, entropy, correct, valid = _batch(0)
  a = adv_lib.egpo_advantages(rewards, entropy, valid_BxG=valid)
  b = adv_lib.egpo_advantages(rewards, entropy, correct_BxG=rewards > 0, valid_BxG=valid)
  chex.assert_trees_all_equal(a, b)


def test_small_groups_get_zero_advantage():
  rewards = jnp.array([[1.0, -1.0, 1.0, -1.0]])
  valid = jnp.array([[True, False, False, False]])
  h = jnp.ones((1, 4))
  for out in (adv_lib.grpo_advantages(rewards, valid_BxG=valid),
              adv_lib.rloo_advantages(rewards, valid_BxG=valid),
              adv_lib.dr_grpo_advantages(rewards, valid_BxG=valid),
              adv_lib.edge_grpo_advantages(rewards, valid_BxG=valid, shannon_BxG=h),
              adv_lib.egpo_advantages(-jnp.ones((1, 4)), h, valid_BxG=valid)):
    np.testing.assert_array_equal(out.advantages, 0.0)


def test_finite_with_eps_h_zero_and_zero_entropy():
  h = jnp.array([[0.0, 0.3, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  rewards = jnp.array([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, -1.0],
                       [-1.0, -1.0, -1.0, -1.0]])
  out = egpo_all(rewards, h, rewards > 0, jnp.ones((3, 4), bool), stacked_presets(), 0.0,
                 True, -1.0)
  assert np.all(np.isfinite(out.advantages)) and np.all(np.isfinite(out.weights))
  # EGPO: a zero-entropy correct response is as confident as can be -> lam_max.
  np.testing.assert_allclose(out.weights[0, 0, 0], 2.0)


# ---------------------------------------------------------------- property tests


@st.composite
def groups(draw, pm1=False):
  b, g = draw(st.sampled_from(SHAPES))
  reward_el = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]),
                        st.floats(-1e3, 1e3, width=32))
  correct = draw(hnp.arrays(np.bool_, (b, g)))
  if pm1:
    rewards = np.where(correct, 1.0, -1.0).astype(np.float32)
  else:
    rewards = draw(hnp.arrays(np.float32, (b, g), elements=reward_el))
  entropy = draw(hnp.arrays(np.float32, (b, g), elements=st.one_of(
      st.sampled_from([0.0, 0.5]), st.floats(0.0, 50.0, width=32))))
  valid = draw(hnp.arrays(np.bool_, (b, g)))
  return rewards, entropy, correct, valid


@given(groups(), st.sampled_from([0.0, 1e-5]))
def test_property_finite_and_bounded(batch, eps_h):
  rewards, entropy, correct, valid = batch
  out = egpo_all(rewards, entropy, correct, valid, stacked_presets(), eps_h, True, -1.0)
  assert np.all(np.isfinite(out.advantages)) and np.all(np.isfinite(out.weights))
  for k, name in enumerate(PRESETS):
    _, _, _, renorm = ref.VARIANT_TABLE[name]
    w = np.asarray(out.weights[k])
    assert np.all(np.asarray(out.advantages[k])[~valid] == 0) and np.all(w[~valid] == 1)
    if renorm == "none":  # without renormalisation the weights stay in their bounds
      (c_lo, c_hi), (w_lo, w_hi) = ref.variant_bounds(name, 0.8, 2.0)
      assert np.all((w >= c_lo - 1e-6) & (w <= c_hi + 1e-6) | ~(valid & correct)), name
      assert np.all((w >= w_lo - 1e-6) & (w <= w_hi + 1e-6) | ~(valid & ~correct)), name
  base = baselines_jit(rewards, correct, valid, entropy)
  for key, o in base.items():
    assert np.all(np.isfinite(o.advantages)) and np.all(np.isfinite(o.weights)), key


@given(groups(pm1=True))
def test_property_egpo_reduces_to_grpo_and_keeps_signs(batch):
  rewards, entropy, correct, valid = batch
  base = baselines_jit(rewards, correct, valid, entropy)
  np.testing.assert_allclose(base["egpo_grpo"].advantages, base["grpo"].advantages,
                             rtol=1e-6, atol=1e-6)
  out = egpo_all(rewards, entropy, correct, valid, stacked_presets(), 1e-5, True, -1.0)
  a = np.asarray(out.advantages)
  # Positive weights never flip a sign: correct >= 0, wrong <= 0 (NSR is negative).
  assert np.all(a[:, correct] >= 0) and np.all(a[:, ~correct] <= 0)
  # All-correct groups are skipped.
  all_correct = np.all(correct | ~valid, axis=1)
  assert np.all(a[:, all_correct] == 0)


@given(st.sampled_from(list(adv_lib.registry.advantage_estimators)),
       st.integers(1, 4))
def test_property_group_of_one_raises(name, b):
  fn = adv_lib.registry.advantage_estimators.get(name)
  with pytest.raises(ValueError, match="group size G=1"):
    fn(np.ones((b, 1), np.float32), entropy_BxG=np.ones((b, 1), np.float32),
       shannon_BxG=np.ones((b, 1), np.float32))


@given(st.sampled_from(SHAPES), st.sampled_from(["correct_BxG", "valid_BxG", "entropy_BxG"]),
       st.sampled_from([(0, 1), (1, 0), (1, 1)]))
def test_property_mismatched_shapes_raise(shape, field, delta):
  b, g = shape
  kwargs = {"correct_BxG": np.ones((b, g), bool), "valid_BxG": np.ones((b, g), bool),
            "entropy_BxG": np.ones((b, g), np.float32)}
  kwargs[field] = np.ones((b + delta[0], g + delta[1]), kwargs[field].dtype)
  with pytest.raises(ValueError, match=field):
    adv_lib.egpo_advantages(np.ones((b, g), np.float32), **kwargs)


@given(groups(), st.floats(-5.0, 5.0, width=32))
def test_property_non_pm1_rewards_raise_when_required(batch, bad):
  rewards, entropy, correct, valid = batch
  rewards = np.where(correct, 1.0, -1.0).astype(np.float32)
  valid = valid.copy()
  valid[0, 0] = True
  if bad == (1.0 if correct[0, 0] else -1.0):
    bad = 0.25
  rewards[0, 0] = bad
  with pytest.raises(ValueError, match="require_pm1_rewards"):
    adv_lib.egpo_advantages(rewards, entropy, correct_BxG=correct, valid_BxG=valid,
                            require_pm1_rewards=True)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,match", [
    (lambda: adv_lib.grpo_advantages(np.ones(4, np.float32)), "rewards_BxG must be"),
    (lambda: adv_lib.grpo_advantages(np.ones((2, 4), bool)), "must be numeric"),
    (lambda: adv_lib.grpo_advantages(np.ones((2, 4)), valid_BxG=np.ones((2, 4))),
     "valid_BxG must be bool"),
    (lambda: adv_lib.grpo_advantages(np.full((2, 4), np.nan)), "NaN/inf"),
    (lambda: adv_lib.grpo_advantages(np.ones((2, 4)), ddof=2), "ddof"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4))), "needs entropy_BxG"),
    (lambda: adv_lib.edge_grpo_advantages(np.ones((2, 4))), "needs shannon_BxG"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4)), -np.ones((2, 4), np.float32)),
     "must be >= 0"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4)), np.ones((2, 4), np.float32),
                                     variant="c7"), "unknown EGPO variant"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4)), np.ones((2, 4), np.float32),
                                     variant=adv_lib.egpo_variant("c1"), lam_min=0.5),
     "carries its own bounds"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4)), np.ones((2, 4), np.float32),
                                     variant=stacked_presets()), "vmap"),
    (lambda: adv_lib.egpo_advantages(np.ones((2, 4)), np.ones((2, 4), np.float32),
                                     variant=adv_lib.EGPOVariant(2.0, 1.0, 0.8, 1.0,
                                                                 False, 0)),
     "correct_lo=2.0 > correct_hi"),
    (lambda: adv_lib.egpo_variant("egpo", lam_min=1.2), "lam_min"),
    (lambda: adv_lib.edge_grpo_advantages(np.ones((2, 4)), shannon_BxG=np.ones((2, 4)),
                                          clamp=(2.0, 0.5)), "lo > hi"),
    (lambda: adv_lib.egpo_variant("egpo", lam_max=0.9), "lam_max"),
    (lambda: adv_lib.egpo_weights(np.ones((2, 4), np.float32), None), "correct_BxG"),
])
def test_bad_input_raises_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_unknown_hparam_is_a_type_error():
  with pytest.raises(TypeError):
    adv_lib.grpo_advantages(np.ones((2, 4)), lam_min=0.8)


# ---------------------------------------------------------------- jit / pmap / shard_map


class PublicFunctionsVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("grpo", "dr_grpo", "rloo", "edge_grpo", "egpo")
  def test_estimators(self, name):
    rewards, entropy, correct, valid = _batch(1, shaped=True)
    fn = self.variant(adv_lib.registry.advantage_estimators.get(name))
    out = fn(rewards, correct_BxG=correct, valid_BxG=valid, entropy_BxG=entropy,
             shannon_BxG=entropy)
    expected = {
        "grpo": lambda: ref.grpo(rewards, valid),
        "dr_grpo": lambda: ref.dr_grpo(rewards, valid),
        "rloo": lambda: ref.rloo(rewards, valid),
        "edge_grpo": lambda: ref.edge_grpo(rewards, entropy, valid)[0],
        "egpo": lambda: ref.egpo(rewards, entropy, correct, valid)[0],
    }[name]()
    np.testing.assert_allclose(out.advantages, expected, **TOL)
    chex.assert_shape([out.advantages, out.weights], rewards.shape)

  @chex.variants(with_jit=True, without_jit=True)
  def test_egpo_weights_named_variant(self):
    _, entropy, correct, valid = _batch(2)
    fn = self.variant(functools.partial(adv_lib.egpo_weights, variant="c6", lam_min=0.7))
    w = fn(entropy, correct, valid)
    np.testing.assert_allclose(
        w, ref.egpo(np.where(correct, 1.0, -1.0), entropy, correct, valid, variant="c6",
                    lam_min=0.7)[1], **TOL)


def _all_estimators(rewards, entropy, correct, valid, variants):
  egpo = jax.vmap(lambda v: adv_lib.egpo_advantages(
      rewards, entropy, correct_BxG=correct, valid_BxG=valid, variant=v))(variants)
  return (egpo.advantages, egpo.weights,
          adv_lib.grpo_advantages(rewards, valid_BxG=valid).advantages,
          adv_lib.rloo_advantages(rewards, valid_BxG=valid).advantages,
          adv_lib.edge_grpo_advantages(rewards, valid_BxG=valid, shannon_BxG=entropy,
                                       clamp=(0.5, 2.0)).advantages)


@pytest.fixture(scope="module")
def split_batch():
  rewards, entropy, correct, valid = _batch(2, shaped=True)
  variants = stacked_presets()
  full = jax.jit(_all_estimators)(rewards, entropy, correct, valid, variants)
  return (rewards, entropy, correct, valid, variants), full


def test_pmap_over_prompts_matches(split_batch, num_devices):
  (rewards, entropy, correct, valid, variants), full = split_batch
  split = lambda x: x.reshape(num_devices, -1, x.shape[-1])  # noqa: E731
  out = jax.pmap(_all_estimators, in_axes=(0, 0, 0, 0, None))(
      split(rewards), split(entropy), split(correct), split(valid), variants)
  for got, want in zip(out, full):
    got = np.moveaxis(np.asarray(got), 0, -3) if got.ndim == 4 else np.asarray(got)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-6, atol=1e-6)


def test_shard_map_over_prompts_matches(split_batch, num_devices):
  (rewards, entropy, correct, valid, variants), full = split_batch
  mesh = jax.make_mesh((num_devices,), ("b",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  p = jax.sharding.PartitionSpec
  fn = jax.shard_map(
      _all_estimators, mesh=mesh, in_specs=(p("b"), p("b"), p("b"), p("b"), p()),
      out_specs=(p(None, "b"), p(None, "b"), p("b"), p("b"), p("b")))
  with jax.set_mesh(mesh):
    out = jax.jit(fn)(rewards, entropy, correct, valid, variants)
  for got, want in zip(out, full):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
