"""Tests for egpo_jax.sampling.filters: top-k/top-p definition, sampling law, log-probs."""

import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st
from scipy import stats

from egpo_jax.sampling import filters

# Distinct, well separated probabilities: top-p boundaries below never fall on a tie.
_PROBS = np.array([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01])
_PERM = np.array([3, 0, 6, 1, 7, 2, 5, 4])  # tokens not in probability order
_LOGITS_V = np.log(_PROBS[_PERM]).astype(np.float32) + 1.7
_NUM_SAMPLES = 40_000


def _expected(logits, temperature, top_k, top_p, *, off_by_one=False):
  """The target law in numpy: softmax(logits / T), top-k, then top-p (renormalised)."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  if top_k:
    order = order[:top_k]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  cumulative = np.cumsum(p)
  # Correct: keep while the mass strictly BEFORE the token is < top_p (HF, vLLM).
  # Off-by-one: keep while the mass INCLUDING the token is < top_p.
  keep = (cumulative < top_p) if off_by_one else (cumulative - p < top_p)
  keep[0] = True
  out = np.zeros_like(z)
  out[order[keep]] = p[keep] / p[keep].sum()
  return out


@functools.lru_cache(maxsize=None)
def _sampler(temperature, top_k, top_p):
  return jax.jit(functools.partial(filters.sample_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p))


def _draw(temperature, top_k, top_p, seed=0):
  keys = jax.random.split(jax.random.key(seed), _NUM_SAMPLES)
  logits = jnp.broadcast_to(jnp.asarray(_LOGITS_V), (_NUM_SAMPLES, _LOGITS_V.size))
  tokens = np.asarray(_sampler(temperature, top_k, top_p)(keys, logits))
  return np.bincount(tokens, minlength=_LOGITS_V.size)


def _chi2_pvalue(counts, expected_probs):
  """Pearson chi-square p-value; inf-small if a token outside the support is drawn."""
  support = expected_probs > 0
  if counts[~support].sum() > 0:
    return 0.0
  exp = expected_probs[support] * counts.sum()
  return stats.chisquare(counts[support], exp).pvalue


_CONFIGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.0, 0, 0.7),   # keeps 3 tokens; the off-by-one rule keeps 2
    (1.3, 0, 0.8),
    (1.0, 6, 0.6),
]


@pytest.mark.parametrize("temperature,top_k,top_p", _CONFIGS)
def test_empirical_frequencies_match_target_law(temperature, top_k, top_p):
  counts = _draw(temperature, top_k, top_p)
  expected = _expected(_LOGITS_V, temperature, top_k, top_p)
  assert _chi2_pvalue(counts, expected) > 1e-3, (counts, expected * _NUM_SAMPLES)


def test_chi_square_rejects_off_by_one_top_p(monkeypatch):
  # The target law under the off-by-one rule is rejected by our samples ...
  counts = _draw(1.0, 0, 0.7)
  wrong = _expected(_LOGITS_V, 1.0, 0, 0.7, off_by_one=True)
  assert not np.allclose(wrong, _expected(_LOGITS_V, 1.0, 0, 0.7))
  assert _chi2_pvalue(counts, wrong) < 1e-6
  # ... and a sampler with the off-by-one cutoff fails the test the real one passes.
  def inclusive_mask(sorted_logits_xK, top_p):
    probs = jax.nn.softmax(sorted_logits_xK, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) < top_p
    return keep.at[..., 0].set(True)
  monkeypatch.setattr(filters, "top_p_keep_mask", inclusive_mask)
  keys = jax.random.split(jax.random.key(0), _NUM_SAMPLES)
  logits = jnp.broadcast_to(jnp.asarray(_LOGITS_V), (_NUM_SAMPLES, _LOGITS_V.size))
  buggy = np.bincount(np.asarray(filters.sample_tokens(keys, logits, top_p=0.7)),
                      minlength=_LOGITS_V.size)
  assert _chi2_pvalue(buggy, _expected(_LOGITS_V, 1.0, 0, 0.7)) < 1e-6


def test_top_p_keep_mask_hand_computed():
  sorted_logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
  for top_p, kept in [(0.35, 1), (0.65, 2), (0.85, 3), (0.95, 4), (1.0, 4)]:
    np.testing.assert_array_equal(filters.top_p_keep_mask(sorted_logits, top_p),
                                  np.arange(4) < kept, err_msg=f"top_p={top_p}")


def test_filter_logits_hand_computed():
  logits = jnp.array([1.0, 3.0, 2.0, 0.0, -1.0])
  # top-k 3 keeps ids 1, 2, 0.
  out = filters.filter_logits(logits, top_k=3)
  np.testing.assert_array_equal(np.isfinite(out), [True, True, True, False, False])
  np.testing.assert_allclose(out[:3], logits[:3])
  # Over the top-3, p = softmax([3, 2, 1]) = [0.665, 0.245, 0.090]: top-p 0.7 keeps 2.
  out = filters.filter_logits(logits, top_k=3, top_p=0.7)
  np.testing.assert_array_equal(np.isfinite(out), [False, True, True, False, False])
  # Temperature divides the logits that survive.
  out = filters.filter_logits(logits, temperature=0.5, top_k=2)
  np.testing.assert_allclose(out, [-np.inf, 6.0, 4.0, -np.inf, -np.inf])
  # Batched rows are filtered independently.
  both = filters.filter_logits(jnp.stack([logits, -logits]), top_k=1)
  np.testing.assert_array_equal(np.isfinite(both),
                                [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]])


class SampleTokensVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_greedy_and_temperature_zero_are_argmax(self):
    logits = jax.random.normal(jax.random.key(1), (6, 11))
    keys = jax.random.split(jax.random.key(2), 6)
    greedy = self.variant(functools.partial(filters.sample_tokens, greedy=True))
    zero_t = self.variant(functools.partial(filters.sample_tokens, temperature=0.0))
    np.testing.assert_array_equal(greedy(keys, logits), np.argmax(logits, -1))
    np.testing.assert_array_equal(zero_t(keys, logits), np.argmax(logits, -1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_logps_and_entropy_hand_computed(self):
    logits = jnp.log(jnp.array([[1.0, 3.0], [2.0, 2.0]]))
    fn = self.variant(filters.token_logps_and_entropy)
    logps, entropy = fn(logits, jnp.array([1, 0]))
    np.testing.assert_allclose(logps, np.log([0.75, 0.5]), rtol=1e-6)
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(entropy, [h, np.log(2)], rtol=1e-6)
    # Temperature 2: softmax(log([1, 3]) / 2) = [1, sqrt 3] / (1 + sqrt 3).
    logps, _ = fn(logits, jnp.array([1, 0]), temperature=2.0)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(logps, np.log([s3 / (1 + s3), 0.5]), rtol=1e-6)


def test_logps_are_untruncated():
  # With top-k 1 the sampled token is the argmax, yet its log-prob is the full softmax's.
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
  token = filters.sample_tokens(jax.random.key(0)[None], logits, top_k=1)
  logp, _ = filters.token_logps_and_entropy(logits, token)
  assert int(token[0]) == 0
  np.testing.assert_allclose(logp, np.log([0.6]), rtol=1e-6)


def test_row_token_does_not_depend_on_other_rows():
  logits = jax.random.normal(jax.random.key(3), (16, 32))
  keys = jax.random.split(jax.random.key(4), 16)
  fn = _sampler(1.0, 8, 0.9)
  full = fn(keys, logits)
  alone = [int(fn(keys[i:i + 1], logits[i:i + 1])[0]) for i in (0, 7, 15)]
  np.testing.assert_array_equal(np.asarray(full)[[0, 7, 15]], alone)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=jnp.float32(0.5)), "static"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    filters.sample_tokens(jax.random.split(jax.random.key(0), 2), jnp.zeros((2, 8)),
                          **kwargs)


@hypothesis.given(
    logits=st.lists(st.floats(-4, 4, width=32), min_size=12, max_size=12),
    top_k=st.sampled_from([0, 1, 3, 12]),
    top_p=st.floats(0.05, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_filter_keeps_minimal_prefix_with_mass_p(logits, top_k, top_p, temperature):
  logits = np.array(logits, np.float32)
  out = np.asarray(filters.filter_logits(jnp.asarray(logits), temperature=temperature,
                                         top_k=top_k, top_p=top_p))
  kept = np.isfinite(out)
  assert 1 <= kept.sum() <= (top_k or logits.size)
  np.testing.assert_allclose(out[kept], logits[kept] / temperature, rtol=1e-6)
  # The kept set is a prefix of the descending order: no dropped token beats a kept one.
  if (~kept).any():
    assert logits[kept].min() >= logits[~kept].max()
  # Top-p minimality over the top-k renormalised law, up to float32 rounding.
  z = np.sort(logits.astype(np.float64) / temperature)[::-1][:top_k or logits.size]
  p = np.exp(z - z.max())
  p /= p.sum()
  n = kept.sum()
  assert p[:n].sum() >= top_p - 1e-5 or n == p.size
  assert p[:n - 1].sum() < top_p + 1e-5


def test_inverse_cdf_hand_computed():
  # p = [0.5, 0, 0.25, 0.25]: u in [0, .5) -> 0, [.5, .75) -> 2, [.75, 1) -> 3; never 1.
  logits = jnp.log(jnp.array([[0.5, 0.0, 0.25, 0.25]] * 7))
  u = jnp.array([0.0, 0.3, 0.4999, 0.5001, 0.74, 0.76, np.nextafter(1.0, 0.0)])
  tokens = filters.sample_tokens_from_uniforms(u, logits)
  np.testing.assert_array_equal(tokens, [0, 0, 0, 2, 2, 3, 3])
  # Trailing zero-probability tokens are never drawn, even for u just below 1.
  logits = jnp.log(jnp.array([[0.3, 0.7, 0.0, 0.0]]))
  top = jnp.array([np.nextafter(1.0, 0.0)], jnp.float32)
  assert int(filters.sample_tokens_from_uniforms(top, logits)[0]) == 1
  # Truncation maps back to token ids: top-k 2 of [1, 3, 2] keeps ids 1 and 2.
  logits = jnp.array([[1.0, 3.0, 2.0]] * 2)
  tokens = filters.sample_tokens_from_uniforms(jnp.array([0.1, 0.99]), logits, top_k=2)
  np.testing.assert_array_equal(tokens, [1, 2])


def test_entropy_ignores_masked_tokens():
  logits = jnp.array([[0.0, 0.0, -jnp.inf, -jnp.inf]])
  logp, entropy = filters.token_logps_and_entropy(logits, jnp.array([1]))
  np.testing.assert_allclose(logp, [np.log(0.5)], rtol=1e-6)
  np.testing.assert_allclose(entropy, [np.log(2.0)], rtol=1e-6)



# Greedy, plain sampling, top-k, top-p, both: (temperature, top_k, top_p, greedy).
_FUSED_CONFIGS = [(1.0, 0, 1.0, True), (0.7, 0, 1.0, False), (1.3, 5, 1.0, False),
                  (1.0, 0, 0.8, False), (0.9, 6, 0.7, False)]


class SampleWithLogpsTest(chex.TestCase):
  """The decode loop's fused sample + score equals the separate reference functions."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_sample_then_score(self):
    logits = jax.random.normal(jax.random.key(7), (16, 32)) * 3.0
    # A masked (-inf) token and an all-but-one masked row: weight 0, never drawn.
    logits = logits.at[0, 3].set(-jnp.inf).at[1, 1:].set(-jnp.inf)
    # Row 2 with u just below 1 takes the top-end cap path.
    u = jax.random.uniform(jax.random.key(8), (16,)).at[2].set(np.nextafter(1.0, 0.0))
    for temperature, top_k, top_p, greedy in _FUSED_CONFIGS:
      kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
      fused = self.variant(functools.partial(filters.sample_with_logps, return_entropy=True,
                                             **kwargs))
      tokens, logps, entropy = fused(u, logits)
      ref_tokens = filters.sample_tokens_from_uniforms(u, logits, **kwargs)
      ref_logps, ref_entropy = filters.token_logps_and_entropy(
          logits, ref_tokens, temperature=1.0 if greedy else temperature)
      np.testing.assert_array_equal(tokens, ref_tokens, err_msg=str(kwargs))
      # Entropy = lse - E[logit / T] cancels logits of ~15: float32 rounding of ~1e-6.
      np.testing.assert_allclose(logps, ref_logps, atol=1e-5, rtol=0, err_msg=str(kwargs))
      np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=0, err_msg=str(kwargs))
      assert int(tokens[1]) == 0 and int(tokens[0]) != 3
      assert np.isfinite(np.asarray(logps)).all() and np.isfinite(np.asarray(entropy)).all()
    # Without return_entropy no entropy is computed, and the tokens and log-probs agree.
    tokens_only, logps_only, none = filters.sample_with_logps(u, logits)
    np.testing.assert_array_equal(tokens_only, filters.sample_with_logps(
        u, logits, return_entropy=True)[0])
    assert none is None and logps_only.dtype == jnp.float32


