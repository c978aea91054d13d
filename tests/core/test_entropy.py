"""Tests of egpo_jax.core.entropy: Eq. 5, Shannon entropy, segment masks and fallbacks."""

import functools

import chex
import egpo_numpy_reference as ref
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.core import entropy as ent

PAD = 0
THINK_END = (7, 8, 9)  # a three-token "</think>"


# ---------------------------------------------------------------- Eq. 5


def test_entropy_proxy_hand_computed():
  logps = jnp.array([[-0.5, -1.5, -1.0, -9.0],   # 3 valid tokens: (0.5+1.5+1.0)/3 = 1
                     [-0.2, -9.0, -9.0, -9.0],   # 1 valid token: 0.2
                     [-3.0, -3.0, -3.0, -3.0]])  # none valid: 0 by convention
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(ent.entropy_proxy(logps, mask), [1.0, 0.2, 0.0], rtol=1e-6)
  # A bool mask and NaN at masked positions give the same answer.
  logps_nan = logps.at[0, 3].set(jnp.nan)
  np.testing.assert_allclose(ent.entropy_proxy(logps_nan, mask.astype(bool)),
                             [1.0, 0.2, 0.0], rtol=1e-6)
  assert ent.entropy_proxy(logps.astype(jnp.bfloat16), mask).dtype == jnp.float32


