"""A prompt table of E < B entries (`ContinuousSpec.table_entries`): entries are freed as
their prompt's G responses finish and the next prompt is prefilled into them inside the
decode loop. Checked: bit-identity whatever E, queue order, chunking and attention path
bound; the FIFO schedule once E covers the open prompts; the refused queues."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.scenarios.rollout_lengths import fifo_simulation
from egpo_jax.sampling import continuous, engine
from tests.sampling.test_continuous import (CAPS, CONFIG, EOS, G, PROMPT_IDS_B, _fields,
                                            _run, _spec, _teacher_forced_logits, params,
                                            prompts)
from tests.sampling.test_sampler import LOGP_ATOL


@pytest.fixture(scope="module")
def two_entries(params, prompts):
  return _run(params, prompts, caps_N=CAPS, eos=EOS, spec_kwargs=dict(table_entries=2))


def _group_order(seed):
  """A queue that keeps each prompt's responses together (one open prompt at a time),
  prompts and samples shuffled."""
  rs = np.random.default_rng(seed)
  b = len(CAPS) // G
  return np.concatenate([p * G + rs.permutation(G) for p in rs.permutation(b)])


def test_bit_identical_whatever_entries_order_and_chunks(params, prompts, two_entries):
  runs = [_run(params, prompts, caps_N=CAPS, eos=EOS, spec_kwargs=dict(table_entries=1)),
          _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=_group_order(0),
               spec_kwargs=dict(table_entries=3)),
          _run(params, prompts, caps_N=CAPS, eos=EOS, order_N=_group_order(1),
               chunk_steps=4, on_finished=lambda *a: None,
               spec_kwargs=dict(table_entries=2))]
  assert not np.array_equal(runs[1].finish_step_N, two_entries.finish_step_N)
  for out in runs:
    for got, want in zip(_fields(out), _fields(two_entries)):
      np.testing.assert_array_equal(got, want)


def test_equals_whole_table_and_teacher_forcing(params, prompts, two_entries):
  """The one-prompt prefill differs from the batched one by float rounding only: same
  tokens here, log-probs within LOGP_ATOL of the whole-table run and of teacher forcing."""
  ids, mask = prompts
  whole = _run(params, prompts, caps_N=CAPS, eos=EOS)
  np.testing.assert_array_equal(two_entries.completion_ids_NxT, whole.completion_ids_NxT)
  np.testing.assert_array_equal(two_entries.lengths_N, whole.lengths_N)
  np.testing.assert_allclose(two_entries.logps_NxT, whole.logps_NxT, atol=LOGP_ATOL)
  logp = jax.nn.log_softmax(_teacher_forced_logits(params, ids, mask, two_entries), -1)
  want = np.take_along_axis(np.asarray(logp), two_entries.completion_ids_NxT[..., None],
                            -1)[..., 0]
  valid = two_entries.completion_mask_NxT
  np.testing.assert_allclose(two_entries.logps_NxT[valid], want[valid], atol=LOGP_ATOL)


def test_schedule_fifo_once_entries_cover_open_prompts(params, prompts):
  """Without stop tokens: 3 entries for 5 slots (a prompt's 4 responses plus the next
  prompt's) run the FIFO simulation's steps; 1 entry makes slots wait for the next prompt
  (more steps, every token still emitted); with bounded attention too."""
  steps, _ = fifo_simulation(CAPS, 5)
  three = _run(params, prompts, caps_N=CAPS,
               spec_kwargs=dict(table_entries=3, decode_attention="bounded",
                                attention_block=4))
  one = _run(params, prompts, caps_N=CAPS, spec_kwargs=dict(table_entries=1))
  assert int(three.num_steps) == steps and int(one.num_steps) > steps
  for out in (three, one):
    assert int(out.busy_slot_steps) == CAPS.sum()
    np.testing.assert_array_equal(out.lengths_N, CAPS)


def test_pure_rollout_under_jit_equals_generate(params, prompts, two_entries):
  ids, mask = prompts
  bucket = engine.bucket_length(ids.shape[1])
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  fn = jax.jit(functools.partial(continuous.rollout, config=CONFIG,
                                 spec=_spec(5, EOS, dict(table_entries=2))))
  out = jax.device_get(fn(params, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1),
                          jnp.asarray(PROMPT_IDS_B), jnp.asarray(CAPS),
                          jnp.arange(len(CAPS))))
  for got, want in zip(_fields(out), _fields(two_entries)):
    np.testing.assert_array_equal(got, want)


def test_max_open_prompts_hand_computed():
  # G = 2: prompts 0 (responses 0, 1) and 1 (2, 3).
  assert continuous.max_open_prompts(np.array([0, 1, 2, 3]), 2) == 1
  assert continuous.max_open_prompts(np.array([0, 2, 1, 3]), 2) == 2
  assert continuous.max_open_prompts(np.array([0, 2, 3, 1]), 2) == 2
  assert continuous.max_open_prompts(np.array([3, 1, 2, 0]), 2) == 2


def test_refuses_queue_with_more_open_prompts_than_entries(params, prompts):
  # Round-robin over the 6 prompts: all 6 stay open until the last round.
  order = np.arange(len(CAPS)).reshape(-1, G).T.reshape(-1)
  with pytest.raises(ValueError, match="rollout.table_entries=5"):
    _run(params, prompts, caps_N=CAPS, order_N=order, spec_kwargs=dict(table_entries=5))
  with pytest.raises(ValueError, match="table_entries"):
    _spec(5, spec_kwargs=dict(table_entries=-1))


def test_pure_rollout_stops_on_a_stalled_queue(params, prompts):
  """Without generate's check, a round-robin queue on 2 entries stalls (both entries held
  by prompts whose later responses wait behind a third prompt): the loop stops instead of
  spinning, with the responses it could run finished and the rest not."""
  ids, mask = prompts
  bucket = engine.bucket_length(ids.shape[1])
  pad = ((0, 0), (bucket - ids.shape[1], 0))
  order = jnp.arange(len(CAPS)).reshape(-1, G).T.reshape(-1)
  fn = jax.jit(functools.partial(continuous.rollout, config=CONFIG,
                                 spec=_spec(5, EOS, dict(table_entries=2))))
  out = jax.device_get(fn(params, np.pad(ids, pad), np.pad(mask, pad), jax.random.key(1),
                          jnp.asarray(PROMPT_IDS_B), jnp.asarray(CAPS), order))
  done = out.lengths_N > 0
  # Prompts 0 and 1 took the entries; only their first responses (places 0, 1) ran.
  np.testing.assert_array_equal(np.flatnonzero(done), [0, G])