def test_inverse_cdf_never_draws_zero_weight_tokens():
  # Interior and trailing zeros; uniforms at the edges of [0, 1).
  weights = jnp.array([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]] * 6)
  u = jnp.array([0.0, 0.4999, 0.5, 0.7499, 0.75, np.nextafter(1.0, 0.0)], jnp.float32)
  tokens = filters._inverse_cdf(u, weights)
  np.testing.assert_array_equal(tokens, [1, 1, 4, 4, 6, 6])


def test_two_level_search_hand_computed():
  # K = 200 > 64: blocks of 16 (13 blocks, the last padded with 8 zeros). Weight 1 at
  # token 20 (block 1, after 4 zeros in its block), 2 at 37 (block 2), 1 at 191 (the
  # padded last block); every other block is all zeros. Total 4: u in [0, .25) -> 20,
  # [.25, .75) -> 37, [.75, 1) -> 191.
  assert filters._cdf_block(200) == 16 and filters._cdf_block(64) == 64
  weights = np.zeros((8, 200), np.float32)
  weights[:, 20], weights[:, 37], weights[:, 191] = 1.0, 2.0, 1.0
  u = jnp.array([0.0, 0.1, 0.2499, 0.25, 0.7499, 0.75, 0.9, np.nextafter(1.0, 0.0)],
                jnp.float32)
  tokens = filters._inverse_cdf(u, jnp.asarray(weights))
  np.testing.assert_array_equal(tokens, [20, 20, 20, 37, 37, 191, 191, 191])
  # One token of weight > 0 in the whole row: every u draws it.
  one = np.zeros((3, 4096), np.float32)
  one[:, 4095] = 0.5
  np.testing.assert_array_equal(
      filters._inverse_cdf(jnp.array([0.0, 0.5, np.nextafter(1.0, 0.0)], jnp.float32),
                           jnp.asarray(one)), [4095] * 3)


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
    k=st.sampled_from([65, 100, 512, 1000, 4099]),
    zero_frac=st.sampled_from([0.0, 0.5, 0.95]),
    seed=st.integers(0, 2**31 - 1))
