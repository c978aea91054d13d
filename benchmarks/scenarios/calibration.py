"""EGPO's calibration cost (entropy proxy Eq. 5 + weights Eqs. 6-9 + triage Eq. 10) against
GRPO's advantage, as a fraction of one loss+backward pass of the same batch
(B = 64 prompts x G = 16 responses x T = 3072 tokens).

The loss+backward denominator is deliberately the cheapest realistic one: the chunked
log-prob head of the tiny model (D = 64, V = 512) plus the clipped surrogate, without the
transformer layers. Any real model only makes the calibration's share smaller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks import harness
from egpo_jax.core import advantages, entropy, logprobs, losses

NOTES = """The calibration adds `EGPO - GRPO` on top of GRPO's advantage. "% of loss+bwd"
compares it with the loss and backward pass of the same batch through the tiny model's
output head only. No GPU was lent for this run, so all times are CPU times; only the
ratios are meant to transfer."""


def _inputs(b: int, g: int, t: int, d: int, v: int):
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  n = b * g
  lengths = jax.random.randint(k[0], (n,), t // 8, t + 1)
  mask = jnp.arange(t)[None, :] < lengths[:, None]
  logps = -jax.random.exponential(k[1], (n, t)) * mask
  correct = jax.random.bernoulli(k[2], 0.4, (b, g))
  rewards = jnp.where(correct, 1.0, -1.0)
  hidden = jax.random.normal(k[3], (n, t, d), jnp.float32)
  emb = jax.random.normal(k[4], (v, d), jnp.float32) / jnp.sqrt(d)
  targets = jax.random.randint(k[5], (n, t), 0, v)
  return dict(mask=mask, logps=logps, correct=correct, rewards=rewards, hidden=hidden,
              emb=emb, targets=targets)


@jax.jit
def _grpo(rewards, correct):
  return advantages.grpo_advantages(rewards, correct_BxG=correct).advantages


@jax.jit
def _egpo(rewards, correct, logps, mask):
  h = entropy.entropy_proxy(logps, mask).reshape(rewards.shape)
  return advantages.egpo_advantages(rewards, h, correct_BxG=correct).advantages


@functools.partial(jax.jit, static_argnames=("chunk",))
def _loss_and_grad(hidden, emb, targets, old_logps, adv, mask, chunk=1024):
  def loss_fn(hidden, emb):
    lp = logprobs.token_logprobs(hidden, emb, targets, chunk_size=chunk)
    return losses.policy_loss(lp, old_logps, adv, mask)[0]
  return jax.grad(loss_fn, argnums=(0, 1))(hidden, emb)


def run(quick: bool) -> list[harness.Row]:
  b, g, t, d, v = (8, 16, 256, 64, 512) if quick else (64, 16, 3072, 64, 512)
  x = _inputs(b, g, t, d, v)
  adv_n = _grpo(x["rewards"], x["correct"]).reshape(-1)
  repeats = 5 if quick else 3
  base = "loss+backward (tiny head)"
  rows = harness.alternate_rows({
      "GRPO advantage": lambda: _grpo(x["rewards"], x["correct"]),
      "EGPO: entropy proxy + weights + triage": lambda: _egpo(
          x["rewards"], x["correct"], x["logps"], x["mask"]),
  }, repeats=20 if quick else 10)
  rows.append(harness.timed_row(base, lambda: _loss_and_grad(
      x["hidden"], x["emb"], x["targets"], x["logps"], adv_n, x["mask"]),
      warmup=1, repeats=repeats))
  grpo, egpo_row = rows[0], rows[1]
  overhead = egpo_row.seconds - grpo.seconds
  for r in rows[:2]:
    r.baseline, r.ratio = base, "fraction"
  rows.append(harness.Row(name="EGPO - GRPO (the calibration's added cost)",
                          seconds=max(overhead, 0.0), baseline=base, ratio="fraction"))
  for r in rows:
    r.extra["shape"] = f"B={b} G={g} T={t}"
  return [rows[2], grpo, egpo_row, rows[3]]
