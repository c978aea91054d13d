"""The clipped surrogate, aggregation modes, KL estimators and DAPO helpers.

Float32 comparisons use rtol 1e-5 / atol 1e-6 unless a test says otherwise; the NumPy
reference runs in float64.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from egpo_jax.core import losses, registry
from egpo_jax.core.logprobs import token_logprobs
from egpo_jax.core.losses import (AGG_MODES, aggregate, clipped_surrogate,
                                  dynamic_sampling_filter, kl_penalty,
                                  overlong_penalty, policy_loss, select_groups,
                                  truncated_is_weights)

MAX_LEN = 6.0


def _agg_kwargs(agg):
  return {"max_len": MAX_LEN} if agg == "seq-mean-token-sum-norm" else {}


@pytest.fixture(scope="module")
def batch():
  """8 responses x 6 tokens: ragged masks, one fully masked row, advantages of both signs."""
  rng = np.random.default_rng(0)
  n, t = 8, 6
  lengths = np.array([6, 3, 1, 0, 5, 6, 2, 4])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  old = rng.uniform(-3.0, -0.05, (n, t)).astype(np.float32)
  logps = (old + rng.normal(0, 0.3, (n, t))).astype(np.float32)
  adv = rng.normal(0, 1, n).astype(np.float32)
  ref = (old + rng.normal(0, 0.2, (n, t))).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in
          dict(logps=logps, old=old, adv=adv, mask=mask, ref=ref).items()}


# --- the surrogate: gradient at rho = 1, zero advantages, hand-computed clips ----------

@pytest.fixture(scope="module")
def tiny_model():
  rng = np.random.default_rng(1)
  n, t, d, v = 4, 5, 8, 13
  return dict(
      hidden=jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32),
      emb=jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
      targets=jnp.asarray(rng.integers(0, v, (n, t))),
      mask=jnp.asarray(np.arange(t)[None, :] < np.array([5, 2, 4, 3])[:, None], jnp.float32),
  )


@pytest.fixture(scope="module")
def ratio_one_grads(tiny_model):
  """Per mode: (gradient of the loss at rho = 1, gradient of -agg(A log pi)), one jit."""
  m = tiny_model
  adv = jnp.array([1.5, -0.5, 0.0, -2.0])

  def logps(params):
    return token_logprobs(params["hidden"], params["emb"], m["targets"], chunk_size=8)

  def loss(params, agg):
    lp = logps(params)
    return policy_loss(lp, jax.lax.stop_gradient(lp), adv, m["mask"], agg=agg,
                       eps_low=0.2, eps_high=0.28, dual_clip=3.0, **_agg_kwargs(agg))[0]

  def expected(params, agg):  # -A * log pi, aggregated with the same weights.
    return -aggregate(adv[:, None] * logps(params), m["mask"], agg, **_agg_kwargs(agg))

  @jax.jit
  def all_grads(params):
    return {agg: (jax.grad(loss)(params, agg), jax.grad(expected)(params, agg))
            for agg in AGG_MODES}

  return all_grads({"hidden": m["hidden"], "emb": m["emb"]})


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradient_at_ratio_one_is_minus_advantage_times_grad_logp(ratio_one_grads, agg):
  grads, want = ratio_one_grads[agg]
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grads["emb"])).max() > 1e-3
  # Response 2 has A = 0 (an all-correct group): exactly zero gradient on its states.
  assert np.all(np.asarray(grads["hidden"][2]) == 0)


# (rho, A, J, dJ/dlogp) with eps_low = 0.2, eps_high = 0.28, no dual clip.
CLIP_CASES = [
    (1.5, 1.0, 1.28, 0.0),    # A > 0, above 1 + eps_high: clipped, no gradient
    (1.1, 1.0, 1.1, 1.1),     # A > 0, inside the range
    (0.5, 1.0, 0.5, 0.5),     # A > 0, below 1 - eps_low: NOT clipped (min keeps rho A)
    (0.5, -1.0, -0.8, 0.0),   # A < 0, below 1 - eps_low: clipped, no gradient
    (0.9, -2.0, -1.8, -1.8),  # A < 0, inside the range
    (1.5, -1.0, -1.5, -1.5),  # A < 0, above 1 + eps_high: NOT clipped (pessimistic)
    (1.25, 2.0, 2.5, 2.5),    # A > 0, between 1 + eps_low and 1 + eps_high: clip-higher
]
# Dual clip c = 3 (only A < 0 is affected).
DUAL_CASES = [
    (5.0, -1.0, -3.0, 0.0),   # rho > c: bounded at c A, no gradient
    (2.0, -1.0, -2.0, -2.0),  # 1 + eps_high < rho < c: as without dual clip
    (0.5, -1.0, -0.8, 0.0),   # the lower clip is unchanged
    (5.0, 1.0, 1.28, 0.0),    # A > 0: unchanged
]


@pytest.mark.parametrize("dual_clip, cases", [(None, CLIP_CASES), (3.0, DUAL_CASES)])
def test_clip_hand_cases(dual_clip, cases):
  rho, adv, want_j, want_grad = (np.array(c, np.float32) for c in zip(*cases))
  logps = jnp.log(jnp.asarray(rho))[:, None]
  old, mask = jnp.zeros_like(logps), jnp.ones_like(logps)
  kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)

  @jax.jit
  def run(lp, a):
    j_fn = lambda lp: clipped_surrogate(lp, old, a, **kw)[0]
    # The loss is -J; seq-mean-token-sum over one-token rows is -mean(J).
    loss, aux = policy_loss(lp, old, a, mask, agg="seq-mean-token-sum", **kw)
    return j_fn(lp), jax.grad(lambda lp: jnp.sum(j_fn(lp)))(lp), loss, aux

  j, grad, loss, aux = run(logps, jnp.asarray(adv))
  np.testing.assert_allclose(j[:, 0], want_j, rtol=1e-5)
  np.testing.assert_allclose(grad[:, 0], want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, -np.mean(want_j), rtol=1e-5)
  np.testing.assert_allclose(aux["clipfrac_low"], np.mean((adv < 0) & (rho < 0.8)))
  np.testing.assert_allclose(aux["clipfrac_high"], np.mean((adv > 0) & (rho > 1.28)))
  np.testing.assert_allclose(aux["ratio_mean"], np.mean(rho), rtol=1e-6)
  if dual_clip is not None:
    np.testing.assert_allclose(aux["clipfrac_dual"], np.mean((adv < 0) & (rho > 3.0)))
  else:
    assert "clipfrac_dual" not in aux


# --- aggregation ----------------------------------------------------------------------

def test_aggregation_hand_cases():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0], [7.0, 8.0, 9.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], jnp.float32)
  # Valid tokens: [1, 2, 3] and [4, 5]; row 2 is empty and counts as no sequence.
  np.testing.assert_allclose(aggregate(values, mask, "token-mean"), 15 / 5)
  np.testing.assert_allclose(aggregate(values, mask, "seq-mean-token-mean"),
                             (2.0 + 4.5) / 2)
  np.testing.assert_allclose(aggregate(values, mask, "seq-mean-token-sum"), (6 + 9) / 2)
  np.testing.assert_allclose(
      aggregate(values, mask, "seq-mean-token-sum-norm", max_len=10), (6 + 9) / 10 / 2)
  np.testing.assert_allclose(aggregate(values, mask, "token-mean", num_tokens=30), 0.5)
  np.testing.assert_allclose(aggregate(values, mask, "seq-mean-token-sum", num_seqs=3), 5.0)
  # Garbage (inf, nan) at masked positions never leaks, and an empty batch gives 0.
  dirty = values.at[1, 2].set(jnp.inf).at[2, 0].set(jnp.nan)
  np.testing.assert_allclose(aggregate(dirty, mask, "token-mean"), 3.0)
  for agg in AGG_MODES:
    assert float(aggregate(values, jnp.zeros_like(mask), agg, max_len=3)) == 0.0


def _global_counts(mask):
  return jnp.sum(mask), jnp.sum(jnp.any(mask > 0, axis=-1))


def _policy_loss_traced(agg):
  """policy_loss with every hyperparameter but `agg` traced: one compile per mode."""

  def f(logps, old, adv, mask, ref, kl_coef, is_w, num_tokens, num_seqs):
    return policy_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                       agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                       ref_logps_NxT=ref, kl_coef=kl_coef, is_weights_NxT=is_w,
                       **_agg_kwargs(agg))

  return f


@functools.lru_cache(maxsize=None)
def _value_and_grad(agg):
  return jax.jit(jax.value_and_grad(_policy_loss_traced(agg), has_aux=True))


def _full_args(b, kl_coef=0.1, is_w=None, adv=None):
  is_w = jnp.ones_like(b["mask"]) if is_w is None else is_w
  adv = b["adv"] if adv is None else adv
  return (b["logps"], b["old"], adv, b["mask"], b["ref"], jnp.float32(kl_coef), is_w,
          *_global_counts(b["mask"]))


def test_zero_advantages_give_exactly_zero_gradient(batch):
  (loss, _), grad = _value_and_grad("token-mean")(
      *_full_args(batch, kl_coef=0.0, adv=jnp.zeros(8)))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_with_global_counts_add_up(batch, agg):
  args = _full_args(batch)
  (full, full_aux), full_grad = _value_and_grad(agg)(*args)
  # 4 micro-batches of 2 responses, vmapped so the parts share one compile; the counts
  # are per part too, so that the same compiled function takes local counts below.
  parts = [x.reshape((4, 2) + x.shape[1:]) for x in args[:5]]
  parts += [jnp.broadcast_to(args[5], (4,)), args[6].reshape(4, 2, 6)]
  part_fn = jax.jit(jax.vmap(_value_and_grad(agg)))
  global_counts = [jnp.broadcast_to(c, (4,)) for c in args[7:]]
  (losses_4, aux_4), grads_4 = part_fn(*parts, *global_counts)
  np.testing.assert_allclose(jnp.sum(losses_4), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads_4.reshape(8, 6), full_grad, rtol=1e-5, atol=1e-7)
  # Token metrics are normalised by num_tokens too, so they add up the same way.
  for key in ("clipfrac_low", "clipfrac_high", "ratio_mean", "kl_old_new_k3", "pg_loss",
              "kl_ref"):
    np.testing.assert_allclose(jnp.sum(aux_4[key]), full_aux[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)
  # With each part's own counts the parts do NOT add up to the whole.
  local_tokens = jnp.sum(parts[3], axis=(1, 2))
  local_seqs = jnp.sum(jnp.any(parts[3] > 0, axis=-1), axis=-1)
  (local, _), _ = part_fn(*parts, local_tokens, local_seqs)
  assert abs(float(jnp.sum(local)) - float(full)) > 1e-3


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_shard_map_over_8_devices_matches_whole_batch(batch, num_devices, agg):
  mesh = jax.make_mesh((num_devices,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  f = _policy_loss_traced(agg)

  def per_device(*args):
    loss, _ = f(*args)
    return jax.lax.psum(loss, "data")

  sharded = jax.shard_map(per_device, mesh=mesh, out_specs=P(),
                          in_specs=(P("data"),) * 5 + (P(), P("data"), P(), P()))
  args = _full_args(batch)
  with jax.set_mesh(mesh):
    loss, grad = jax.jit(jax.value_and_grad(sharded))(*args)
  (want, _), want_grad = _value_and_grad(agg)(*args)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


# --- KL, importance weights -----------------------------------------------------------

def test_kl_estimators_hand_values():
  logps = jnp.log(jnp.array([[0.5, 0.2]]))
  ref = jnp.log(jnp.array([[0.25, 0.4]]))
  log_r = np.log([0.5, 2.0])  # ref / pi
  np.testing.assert_allclose(kl_penalty(logps, ref, "k1")[0], -log_r, rtol=1e-5)
  np.testing.assert_allclose(kl_penalty(logps, ref, "k2")[0], [0.5 * np.log(2) ** 2] * 2,
                             rtol=1e-5)
  np.testing.assert_allclose(kl_penalty(logps, ref, "k3")[0],
                             [0.5 - 1 + np.log(2), 2 - 1 - np.log(2)], rtol=1e-5)


@given(st.lists(st.floats(-20, 0, width=32), min_size=12, max_size=12),
       st.lists(st.floats(-20, 0, width=32), min_size=12, max_size=12))
def test_kl_nonnegative_and_zero_at_reference(a, b):
  logps = jnp.asarray(a, jnp.float32).reshape(3, 4)
  ref = jnp.asarray(b, jnp.float32).reshape(3, 4)
  assert np.all(np.asarray(kl_penalty(logps, ref, "k3")) >= 0)
  assert np.all(np.asarray(kl_penalty(logps, ref, "k2")) >= 0)
  for est in ("k1", "k2", "k3"):
    assert np.all(np.asarray(kl_penalty(logps, logps, est)) == 0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_kl_and_importance_weights_in_the_loss(batch, agg):
  b, kw = batch, _agg_kwargs(agg)
  vg = _value_and_grad(agg)
  (base, _), _ = vg(*_full_args(b, kl_coef=0.0))
  (loss, aux), _ = vg(*_full_args(b, kl_coef=0.3))
  kl = aggregate(kl_penalty(b["logps"], b["ref"], "k3"), b["mask"], agg, **kw)
  np.testing.assert_allclose(loss, base + 0.3 * kl, rtol=1e-5)
  np.testing.assert_allclose(aux["kl_ref"], kl, rtol=1e-5)
  np.testing.assert_allclose(aux["kl_loss"], 0.3 * kl, rtol=1e-5)
  # KL against the current policy itself adds nothing, gradient included.
  same = dict(b, ref=b["logps"])
  (loss_same, _), grad_same = vg(*_full_args(same, kl_coef=0.3))
  (_, _), grad_base = vg(*_full_args(same, kl_coef=0.0))
  np.testing.assert_allclose(loss_same, base, rtol=1e-6)
  np.testing.assert_allclose(grad_same, grad_base, rtol=1e-6, atol=1e-8)
  # Importance weights scale the per-token policy loss.
  w = jnp.linspace(0.5, 2.0, 48).reshape(8, 6)
  (loss_w, aux_w), _ = vg(*_full_args(b, kl_coef=0.0, is_w=w))
  j, _ = clipped_surrogate(b["logps"], b["old"], b["adv"], eps_low=0.2, eps_high=0.28,
                           dual_clip=3.0)
  np.testing.assert_allclose(loss_w, aggregate(-j * w, b["mask"], agg, **kw), rtol=1e-5)
  np.testing.assert_allclose(aux_w["is_weight_mean"], aggregate(w, b["mask"]), rtol=1e-6)


def test_truncated_is_weights():
  old = jnp.log(jnp.array([[0.3, 0.1, 0.2]]))
  sampler = jnp.log(jnp.array([[0.1, 0.2, 0.2]]))
  w = truncated_is_weights(old, sampler, cap=2.0)
  np.testing.assert_allclose(w, [[2.0, 0.5, 1.0]], rtol=1e-5)  # 3 is capped at 2
  grads = jax.grad(lambda o, s: jnp.sum(truncated_is_weights(o, s, 2.0)), (0, 1))(
      old, sampler)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


# --- DAPO length shaping and dynamic sampling -----------------------------------------

def test_overlong_penalty_boundaries():
  # max_len 10, cache 4: free up to 6, linear to -1 at 10, -1 beyond.
  lengths = jnp.array([0, 5, 6, 7, 8, 9, 10, 11, 100])
  np.testing.assert_allclose(overlong_penalty(lengths, max_len=10, cache_len=4),
                             [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1], atol=1e-7)
  assert overlong_penalty(lengths, max_len=10, cache_len=4).dtype == jnp.float32


def test_overlong_penalty_per_response_caps():
  """max_len as [N] caps: each response's own L_max (DAPO Eq. 13 with L_max = cap_i), the
  buffer shrunk to a cap narrower than it (C_i = min(cache_len, cap_i))."""
  lengths = jnp.array([6, 7, 10, 12, 5, 4, 1, 2, 3])
  caps = jnp.array([10, 10, 10, 10, 5, 5, 2, 2, 2])
  want = [0, -0.25, -1, -1,     # cap 10, C 4: free up to 6
          -1, -0.75,            # cap 5, C 4: free up to 1
          -0.5, -1, -1]         # cap 2 < 4: C 2, from 0 to -1 at 2
  for fn in (overlong_penalty, jax.jit(overlong_penalty, static_argnames="cache_len")):
    np.testing.assert_allclose(fn(lengths, max_len=caps, cache_len=4), want, atol=1e-7)
  # Caps all equal to a scalar give the scalar's penalty.
  np.testing.assert_allclose(overlong_penalty(lengths, max_len=jnp.full((9,), 10), cache_len=4),
                             overlong_penalty(lengths, max_len=10, cache_len=4))
  with pytest.raises(AssertionError):   # one cap per response
    overlong_penalty(lengths, max_len=caps[:3], cache_len=4)
  with pytest.raises(ValueError, match="cache_len=4 exceeds max_len=2"):
    overlong_penalty(lengths, max_len=2, cache_len=4)


def test_dynamic_sampling_filter_hand_groups():
  correct = jnp.array([
      [1, 1, 1, 1],  # all correct: dropped
      [0, 0, 0, 0],  # all wrong: dropped
      [1, 0, 0, 1],  # mixed: kept
      [1, 1, 1, 0],  # mixed only through an invalid response: dropped
      [0, 1, 0, 0],  # mixed, one invalid response: kept
      [1, 0, 0, 0],  # one valid response: dropped
  ], bool)
  valid = jnp.array([
      [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]],
      bool)
  kept = jax.jit(dynamic_sampling_filter)(correct, valid)
  assert kept.dtype == jnp.bool_
  np.testing.assert_array_equal(kept.any(-1), [False, False, True, False, True, False])
  np.testing.assert_array_equal(kept[2], valid[2])
  np.testing.assert_array_equal(kept[4], valid[4])
  idx, found = select_groups(kept.any(-1), k=3)
  np.testing.assert_array_equal(idx[:2], [2, 4])
  np.testing.assert_array_equal(found, [True, True, False])
  idx, found = select_groups(jnp.array([True, False, True, True]), k=2)
  np.testing.assert_array_equal(idx, [0, 2])
  assert bool(found.all())


# --- property test against an independent NumPy reference -----------------------------

def _numpy_loss(logps, old, adv, mask, eps_low, eps_high, dual_clip, agg, max_len):
  logps, old, adv, mask = (np.asarray(x, np.float64) for x in (logps, old, adv, mask))
  loss = np.zeros_like(logps)
  for i in range(logps.shape[0]):
    for t in range(logps.shape[1]):
      rho = np.exp(logps[i, t] - old[i, t])
      a = adv[i]
      j = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
      if dual_clip is not None and a < 0:
        j = max(j, dual_clip * a)
      loss[i, t] = -j
  valid = mask > 0
  rows = [loss[i][valid[i]] for i in range(len(loss)) if valid[i].any()]
  if not rows:
    return 0.0
  if agg == "token-mean":
    return np.concatenate(rows).sum() / valid.sum()
  per_seq = {"seq-mean-token-mean": [r.mean() for r in rows],
             "seq-mean-token-sum": [r.sum() for r in rows],
             "seq-mean-token-sum-norm": [r.sum() / max_len for r in rows]}[agg]
  return np.mean(per_seq)


@functools.lru_cache(maxsize=None)
def _jitted_loss_and_grad(agg, with_dual):
  def f(logps, old, adv, mask, eps_low, eps_high, dual_clip):
    return policy_loss(logps, old, adv, mask, eps_low=eps_low, eps_high=eps_high,
                       dual_clip=dual_clip if with_dual else None, agg=agg,
                       **_agg_kwargs(agg))[0]

  return jax.jit(jax.value_and_grad(f))


_FLOATS = functools.partial(st.floats, allow_nan=False, allow_infinity=False, width=32)


@given(logps=st.lists(_FLOATS(-30, 0), min_size=20, max_size=20),
       old=st.lists(_FLOATS(-30, 0), min_size=20, max_size=20),
       adv=st.lists(_FLOATS(-5, 5), min_size=4, max_size=4),
       mask=st.lists(st.booleans(), min_size=20, max_size=20),
       eps_low=_FLOATS(0, 0.5), eps_high=_FLOATS(0, 0.5),
       dual_clip=st.one_of(st.none(), _FLOATS(1.5, 10)),
       agg=st.sampled_from(AGG_MODES))
def test_property_matches_numpy_reference_and_is_finite(logps, old, adv, mask, eps_low,
                                                        eps_high, dual_clip, agg):
  """Any log-probs in [-30, 0] (ratios up to e^30), advantages, masks and clip settings.

  One fixed shape; the hyperparameters are traced, so only (agg, dual clip on/off)
  compiles, 8 times in all.
  """
  shape = (4, 5)
  args = (jnp.asarray(logps, jnp.float32).reshape(shape),
          jnp.asarray(old, jnp.float32).reshape(shape), jnp.asarray(adv, jnp.float32),
          jnp.asarray(mask, jnp.float32).reshape(shape))
  fn = _jitted_loss_and_grad(agg, dual_clip is not None)
  loss, grad = fn(*args, jnp.float32(eps_low), jnp.float32(eps_high),
                  jnp.float32(dual_clip if dual_clip is not None else 0.0))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  want = _numpy_loss(*args, eps_low=np.float32(eps_low), eps_high=np.float32(eps_high),
                     dual_clip=None if dual_clip is None else np.float32(dual_clip),
                     agg=agg, max_len=MAX_LEN)
  scale = max(1.0, abs(want))
  assert abs(float(loss) - want) <= 1e-5 * scale, (float(loss), want)


# --- jit/eager variants of the public functions ---------------------------------------

class PublicFunctionVariantsTest(chex.TestCase):

  def _batch(self):
    rng = np.random.default_rng(2)
    mask = jnp.asarray(rng.random((4, 5)) < 0.8, jnp.float32)
    old = jnp.asarray(rng.uniform(-3, 0, (4, 5)), jnp.float32)
    logps = old + jnp.asarray(rng.normal(0, 0.3, (4, 5)), jnp.float32)
    return logps, old, jnp.array([1.0, -1.0, 0.5, -0.2]), mask

  @chex.variants(with_jit=True, without_jit=True)
  def test_policy_loss(self):
    logps, old, adv, mask = self._batch()
    fn = self.variant(lambda lp, o, a, m, ref: policy_loss(
        lp, o, a, m, eps_high=0.28, dual_clip=3.0, agg="seq-mean-token-sum-norm",
        max_len=5, ref_logps_NxT=ref, kl_coef=0.1, entropy_NxT=-lp))
    loss, aux = fn(logps, old, adv, mask, old)
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    for key in ("pg_loss", "clipfrac_low", "clipfrac_high", "clipfrac_dual", "ratio_mean",
                "kl_old_new_k3", "kl_ref", "kl_loss", "entropy"):
      chex.assert_shape(aux[key], ())
    assert "approx_kl" not in aux   # one name, one direction
    np.testing.assert_allclose(aux["entropy"], aggregate(-logps, mask), rtol=1e-6)
    np.testing.assert_allclose(
        aux["kl_old_new_k3"], aggregate(kl_penalty(old, logps, "k3"), mask), rtol=1e-6)
    np.testing.assert_allclose(loss, aux["pg_loss"] + aux["kl_loss"], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aggregate_and_kl(self):
    logps, old, _, mask = self._batch()
    agg = self.variant(lambda x, m: aggregate(x, m, "seq-mean-token-mean"))
    kl = self.variant(lambda a, b: kl_penalty(a, b, "k3"))
    np.testing.assert_allclose(
        agg(logps, mask), _numpy_seq_mean(np.asarray(logps), np.asarray(mask)), rtol=1e-5)
    chex.assert_shape(kl(logps, old), (4, 5))

  @chex.variants(with_jit=True, without_jit=True)
  def test_dapo_helpers(self):
    penalty = self.variant(lambda n: overlong_penalty(n, max_len=8, cache_len=2))
    np.testing.assert_allclose(penalty(jnp.array([6, 7, 8, 9])), [0, -0.5, -1, -1])
    filt = self.variant(dynamic_sampling_filter)
    kept = filt(jnp.array([[1, 0], [1, 1]], bool), jnp.ones((2, 2), bool))
    np.testing.assert_array_equal(kept, [[True, True], [False, False]])


def _numpy_seq_mean(x, m):
  rows = [x[i][m[i] > 0].mean() for i in range(len(x)) if (m[i] > 0).any()]
  return np.mean(rows)


# --- errors and registration ----------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(agg="mean"), "agg='mean' is not one of"),
    (dict(agg="seq-mean-token-sum-norm"), "max_len is required"),
    (dict(kl_coef=0.1), "ref_logps_NxT is None"),
    (dict(kl_estimator="k4"), "kl_estimator='k4'"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(eps_low=-0.1), "eps_low must be >= 0"),
    (dict(num_tokens=0), "num_tokens must be > 0"),
])
def test_bad_hyperparameters_name_the_field(batch, kwargs, match):
  b = batch
  with pytest.raises(ValueError, match=match):
    policy_loss(b["logps"], b["old"], b["adv"], b["mask"], **kwargs)


def test_bad_shapes_and_dapo_arguments(batch):
  b = batch
  with pytest.raises(AssertionError):
    policy_loss(b["logps"], b["old"], b["adv"][:3], b["mask"])
  with pytest.raises(ValueError, match="cache_len=12 exceeds max_len=10"):
    overlong_penalty(jnp.arange(3), max_len=10, cache_len=12)
  with pytest.raises(ValueError, match="k must be a positive int"):
    select_groups(jnp.ones(3, bool), k=0)


def test_kl_old_new_is_kl_of_the_sampling_policy_hand_computed():
  """KL(pi_old || pi_new) on tokens from pi_old: mean(rho - 1 - log rho), rho = new / old;
  the reverse direction, mean(1 / rho - 1 + log rho), would differ here."""
  old = jnp.log(jnp.array([[0.5, 0.1, 0.2]]))
  new = jnp.log(jnp.array([[0.25, 0.3, 0.3]]))
  mask = jnp.array([[True, True, False]])
  _, aux = policy_loss(new, old, jnp.ones(1), mask)
  d = np.log([0.5, 3.0])   # log rho on the valid tokens
  np.testing.assert_allclose(aux["kl_old_new_k3"], np.mean(np.exp(d) - 1 - d), rtol=1e-6)
  assert not np.isclose(aux["kl_old_new_k3"], np.mean(np.exp(-d) - 1 + d), rtol=1e-3)


def test_registered_by_name():
  assert registry.policy_losses.get("ppo_clip") is losses.policy_loss


# --- overflow: masked before exp, log-ratio clamped (verl's +-20) ----------------------

def _unclamped_loss(logps, old, adv, mask, agg):
  """The loss as it was before the clamp: exp of the raw log-ratio, no masking first."""
  ratio = jnp.exp(logps - old)
  a = adv[:, None]
  obj = jnp.minimum(ratio * a, jnp.clip(ratio, 0.8, 1.2) * a)
  return aggregate(-obj, mask, agg, **_agg_kwargs(agg))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_below_the_clamp_loss_and_gradient_are_bit_identical(batch, agg):
  b = batch
  args = (b["old"], b["adv"], b["mask"])
  new, g_new = jax.value_and_grad(
      lambda lp: policy_loss(lp, *args, agg=agg, **_agg_kwargs(agg))[0])(b["logps"])
  old, g_old = jax.value_and_grad(lambda lp: _unclamped_loss(lp, *args, agg))(b["logps"])
  assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
  # Exactly equal (padding may hold 0.0 where the old formula gave -0.0).
  np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_old))
  valid = np.asarray(b["mask"]) > 0
  assert np.asarray(g_new)[valid].tobytes() == np.asarray(g_old)[valid].tobytes()


@pytest.mark.parametrize("log_ratio", [100.0, 1000.0, np.inf])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_extreme_log_ratios_at_padding_leave_loss_and_gradient_finite(batch, agg, log_ratio):
  b = batch
  pad = b["mask"] == 0
  # old = -inf at padding makes the log-ratio inf there; finite cases shift old down.
  old = jnp.where(pad, b["logps"] - log_ratio, b["old"])
  ref = jnp.where(pad, -jnp.inf, b["ref"])
  kw = dict(agg=agg, ref_logps_NxT=ref, kl_coef=0.1, dual_clip=3.0, **_agg_kwargs(agg))
  (loss, aux), g = jax.value_and_grad(
      lambda lp: policy_loss(lp, old, b["adv"], b["mask"], **kw), has_aux=True)(b["logps"])
  clean = jax.grad(lambda lp: policy_loss(lp, b["old"], b["adv"], b["mask"],
                                          **{**kw, "ref_logps_NxT": b["ref"]})[0])(b["logps"])
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in aux.values())
  assert np.all(np.asarray(g)[np.asarray(pad)] == 0.0)
  # Padding's garbage does not change the valid tokens' gradient at all.
  np.testing.assert_array_equal(np.asarray(g), np.asarray(clean))


@pytest.mark.parametrize("log_ratio", [100.0, 1000.0])
def test_extreme_log_ratio_at_a_valid_token_is_clamped(log_ratio):
  logps = jnp.array([[0.0, -1.0]])
  old = logps - jnp.array([[log_ratio, 0.0]])
  mask = jnp.ones((1, 2))
  for adv in (1.0, -1.0):
    (loss, aux), g = jax.value_and_grad(
        lambda lp: policy_loss(lp, old, jnp.array([adv]), mask), has_aux=True)(logps)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
    assert float(aux["ratio_mean"]) == pytest.approx((np.exp(20.0) + 1.0) / 2, rel=1e-6)
    assert float(g[0, 0]) == 0.0   # beyond the clamp (and the clip): no gradient