def test_two_level_search_draws_where_the_flat_cdf_says(k, zero_frac, seed):
  """Up to float32 rounding, the drawn index is the one the float64 CDF gives, and it
  always has weight > 0."""
  rng = np.random.default_rng(seed)
  weights = rng.exponential(size=(16, k)).astype(np.float32) * (rng.random((16, k)) >= zero_frac)
  weights[:, rng.integers(k)] += 1.0  # every row has some weight
  u = rng.random(16).astype(np.float32)
  u[0], u[1] = 0.0, np.nextafter(np.float32(1.0), np.float32(0.0))
  tokens = np.asarray(filters._inverse_cdf(jnp.asarray(u), jnp.asarray(weights)))
  rows = np.arange(16)
  assert (weights[rows, tokens] > 0).all()
  cdf = np.cumsum(weights.astype(np.float64), axis=-1)
  target = u.astype(np.float64) * cdf[:, -1]
  slack = 1e-5 * cdf[:, -1]
  before = np.where(tokens > 0, cdf[rows, np.maximum(tokens - 1, 0)], 0.0)
  assert (before <= target + slack).all()
  assert (cdf[rows, tokens] >= target - slack).all()


def test_two_level_search_law_over_a_long_vocabulary():
  """Chi-square over V = 300 (the two-level path), with zero-probability tokens."""
  rng = np.random.default_rng(3)
  probs = rng.dirichlet(np.ones(300) * 0.5)
  probs[rng.choice(300, 60, replace=False)] = 0.0
  probs /= probs.sum()
  n = 60_000
  u = jax.random.uniform(jax.random.key(11), (n,))
  weights = jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (n, 300))
  tokens = np.asarray(jax.jit(filters._inverse_cdf)(u, weights))
  counts = np.bincount(tokens, minlength=300)
  # Pool the rarest tokens so every expected count is >= 5.
  order = np.argsort(probs)
  support = order[probs[order] > 0]
  rare = support[np.cumsum(probs[support]) * n < 50]
  keep = np.setdiff1d(support, rare)
  observed = np.append(counts[keep], counts[rare].sum())
  expected = np.append(probs[keep], probs[rare].sum()) * n
  assert counts[probs == 0].sum() == 0
  assert stats.chisquare(observed, expected).pvalue > 1e-3


