"""The registries are the only dispatch: a newly registered estimator, policy loss or
reward function is one function plus its config. Its own hyperparameters come from the
config by parameter name (`registry.call` passes what the signature declares: algo.*,
loss.*, task.*), and the reward function the config names is the one the task calls."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from egpo_jax import rewards
from egpo_jax.core import advantages, registry
from egpo_jax.models import transformer
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import get_config
from egpo_jax.training import config as config_lib
from egpo_jax.training import iteration, tasks, update
from egpo_jax.types import RolloutBatch
from experiments.configs import tiny

REWARDS = jnp.array([[1., -1., -1., 1.], [1., 1., -1., -1.]])


@pytest.fixture
def scratch():
  """A decorator maker, register(reg, name), for one test; the names are removed after."""
  added = []

  def register(reg, name):
    def decorator(fn):
      reg.register(name)(fn)
      added.append((reg, name))
      return fn
    return decorator
  yield register
  for reg, name in added:
    reg.unregister(name)


def _config(**fields) -> ml_collections.ConfigDict:
  """tiny's config with `fields` ({'algo.adv_scale': 3.0}) set, new leaves included."""
  d = tiny.get_config().to_dict()
  for name, value in fields.items():
    section, leaf = name.split(".")
    d[section][leaf] = value
  return ml_collections.ConfigDict(d)


def _settings(c):
  return config_lib.iteration_settings(config_lib.checked(c), eos_ids=(1,), pad_id=0,
                                       delimiter_ids=None)


def test_call_passes_only_the_declared_keywords():
  def fn(x, *, a=1, b=2):
    return x, a, b
  assert registry.call(fn, 0, a=5, c=7, z=9) == (0, 5, 2)
  assert registry.call(lambda x, **kw: sorted(kw), 0, a=1, b=2) == ["a", "b"]
  assert registry.hyperparameters(fn) == {"a": 1, "b": 2}


def test_a_new_estimator_gets_its_own_hyperparameter_from_the_config(scratch):
  @scratch(registry.advantage_estimators, "scaled_grpo")
  def scaled_grpo(rewards_BxG, *, valid_BxG=None, adv_scale=1.0):
    out = advantages.grpo_advantages(rewards_BxG, valid_BxG=valid_BxG)
    return out._replace(advantages=adv_scale * out.advantages)

  c = _config(**{"algo.advantage": "scaled_grpo", "algo.adv_scale": 3.0})
  config_lib.validate(c)
  settings = _settings(c)
  assert settings.advantage_hparams == (("adv_scale", 3.0),)
  want = 3.0 * advantages.grpo_advantages(REWARDS).advantages
  for fn in (iteration.compute_advantages, jax.jit(iteration.compute_advantages,
                                                     static_argnums=(6,))):
    got = fn(REWARDS, REWARDS > 0, None, None, None, iteration.AlgoArrays.create(), settings)
    np.testing.assert_allclose(got.advantages, want, rtol=1e-6)
  # Only the chosen estimator's own parameters are fields; a typo is still refused.
  with pytest.raises(config_lib.ConfigError, match="config.algo.adv_scalee: there is no"):
    config_lib.validate(_config(**{"algo.advantage": "scaled_grpo", "algo.adv_scalee": 3.0}))
  with pytest.raises(config_lib.ConfigError, match="config.algo.adv_scale: there is no"):
    config_lib.validate(_config(**{"algo.adv_scale": 3.0}))   # egpo has no adv_scale


def test_a_new_loss_needs_no_ppo_signature_and_gets_its_hyperparameter(scratch):
  @scratch(registry.policy_losses, "scaled_pg")
  def scaled_pg(logps_NxT, old_logps_NxT, adv_N, mask_NxT, *, loss_scale=1.0):
    ratio = jnp.exp(logps_NxT - jax.lax.stop_gradient(old_logps_NxT))
    loss = -loss_scale * jnp.sum(ratio * adv_N[:, None] * mask_NxT) / mask_NxT.sum()
    return loss, {"pg_loss": loss}

  c = _config(**{"loss.name": "scaled_pg", "loss.loss_scale": 2.0})
  config_lib.validate(c)
  with_scale = config_lib.update_settings(config_lib.checked(c))
  assert with_scale.loss_hparams == (("loss_scale", 2.0),)
  plain = config_lib.update_settings(config_lib.checked(_config(**{"loss.name": "scaled_pg"})))
  model = get_config("tiny")
  params = transformer.init_params(model, jax.random.PRNGKey(0))
  n, p, t = 4, 3, 5
  ids = jax.random.randint(jax.random.PRNGKey(1), (n, p + t), 3, 200)
  batch = RolloutBatch(
      prompt_ids_NxP=ids[:, :p], prompt_mask_NxP=jnp.ones((n, p), bool),
      completion_ids_NxT=ids[:, p:], completion_mask_NxT=jnp.ones((n, t), bool),
      old_logps_NxT=jnp.full((n, t), -5.0), adv_N=jnp.array([1., -1., 0.5, -0.5]),
      ref_logps_NxT=jnp.zeros((n, t)), is_weights_NxT=jnp.ones((n, t)))
  micro_loss = update._micro_loss   # pylint: disable=protected-access
  losses = [micro_loss(params, batch, n * t, n, model_config=model, settings=s)[0]
            for s in (with_scale, plain)]
  assert float(losses[1]) != 0.0
  np.testing.assert_allclose(float(losses[0]), 2.0 * float(losses[1]), rtol=1e-6)


def test_the_task_calls_the_registered_reward_function(scratch, tmp_path):
  seen = []

  def odd_length(responses, references, *, parity=0):
    seen.append((list(responses), list(references)))
    correct = np.array([len(r) % 2 == 1 - parity for r in responses])
    return rewards.RewardOutput(correct, rewards.rewards_from_correct(correct),
                                ["len"] * len(responses))
  scratch(registry.reward_functions, "odd_length")(odd_length)
  data = tmp_path / "train.jsonl"
  data.write_text("".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
                          for i in range(4)))
  c = config_lib.with_overrides(tiny.get_config(), {
      "task.name": "jsonl", "task.train_file": str(data), "task.reward": "odd_length",
      "rollout.prompts_per_batch": 2, "warmup.steps": 0})
  config_lib.validate(c)
  tok = ByteTokenizer()
  ids = np.array([tok.encode("abc"), tok.encode("abd")])
  mask = np.array([[1, 1, 1], [1, 1, 0]], bool)   # the second response is "ab"
  task = tasks.JsonlTask(c, tok, seed=0, shard_index=0, shard_count=1)
  np.testing.assert_array_equal(task.score(ids, mask, ["x", "y"]), [True, False])
  assert seen == [(["abc", "ab"], ["x", "y"])]
  # Its own hyperparameter, from config.task by name.
  d = c.to_dict()
  d["task"]["parity"] = 1
  c = ml_collections.ConfigDict(d)
  config_lib.validate(c)
  task = tasks.JsonlTask(c, tok, seed=0, shard_index=0, shard_count=1)
  np.testing.assert_array_equal(task.score(ids, mask, ["x", "y"]), [False, True])
