"""Per-record response caps in the update's rewards and masks: DAPO's overlong penalty
measures each response against its own cap (T where there is none), and a response that
ran to its own cap without a stop token counts as truncated (DAPO's overlong filter,
loss.mask_truncated, leaves it out), as one that ran to T does."""

import functools

import jax
import jax.numpy as jnp
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


def _settings(t, buffer, g=1, b=5, eos=(), **kw):
  spec = engine.SamplingSpec(group_size=g, max_new_tokens=t, eos_ids=eos)
  return iteration.IterationSettings(prompts_per_batch=b, sampling=spec,
                                     update=update.UpdateSettings(), overlong_buffer=buffer,
                                     **kw)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_overlong_penalty_uses_each_responses_cap_hand_computed(jit):
  # T = 8, buffer 4. Own caps: L_i = cap_i, C_i = min(4, cap_i); penalty 0 up to
  # L_i - C_i, then ((L_i - C_i) - len) / C_i, -1 from L_i on.
  settings = _settings(8, 4)
  correct = jnp.array([True, True, False, True, False])
  lengths = jnp.array([8, 6, 4, 2, 2])
  caps = jnp.array([8, 6, 6, 3, 8])
  fn = iteration.shaped_rewards
  if jit:
    fn = jax.jit(fn, static_argnums=2)
  # cap 8: 8 -> -1 | cap 6: 6 at its cap -> -1 | cap 6: (2 - 4) / 4 = -0.5 |
  # cap 3 < buffer: C = 3, (0 - 2) / 3 | cap 8: 2 <= 4 -> 0.
  np.testing.assert_allclose(fn(correct, lengths, settings, None, caps),
                             [1 - 1, 1 - 1, -1 - 0.5, 1 - 2 / 3, -1 + 0], rtol=1e-6)
  # Without caps every response is measured against T = 8 (free up to 4).
  want_t = [1 - 1, 1 - 0.5, -1 + 0, 1 + 0, -1 + 0]
  np.testing.assert_allclose(fn(correct, lengths, settings), want_t, rtol=1e-6)
  np.testing.assert_allclose(fn(correct, lengths, settings, None, jnp.full((5,), 8)),
                             want_t, rtol=1e-6)
  # The per-run switch still turns the penalty off.
  np.testing.assert_allclose(fn(correct, lengths, settings, jnp.asarray(False), caps),
                             [1, 1, -1, 1, -1])


def test_group_batch_carries_caps_into_the_group_rewards():
  settings = _settings(8, 4, g=2, b=2)
  n, t = 4, 8
  gen = engine.Generation(
      completion_ids_NxT=jnp.zeros((n, t), jnp.int32),
      completion_mask_NxT=jnp.arange(t)[None] < jnp.array([6, 6, 3, 8])[:, None],
      logps_NxT=jnp.zeros((n, t)), entropy_NxT=None, lengths_N=jnp.array([6, 6, 3, 8]),
      truncated_N=jnp.array([True, False, True, True]), num_steps=jnp.int32(8))
  caps = jnp.array([6, 6, 3, 3])   # prompt 0 capped at 6, prompt 1 at 3
  groups = jax.jit(functools.partial(iteration.group_batch, settings=settings))(
      jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool), gen,
      jnp.array([True, False, True, False]), caps_N=caps)
  # 6 at cap 6 -> -1 each; 3 at cap 3 -> -1; 8 over cap 3 -> -1.
  np.testing.assert_allclose(groups.rewards, [[0, -2], [0, -2]])


def _prompts(rng, b, caps_B=None):
  del rng
  ids = np.tile(np.arange(10, 14, dtype=np.int32), (b, 1))
  answers = ["a", "b", "c", "d"][:b]
  return (ids, np.ones((b, 4), bool), answers) + (() if caps_B is None else (caps_B,))


def _score(ids, mask, answers):
  return np.asarray([a in "ab" for a in answers])


@pytest.fixture(scope="module")
def state():
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  return TrainState.create(params, OPT.init(params))


def test_host_loop_rewards_measure_each_record_against_its_cap(state):
  """Host mode: with no stop token every response runs to its own cap (3, T, 5, T), so
  every one is at its L_max and punished -1; measured against T the capped ones (3 and
  5 <= T - buffer = 8) would go unpunished. They are truncated, as at T."""
  t, g = 12, 2
  settings = _settings(t, 4, g=g, b=4)
  rollout = continuous.HostRollout(CFG, continuous.ContinuousSpec(settings.sampling,
                                                                  slots=3), chunk_steps=4)
  caps_B = np.array([3, t, 5, t], np.int32)
  run = lambda caps: host_loop.host_iteration(   # noqa: E731
      state, jax.random.PRNGKey(1), iteration.AlgoArrays.create("egpo"),
      task=host_loop.HostTask(functools.partial(_prompts, caps_B=caps), _score),
      model_config=CFG, optimizer=OPT, settings=settings, rollout=rollout)[1]
  capped = run(caps_B)
  # +1 +1 -1 -1 per prompt, each response -1: mean (0 + 0 - 2 - 2) / 4.
  np.testing.assert_allclose(capped["reward"], -1.0, rtol=1e-6)
  assert capped["truncation_rate"] == 1.0
  assert capped["response_length"] == np.mean(np.repeat(caps_B, g))
  # No caps: every response runs to T = 12 and is punished -1 too; rewards agree, lengths
  # do not.
  uncapped = run(None)
  np.testing.assert_allclose(uncapped["reward"], -1.0, rtol=1e-6)
  assert uncapped["response_length"] == t


def test_a_response_at_its_own_cap_is_truncated_and_filtered(state):
  """The continuous engine marks a response that reached its own cap without a stop
  token truncated; with loss.mask_truncated prepare_batch drops exactly those rows (and
  those that reached T), and keeps the ones that stopped."""
  t, g, b = 8, 4, 4
  # Many stop ids (a fifth of the vocabulary), so that some responses stop before their
  # caps and others reach them.
  eos = tuple(range(3, 103))
  settings = _settings(t, 2, g=g, b=b, eos=eos, mask_truncated=True, advantage="grpo")
  rollout = continuous.HostRollout(CFG, continuous.ContinuousSpec(settings.sampling,
                                                                  slots=5))
  ids, mask, _ = _prompts(None, b)
  caps_N = np.repeat(np.array([2, 3, t, 5], np.int32), g)
  gen = rollout(state.params, ids, mask, jax.random.PRNGKey(7), caps_N=caps_N)
  lengths = np.asarray(gen.lengths_N)
  last = np.asarray(gen.completion_ids_NxT)[np.arange(b * g), lengths - 1]
  stopped = np.isin(last, eos)
  truncated = np.asarray(gen.truncated_N)
  np.testing.assert_array_equal(truncated, ~stopped & (lengths == caps_N))
  assert (lengths <= caps_N).all()
  # The case in question occurs, next to stopped responses.
  assert (truncated & (caps_N < t)).any() and stopped.any(), (lengths, stopped)
  correct = jnp.asarray(np.arange(b * g) % 2 == 0)
  groups = iteration.group_batch(jnp.asarray(ids), jnp.asarray(mask), gen, correct, settings,
                                 caps_N=jnp.asarray(caps_N))
  batch, metrics = iteration.prepare_batch(None, None, groups, iteration.AlgoArrays.create(),
                                           model_config=CFG, settings=settings)
  np.testing.assert_array_equal(np.asarray(batch.completion_mask_NxT).any(-1), ~truncated)
  assert np.all(np.asarray(batch.adv_N)[truncated] == 0)
  np.testing.assert_allclose(metrics["truncation_rate"], truncated.mean())