# ---------------------------------------------------------------- vocabulary-split logits

def _on_mesh(tensor, fn, uniforms, logits, jit):
  """fn(uniforms, logits) with the logits split as the decode head leaves them: rows over
  the batch axes, vocabulary over `tensor` (8 fake devices)."""
  from egpo_jax.models import sharding   # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8 // tensor, fsdp=1, tensor=tensor))
  with jax.set_mesh(mesh):
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    logits = put(logits, sharding.logits_spec(logits.shape, mesh))
    uniforms = put(uniforms, sharding.batch_spec(uniforms.shape, mesh))
    assert filters._vocab_split_mesh(logits.shape) is not None
    return jax.device_get((jax.jit(fn) if jit else fn)(uniforms, logits))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("tensor, vocab", [(2, 288), (4, 1000), (2, 64)])
@pytest.mark.parametrize("temperature, greedy", [(0.7, False), (1.0, True)])
def test_vocab_split_equals_whole_rows(tensor, vocab, temperature, greedy, jit):
  """Per device on vocabulary-split logits (`_sample_vocab_split`): the tokens of the
  whole rows (the fixture is asserted free of near-ties: no u within 1e-5 of a float64
  CDF boundary), log-probs and entropy to float32 rounding. 288 = 9 blocks of 32 (a
  block straddles the devices), 1000 over 4 (250 each), 64 (one level)."""
  rng = np.random.default_rng(vocab + tensor)
  logits = (rng.normal(size=(16, vocab)) * 3).astype(np.float32)
  logits[0, : vocab // tensor] = -np.inf      # row 0: device 0's whole slice masked
  logits[1, vocab // tensor:] = -np.inf       # row 1: only device 0's slice has weight
  u = rng.uniform(size=16).astype(np.float32)
  u[2], u[3] = 0.0, np.nextafter(np.float32(1.0), np.float32(0.0))
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
  if not greedy:
    assert (np.abs(cdf - u[:, None]).min(-1)[4:] > 1e-5).all(), "fixture has a near-tie"
  fn = functools.partial(filters.sample_with_logps, temperature=temperature, greedy=greedy,
                         return_entropy=True)
  tokens, logps, entropy = _on_mesh(tensor, fn, u, logits, jit)
  want = jax.device_get(fn(jnp.asarray(u), jnp.asarray(logits)))
  np.testing.assert_array_equal(tokens, want[0])
  np.testing.assert_allclose(logps, want[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(entropy, want[2], atol=1e-5, rtol=0)
  assert tokens[0] >= vocab // tensor and tokens[1] < vocab // tensor
  assert np.isfinite(logits[np.arange(16), tokens]).all()
  if not greedy:   # u = 0: the first token of weight > 0
    assert tokens[2] == np.flatnonzero(p[2] > 0)[0]


def test_vocab_split_greedy_ties_go_to_the_lowest_id():
  """argmax's tie rule across devices: the maximum held by both halves -> the lower id."""
  logits = np.zeros((8, 8), np.float32)
  logits[:, 2] = logits[:, 6] = 5.0          # tie across the two devices' slices
  logits[4:, 2] = 1.0                        # rows 4-7: device 1 alone holds the max
  logits[6:, 5] = 5.0                        # rows 6-7: a tie inside device 1's slice
  fn = functools.partial(filters.sample_with_logps, greedy=True)
  tokens, logps, _ = _on_mesh(2, fn, np.zeros(8, np.float32), logits, jit=True)
  np.testing.assert_array_equal(tokens, [2, 2, 2, 2, 6, 6, 5, 5])
  np.testing.assert_allclose(logps, jax.nn.log_softmax(logits)[np.arange(8), tokens],
                             atol=1e-6)


def test_vocab_split_keeps_the_gathered_path_for_top_k_and_top_p():
  """top-k/top-p sort the whole row: same tokens as without a mesh (gathered by GSPMD)."""
  rng = np.random.default_rng(5)
  logits = (rng.normal(size=(8, 128)) * 3).astype(np.float32)
  u = rng.uniform(size=8).astype(np.float32)
  fn = functools.partial(filters.sample_with_logps, temperature=0.9, top_k=20, top_p=0.9)
  got = _on_mesh(2, fn, u, logits, jit=True)
  np.testing.assert_array_equal(got[0], fn(jnp.asarray(u), jnp.asarray(logits))[0])
