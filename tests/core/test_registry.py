"""Tests of the name -> function registries and the advantage estimators registered there."""

import numpy as np
import pytest

from egpo_jax.core import advantages as adv_lib
from egpo_jax.core import registry

ESTIMATORS = {
    "grpo": adv_lib.grpo_advantages,
    "dr_grpo": adv_lib.dr_grpo_advantages,
    "rloo": adv_lib.rloo_advantages,
    "edge_grpo": adv_lib.edge_grpo_advantages,
    "egpo": adv_lib.egpo_advantages,
}


@pytest.fixture
def scratch_estimators(monkeypatch):
  """The global registry, restored after the test so registrations do not leak."""
  reg = registry.advantage_estimators
  monkeypatch.setattr(reg, "_table", dict(reg._table))
  return reg


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_is_registered_and_callable_uniformly(name):
  assert name in registry.advantage_estimators
  fn = registry.advantage_estimators.get(name)
  assert fn is ESTIMATORS[name]
  rewards = np.array([[1.0, -1.0, -1.0, 1.0]], np.float32)
  h = np.array([[0.2, 0.4, 0.3, 0.1]], np.float32)
  out = fn(rewards, correct_BxG=rewards > 0, valid_BxG=np.ones((1, 4), bool),
           entropy_BxG=h, shannon_BxG=h)
  assert isinstance(out, adv_lib.AdvantageOutput)
  assert out.advantages.shape == (1, 4) and out.weights.shape == (1, 4)
  assert np.all(np.sign(out.advantages) == np.sign(rewards))


def test_unknown_name_raises_key_error_listing_names():
  with pytest.raises(KeyError) as info:
    registry.advantage_estimators.get("ppo_gae")
  message = str(info.value)
  assert "ppo_gae" in message
  for name in ESTIMATORS:
    assert name in message


def test_user_registered_estimator_is_callable_through_get(scratch_estimators):

  @registry.advantage_estimators.register("grpo_doubled")
  def grpo_doubled(rewards_BxG, **kwargs):
    out = adv_lib.grpo_advantages(rewards_BxG, **kwargs)
    return adv_lib.AdvantageOutput(2.0 * out.advantages, out.weights)

  assert "grpo_doubled" in scratch_estimators.names()
  rewards = np.array([[1.0, -1.0]], np.float32)
  out = registry.advantage_estimators.get("grpo_doubled")(rewards)
  np.testing.assert_allclose(out.advantages,
                             2.0 * adv_lib.grpo_advantages(rewards).advantages)


def test_duplicate_names_raise_unless_overwrite(scratch_estimators):
  with pytest.raises(ValueError, match="already registered"):
    scratch_estimators.register("grpo")(lambda r, **k: None)
  replacement = lambda r, **k: None  # noqa: E731
  scratch_estimators.register("grpo", overwrite=True)(replacement)
  assert scratch_estimators.get("grpo") is replacement


def test_registration_does_not_leak_between_tests():
  assert "grpo_doubled" not in registry.advantage_estimators
  assert registry.advantage_estimators.get("grpo") is adv_lib.grpo_advantages


def test_invalid_registry_names_raise():
  with pytest.raises(ValueError, match="non-empty string"):
    registry.Registry("thing").register("")


def test_requires_is_registration_metadata_checked_against_the_signature():
  assert registry.advantage_estimators.requires("edge_grpo") == ("shannon_BxG",)
  assert registry.advantage_estimators.requires("egpo") == ("entropy_BxG",)
  assert registry.advantage_estimators.requires("grpo") == ()
  reg = registry.Registry("thing")
  with pytest.raises(ValueError, match=r"requires=\['h_BxG'\] are not parameters"):
    reg.register("a", requires=("h_BxG",))(lambda r, *, e_BxG=None: r)
  reg.register("b")(len)
  reg.register("a")(abs)
  assert reg.in_order() == ("b", "a") and reg.names() == ["a", "b"]
  reg.unregister("b")
  assert reg.in_order() == ("a",)
  with pytest.raises(KeyError, match="unknown thing 'b'"):
    reg.unregister("b")
