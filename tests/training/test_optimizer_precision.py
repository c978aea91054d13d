"""Precision of training: float32 master params, optional bfloat16 AdamW moments.

At the paper's lr of 1e-6 an Adam step moves a weight of ~0.02 by ~1e-6, under half a
bfloat16 ulp there (~1.2e-4): bfloat16 master params would not move at all, so the update
refuses them. bfloat16 moments (stored with stochastic rounding) keep float32 params
moving like float32 moments do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egpo_jax.core import logprobs
from egpo_jax.models import transformer
from egpo_jax.models.config import get_config
from egpo_jax.training import optimizer as optimizer_lib
from egpo_jax.training import update
from egpo_jax.types import RolloutBatch, TrainState

CFG = get_config("tiny", dtype="bfloat16")


def _batch(n=8, p=4, t=6):
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  mask = jnp.ones((n, t), bool)
  return RolloutBatch(
      prompt_ids_NxP=jax.random.randint(k[0], (n, p), 3, 300),
      prompt_mask_NxP=jnp.ones((n, p), bool),
      completion_ids_NxT=jax.random.randint(k[1], (n, t), 3, 300), completion_mask_NxT=mask,
      old_logps_NxT=jnp.full((n, t), -6.2), adv_N=jax.random.normal(k[2], (n,)),
      ref_logps_NxT=jnp.zeros((n, t)), is_weights_NxT=jnp.ones((n, t)))


def _ten_steps(moment_dtype):
  opt = optimizer_lib.make_optimizer(lr=1e-6, weight_decay=0.01, moment_dtype=moment_dtype)
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  state = TrainState.create(params, opt.init(params))
  step = jax.jit(lambda s, b, k: update.update(s, b, k, optimizer=opt, model_config=CFG,
                                               settings=update.UpdateSettings()))
  for i in range(10):
    state, _ = step(state, _batch(), jax.random.PRNGKey(i))
  return params, state


@pytest.fixture(scope="module")
def runs():
  return {dtype: _ten_steps(dtype) for dtype in optimizer_lib.MOMENT_DTYPES}


def test_bfloat16_moments_at_lr_1e6_still_move_float32_params(runs):
  params, state = runs["bfloat16"]
  moments = state.opt_state[1].inner_state[0]
  assert moments.mu["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert moments.nu["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  kernel0 = params["layers"]["q_proj"]["kernel"]
  kernel = state.params["layers"]["q_proj"]["kernel"]
  assert kernel.dtype == jnp.float32
  moved = np.abs(np.asarray(kernel - kernel0))
  assert (moved > 0).mean() > 0.9 and 3e-6 < moved.mean() < 2e-5, moved.mean()
  # ... and like float32 moments do (Adam's steps are ~lr each; 10 steps ~1e-5). Measured:
  # mean difference 2e-8; the largest 3.7e-6, where the moments are rounded near zero.
  diff = np.abs(np.asarray(kernel - runs["float32"][1].params["layers"]["q_proj"]["kernel"]))
  assert diff.mean() < 0.01 * moved.mean() and diff.max() < 5e-6, (diff.mean(), diff.max())
  # One such step (a tenth of the move) on bfloat16 weights rounds away: why the update
  # refuses them.
  weights = kernel0.astype(jnp.bfloat16)
  stepped = (weights.astype(jnp.float32) + (kernel - kernel0) / 10).astype(jnp.bfloat16)
  assert (stepped == weights).mean() > 0.95


def test_bfloat16_master_params_are_refused():
  opt = optimizer_lib.make_optimizer(lr=1e-6)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        transformer.init_params(CFG, jax.random.PRNGKey(0)))
  state = TrainState.create(params, opt.init(params))
  with pytest.raises(ValueError, match="param_dtype='float32'"):
    update.update(state, _batch(), jax.random.PRNGKey(0), optimizer=opt, model_config=CFG,
                  settings=update.UpdateSettings())


def test_stochastically_rounded_second_moment_follows_float32():
  """b2 = 0.999: round-to-nearest bfloat16 would stop nu from decaying (0.999 nu rounds to
  nu); stochastic rounding keeps the average of float32's."""
  def final_nu(dtype):
    tx = optimizer_lib.scale_by_adam_lowp(moment_dtype=dtype)
    state = tx.init({"w": jnp.zeros((512,))})
    def body(i, s):
      g = jnp.where(i < 500, 1.0, 0.1) * jnp.ones((512,))
      return tx.update({"w": g}, s)[1]
    return jax.jit(lambda s: jax.lax.fori_loop(0, 1500, body, s))(state).nu["w"]
  exact = final_nu(jnp.float32)
  low = final_nu(jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.mean(np.asarray(low, np.float32)), np.mean(exact), rtol=0.01)
  # Round to nearest from the same float32 state stalls: 0.999 x nu is nu again.
  stalled = jnp.asarray(exact[:1], jnp.bfloat16)
  assert (0.999 * stalled.astype(jnp.float32)).astype(jnp.bfloat16) == stalled


def test_unknown_moment_dtype_names_the_field():
  with pytest.raises(ValueError, match="optim.moment_dtype"):
    optimizer_lib.make_optimizer(lr=1e-6, moment_dtype="float16")


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """Operand dtypes of every dot_general in a jaxpr and its sub-jaxprs (scan, custom_vjp)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _dot_operand_dtypes(inner)
  return found


def test_logprob_head_matmul_runs_in_the_hidden_dtype():
  """bfloat16 hidden states and float32 master embeddings: bfloat16 matmuls with float32
  accumulation (as the sampler's decode), forward and backward, not a silent upcast."""
  hidden = jnp.ones((2, 3, 64), jnp.bfloat16)
  table = jnp.ones((512, 64), jnp.float32)
  targets = jnp.zeros((2, 3), jnp.int32)
  fn = lambda h, e: logprobs.token_logprobs(h, e, targets, chunk_size=4).sum()
  dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(hidden, table).jaxpr)
  assert len(dots) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