def test_masked_sequence_mean_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same"):
    ent.masked_sequence_mean(jnp.zeros((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[N, T\]"):
    ent.masked_sequence_mean(jnp.zeros(3), jnp.ones(3))


# ---------------------------------------------------------------- Shannon entropy


def test_token_entropy_matches_reference_with_masked_vocab():
  rng = np.random.default_rng(0)
  logits = rng.normal(0.0, 3.0, (2, 3, 7)).astype(np.float32)
  logits[0, 0, :3] = -np.inf  # masked vocabulary entries
  logits[0, 1, :] = -np.inf  # everything masked -> 0 by convention
  logits[1, 2, :] = 0.0  # uniform -> log V
  logits[1, 0, 0] = 80.0  # near one-hot, large logits must not overflow
  got = jax.jit(ent.token_entropy)(logits)
  assert got.dtype == jnp.float32 and got.shape == (2, 3)
  np.testing.assert_allclose(got, ref.token_entropy(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1, 2], np.log(7), rtol=1e-6)
  assert got[0, 1] == 0.0
  grad = jax.jit(jax.grad(lambda x: jnp.sum(ent.token_entropy(x))))(logits)
  assert np.all(np.isfinite(grad))


def test_token_entropy_bfloat16_input_is_float32():
  logits = jnp.linspace(-2.0, 2.0, 11, dtype=jnp.bfloat16)
  got = ent.token_entropy(logits)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.token_entropy(np.asarray(logits, np.float32)),
                             rtol=1e-5)


# ---------------------------------------------------------------- segments


def _seg_all(ids, mask, delimiter=THINK_END):
  return {s: ent.segment_mask(jnp.asarray(ids), jnp.asarray(mask), segment=s,
                              delimiter=delimiter)
          for s in ent.SEGMENTS}


def _row(tokens, t=12):
  ids = np.full((t,), PAD, np.int32)
  ids[:len(tokens)] = tokens
  return ids, np.arange(t) < len(tokens)


def _check(seg, thinking, answer, fb_thinking, fb_answer):
  np.testing.assert_array_equal(seg["thinking"].mask_NxT[0], thinking)
  np.testing.assert_array_equal(seg["answer"].mask_NxT[0], answer)
  assert bool(seg["thinking"].fallback_N[0]) == fb_thinking
  assert bool(seg["answer"].fallback_N[0]) == fb_answer
  assert not bool(seg["joint"].fallback_N[0])


def test_segments_delimiter_present_multi_token():
  # think: 3 4 5 | delimiter 7 8 9 | answer: 6 2 (2 = EOS) | padding
  ids, mask = _row([3, 4, 5, 7, 8, 9, 6, 2])
  seg = _seg_all(ids[None], mask[None])
  _check(seg, np.arange(12) < 3, (np.arange(12) >= 6) & mask, False, False)
  np.testing.assert_array_equal(seg["joint"].mask_NxT[0], mask)


def test_segments_delimiter_absent_falls_back_and_is_counted():
  ids, mask = _row([3, 4, 7, 8, 5, 6])  # a truncated response: "</think>" never closes
  seg = _seg_all(ids[None], mask[None])
  _check(seg, mask, mask, True, True)


def test_segments_delimiter_at_the_very_end_empties_the_answer():
  ids, mask = _row([3, 4, 5, 7, 8, 9])
  seg = _seg_all(ids[None], mask[None])
  _check(seg, np.arange(12) < 3, mask, False, True)


def test_segments_delimiter_at_the_start_empties_the_thinking():
  ids, mask = _row([7, 8, 9, 6, 6, 2])
  seg = _seg_all(ids[None], mask[None])
  _check(seg, mask, (np.arange(12) >= 3) & mask, True, False)


def test_segments_ignore_delimiter_in_padding_and_use_the_first_occurrence():
  # The delimiter's last token falls in the padding: not found.
  ids, mask = _row([3, 4, 7, 8])
  ids[4] = 9
  seg = _seg_all(ids[None], mask[None])
  _check(seg, mask, mask, True, True)
  # Two occurrences: the first splits; the second belongs to the answer.
  ids, mask = _row([3, 7, 8, 9, 5, 7, 8, 9, 6])
  seg = _seg_all(ids[None], mask[None])
  _check(seg, np.arange(12) < 1, (np.arange(12) >= 4) & mask, False, False)


def test_segments_single_token_delimiter_as_int_or_traced_array():
  ids, mask = _row([3, 4, 7, 5, 2])
  expected_answer = (np.arange(12) >= 3) & mask
  seg = ent.segment_mask(ids[None], mask[None], segment="answer", delimiter=7)
  np.testing.assert_array_equal(seg.mask_NxT[0], expected_answer)
  fn = jax.jit(functools.partial(ent.segment_mask, segment="answer"))
  seg = fn(ids[None], mask[None], delimiter=jnp.array([7]))
  np.testing.assert_array_equal(seg.mask_NxT[0], expected_answer)


def test_segments_empty_rows_are_not_fallbacks_and_fallback_count_sums():
  rows = [_row([3, 7, 8, 9, 5]), _row([3, 4]), _row([])]
  ids = np.stack([r[0] for r in rows])
  mask = np.stack([r[1] for r in rows])
  seg = _seg_all(ids, mask)
  np.testing.assert_array_equal(seg["answer"].fallback_N, [False, True, False])
  assert int(jnp.sum(seg["thinking"].fallback_N)) == 1
  assert not np.any(seg["answer"].mask_NxT[2])


def test_segment_entropy_proxy_uses_the_segment():
  ids, mask = _row([3, 4, 7, 8, 9, 6, 2], t=8)
  logps = -np.array([[1.0, 3.0, 9.0, 9.0, 9.0, 0.5, 1.5, 9.0]], np.float32)
  h, fb = ent.segment_entropy_proxy(logps, ids[None], mask[None], segment="thinking",
                                    delimiter=THINK_END)
  np.testing.assert_allclose(h, [2.0])
  np.testing.assert_array_equal(fb, [False])
  h, _ = ent.segment_entropy_proxy(logps, ids[None], mask[None], segment="answer",
                                   delimiter=THINK_END)
  np.testing.assert_allclose(h, [1.0])


def test_segment_bad_arguments_raise():
  ids, mask = _row([3, 4])
  with pytest.raises(ValueError, match="segment must be one of"):
    ent.segment_mask(ids[None], mask[None], segment="reasoning", delimiter=THINK_END)
  with pytest.raises(ValueError, match="delimiter is required"):
    ent.segment_mask(ids[None], mask[None], segment="answer")
  with pytest.raises(ValueError, match="non-empty 1-D"):
    ent.segment_mask(ids[None], mask[None], segment="answer", delimiter=())
  with pytest.raises(ValueError, match="integer token ids"):
    ent.segment_mask(ids[None], mask[None], segment="answer", delimiter=(1.5,))


def _reference_segments(ids, mask, delim):
  """Plain-Python first-occurrence search and the documented fallback rule."""
  out = {}
  n, t = ids.shape
  k = len(delim)
  for name in ("thinking", "answer"):
    seg = np.zeros((n, t), bool)
    fb = np.zeros(n, bool)
    for i in range(n):
      valid = [j for j in range(t) if mask[i, j]]
      start = next((j for j in range(t - k + 1)
                    if all(mask[i, j + q] and ids[i, j + q] == delim[q] for q in range(k))),
                   None)
      if start is not None:
        chosen = [j for j in valid if (j < start if name == "thinking" else j >= start + k)]
      else:
        chosen = []
      if valid and not chosen:
        fb[i], chosen = True, valid
      seg[i, chosen] = True
    out[name] = (seg, fb)
  return out


_segment_jit = jax.jit(lambda ids, mask: {
    s: ent.segment_mask(ids, mask, segment=s, delimiter=(7, 8)) for s in ent.SEGMENTS})


@given(hnp.arrays(np.int32, (4, 10), elements=st.sampled_from([3, 7, 8])),
       st.lists(st.integers(0, 10), min_size=4, max_size=4))
def test_property_segments_match_python_reference(ids, lengths):
  mask = np.arange(10)[None, :] < np.asarray(lengths)[:, None]
  got = _segment_jit(ids, mask)
  want = _reference_segments(ids, mask, (7, 8))
  for name in ("thinking", "answer"):
    np.testing.assert_array_equal(got[name].mask_NxT, want[name][0], err_msg=name)
    np.testing.assert_array_equal(got[name].fallback_N, want[name][1], err_msg=name)
  np.testing.assert_array_equal(got["joint"].mask_NxT, mask)


class EntropyVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_public_functions(self):
    ids, mask = _row([3, 7, 8, 9, 5, 2], t=8)
    logps = -np.linspace(0.1, 0.8, 8, dtype=np.float32)[None]
    proxy = self.variant(ent.entropy_proxy)
    np.testing.assert_allclose(proxy(logps, mask[None]), [np.mean(-logps[0, :6])],
                               rtol=1e-6)
    seg = self.variant(functools.partial(ent.segment_mask, segment="answer",
                                         delimiter=THINK_END))(ids[None], mask[None])
    np.testing.assert_array_equal(seg.mask_NxT[0], (np.arange(8) >= 4) & mask)
    h = self.variant(ent.token_entropy)(np.zeros((2, 5), np.float32))
    np.testing.assert_allclose(h, np.full(2, np.log(5)), rtol=1e-6)
