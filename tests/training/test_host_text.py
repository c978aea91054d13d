"""Host mode on the decoded text: stop strings cut and re-mask responses, the reasoning
delimiter is found on the text even where BPE merged it with a neighbour, and a high
fallback rate warns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core import entropy
from egpo_jax.models import transformer
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import engine
from egpo_jax.training import host_loop, iteration, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import TrainState

BYTES = ByteTokenizer()


def _ids(texts, t):
  rows = [BYTES.encode(x) for x in texts]
  out = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, np.array([len(r) for r in rows])


def test_stop_lengths_keep_the_token_that_completes_the_stop_string():
  ids, lengths = _ids(["abc STOP def", "no stop here", "xSTOPySTOP", "é STOP"], 16)
  got = host_loop.stop_lengths(ids, lengths, BYTES.decode, ("STOP", "zz"))
  # "é" is two bytes: the cut counts tokens, not characters.
  np.testing.assert_array_equal(got, [8, 12, 5, 7])


# A BPE-like vocabulary in which "</think>" can be spelled as one merged piece "x</".
PIECES = ["x</", "think>", "y", "</", "a", "b"]


def _pieces(ids):
  return "".join(PIECES[int(i)] for i in ids)


def test_delimiter_found_on_the_text_where_the_token_match_misses_it():
  ids = np.array([[4, 0, 1, 2, 5], [4, 3, 1, 2, 2], [4, 5, 5, 2, 2]], np.int32)
  lengths = np.array([5, 5, 4])
  spans = host_loop.delimiter_spans(ids, lengths, _pieces, "</think>")
  np.testing.assert_array_equal(spans, [[1, 3], [1, 3], [-1, -1]])
  mask = np.arange(5)[None, :] < lengths[:, None]
  by_text = entropy.segment_mask(ids, mask, segment="answer", span_Nx2=jnp.asarray(spans))
  np.testing.assert_array_equal(by_text.mask_NxT[0], [0, 0, 0, 1, 1])
  # The token match of the delimiter's own encoding ("</", "think>") misses row 0.
  by_ids = entropy.segment_mask(ids, mask, segment="answer", delimiter=(3, 1))
  assert bool(by_ids.fallback_N[0]) and not bool(by_text.fallback_N[0])
  np.testing.assert_array_equal(by_ids.mask_NxT[1], by_text.mask_NxT[1])
  assert list(np.asarray(by_text.fallback_N)) == [False, False, True]


def test_cut_masks_pads_and_zeroes_the_log_probs_after_the_stop():
  n, t = 2, 6
  gen = engine.Generation(
      completion_ids_NxT=jnp.arange(n * t, dtype=jnp.int32).reshape(n, t) + 10,
      completion_mask_NxT=jnp.array([[1] * 6, [1, 1, 1, 0, 0, 0]], bool),
      logps_NxT=-jnp.ones((n, t)), entropy_NxT=None, lengths_N=jnp.array([6, 3], jnp.int32),
      truncated_N=jnp.array([True, False]), num_steps=jnp.int32(6))
  cut = host_loop._cut(  # pylint: disable=protected-access
      gen, jnp.array([2, 3], jnp.int32), jnp.int32(0))
  np.testing.assert_array_equal(cut.completion_mask_NxT[0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(cut.completion_ids_NxT[0], [10, 11, 0, 0, 0, 0])
  np.testing.assert_array_equal(cut.logps_NxT[0], [-1, -1, 0, 0, 0, 0])
  np.testing.assert_array_equal(cut.lengths_N, [2, 3])
  np.testing.assert_array_equal(cut.truncated_N, [False, False])   # row 0 stopped
  np.testing.assert_array_equal(cut.completion_mask_NxT[1], gen.completion_mask_NxT[1])


CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
SPEC = engine.SamplingSpec(group_size=4, max_new_tokens=8, eos_ids=(2,))


@pytest.mark.slow
def test_host_iteration_verifies_and_trains_on_the_cut_responses():
  """The same rollout with a stop string taken from it: every response that contains it
  is scored and trained up to it; with a delimiter that never occurs, a warning."""
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  state = TrainState.create(params, OPT.init(params))
  settings = iteration.IterationSettings(
      prompts_per_batch=2, sampling=SPEC, update=update.UpdateSettings(),
      entropy_segment="answer", segment_delimiter=(300, 301))
  seen = []

  def sample(rng, b):
    del rng
    return np.full((b, 3), 50, np.int32), np.ones((b, 3), bool), ["1"] * b

  def score(ids, mask, answers):
    seen.append([BYTES.decode(i[m.astype(bool)].tolist(), skip_special_tokens=False)
                 for i, m in zip(ids, mask)])
    return np.zeros(len(answers), bool)

  decode = lambda ids: BYTES.decode(list(ids), skip_special_tokens=False)
  rng = jax.random.PRNGKey(4)
  algo = iteration.AlgoArrays.create("egpo")
  with pytest.warns(host_loop.SegmentFallbackWarning, match="no reasoning delimiter"):
    _, plain = host_loop.host_iteration(
        state, rng, algo, task=host_loop.HostTask(sample, score, decode=decode,
                                                  delimiter_text="never-there"),
        model_config=CFG, optimizer=OPT, settings=settings)
  texts = seen.pop()
  stop = texts[0][2:4] or texts[0]
  with pytest.warns(host_loop.SegmentFallbackWarning):
    _, cut = host_loop.host_iteration(
        state, rng, algo, task=host_loop.HostTask(sample, score, decode=decode,
                                                  stop_strings=(stop,),
                                                  delimiter_text="never-there"),
        model_config=CFG, optimizer=OPT, settings=settings)
  for full, short in zip(texts, seen.pop()):
    if stop in full:
      assert short.endswith(stop[-1]) and stop in short and full.startswith(short)
      assert stop not in short[:-1]
    else:
      assert short == full
  assert cut["response_length"] < plain["response_length"]
