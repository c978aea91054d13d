"""Host mode on continuous batching (`continuous.HostRollout` in `host_loop.host_iteration`):
finished responses are verified while decoding continues (a deliberately slow verifier:
the iteration's rollout + verification takes less than the two in sequence, with the same
rewards), prompts are cut to their length bucket, and the length-bucketed update runs."""

import time

import jax
import numpy as np
import pytest

from egpo_jax.models import transformer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import host_loop, iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import TrainState

CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
B, G, T, WIDTH = 8, 4, 256, 40       # prompts padded to 40 columns, at most 12 tokens long
SLEEP_PER_RESPONSE = 0.003


def _sample(rng, b):
  rs = np.random.RandomState(int(jax.random.randint(rng, (), 0, 1000)))
  lengths = rs.randint(4, 13, size=b)
  ids = rs.randint(3, 300, size=(b, WIDTH)).astype(np.int32)
  mask = (np.arange(WIDTH)[None] >= (WIDTH - lengths)[:, None]).astype(np.int32)
  return ids * mask, mask, list(ids[:, -1] % 7)


def _score(ids, mask, answers):
  """Slow (sleeps per response, holding no CPU), deterministic."""
  time.sleep(SLEEP_PER_RESPONSE * len(answers))
  return np.array([bool(m.any()) and int(i[0]) % 7 == a for i, m, a in
                   zip(ids, mask, answers)])


class _NoStream:
  """The same engine, verified after the rollout (the sequential baseline)."""
  streams = False

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, *args, **kwargs):
    return self.inner(*args, **kwargs)


def _settings(length_buckets=0):
  spec = engine.SamplingSpec(group_size=G, max_new_tokens=T, eos_ids=(5, 9))
  return iteration.IterationSettings(
      prompts_per_batch=B, sampling=spec,
      update=update.UpdateSettings(micro_batches=2, length_buckets=length_buckets))


@pytest.fixture(scope="module")
def state():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  return TrainState.create(params, OPT.init(params))


def test_streaming_verification_overlaps_decoding(state):
  settings = _settings()
  # One slot decodes 32 responses of up to 256 tokens one after the other (thousands of
  # steps), handing finished ones to the verifier every 128 steps: the rollout outlasts
  # the verification, which can then hide behind it.
  rollout = continuous.HostRollout(CFG, continuous.ContinuousSpec(settings.sampling, slots=1),
                                   chunk_steps=128)
  task = host_loop.HostTask(_sample, _score)
  algo = iteration.AlgoArrays.create("egpo")
  run = lambda r: host_loop.host_iteration(state, jax.random.PRNGKey(3), algo, task=task,
                                           model_config=CFG, optimizer=OPT,
                                           settings=settings, rollout=r)
  run(rollout)                  # compiles both paths' pieces (the engine is one jit)
  s_seq, m_seq = run(_NoStream(rollout))
  s_stream, m_stream = run(rollout)
  for key in ("accuracy", "loss", "rollout_tokens"):
    np.testing.assert_allclose(m_stream[key], m_seq[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(s_stream.params), jax.tree.leaves(s_seq.params)):
    np.testing.assert_array_equal(a, b)
  # Sequential verification sleeps B * G * 0.003 = 0.096 s after the rollout (~0.18 s on
  # a 2-core CPU); streamed, most of it runs while the later responses decode, so the
  # streamed iteration's rollout + verification is below its rollout + the whole
  # verification in sequence. Both sides come from the same run: the rollout's time
  # varies with the machine's load from run to run, the verifier's sleep does not.
  sleep = SLEEP_PER_RESPONSE * B * G
  assert m_seq["time_verify"] >= sleep
  assert m_stream["time_verify"] < 0.5 * sleep, (m_stream["time_verify"], sleep)
  assert m_stream["time_verify_hidden"] > 0.5 * sleep, (m_stream["time_verify_hidden"], sleep)
  # Prompts of <= 12 tokens in 40 columns: decoded at the 16-token bucket.
  assert m_stream["prompt_bucket"] == 16
  assert 0 < m_stream["slot_utilisation"] <= 1


def test_host_iteration_with_bucketed_update(state):
  settings = _settings(length_buckets=4)
  rollout = continuous.HostRollout(CFG, continuous.ContinuousSpec(settings.sampling, slots=8))
  _, m = host_loop.host_iteration(
      state, jax.random.PRNGKey(4), iteration.AlgoArrays.create("egpo"),
      task=host_loop.HostTask(_sample, lambda i, m, a: np.zeros(len(a), bool) | (
          np.asarray([x[0] for x in i]) % 2 == 0)),
      model_config=CFG, optimizer=OPT, settings=settings, rollout=rollout)
  assert np.isfinite(m["loss"])
  assert m["padding_fraction"] < m["padding_fraction_untrimmed"]


@pytest.mark.parametrize("overrides, match", [
    ({"rollout.slots": 8}, "^config.rollout.slots=8: .*host mode only"),
    ({"ppo.length_buckets": 4}, "^config.ppo.length_buckets=4: .*host mode only"),
])
def test_config_refuses_continuous_batching_outside_host_mode(overrides, match):
  from experiments.configs import default
  from egpo_jax.training import config as config_lib
  c = config_lib.with_overrides(default.get_config(), overrides)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, inputs_exist=False)
