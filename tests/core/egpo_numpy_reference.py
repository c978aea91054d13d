"""Loop-based NumPy reference of the group advantages, written from docs/METHOD.md.

Deliberately naive (plain Python loops over groups and responses, float64) and independent
of egpo_jax: it encodes the documented conventions directly. Shared conventions: only
valid responses enter a group's statistics; invalid responses get advantage 0 and weight
1; a group with fewer than 2 valid responses gets advantage 0.
"""

import math

import numpy as np

# docs/METHOD.md, "Variants (paper Table 2)": (correct [lo, hi], wrong [lo, hi], NSR weight
# mode, renorm order), spelled out with the symbols of the table.
VARIANT_TABLE = {
    "egpo": (("1", "lam_max"), ("lam_min", "1"), "w", "none"),
    "c1": (("lam_min", "lam_max"), ("lam_min", "lam_max"), "w", "none"),
    "c2": (("1", "1"), ("lam_min", "1"), "w", "none"),
    "c3": (("1", "lam_max"), ("1", "1"), "w", "none"),
    "c4": (("1", "lam_max"), ("lam_min", "1"), "1", "none"),
    "c5": (("1", "lam_max"), ("lam_min", "1"), "w", "after_clamp"),
    "c6": (("1", "lam_max"), ("lam_min", "1"), "w", "before_clamp"),
}
VARIANT_TABLE["lock_one"] = VARIANT_TABLE["c3"]


def variant_bounds(name, lam_min, lam_max):
  """((correct_lo, correct_hi), (wrong_lo, wrong_hi)) as numbers."""
  sym = {"1": 1.0, "lam_min": lam_min, "lam_max": lam_max}
  correct, wrong, _, _ = VARIANT_TABLE[name]
  return (sym[correct[0]], sym[correct[1]]), (sym[wrong[0]], sym[wrong[1]])


def _valid_members(valid, b):
  return [i for i in range(valid.shape[1]) if valid[b, i]]


def _mean(values):
  return sum(values) / len(values)


def _std(values, ddof):
  m = _mean(values)
  return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - ddof))


def _default_valid(rewards, valid):
  return np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)


def grpo(rewards, valid=None, ddof=1, std_eps=1e-6):
  """Eq. 2: (r_i - mean) / (std + eps) per group."""
  valid = _default_valid(rewards, valid)
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = _valid_members(valid, b)
    if len(idx) < 2:
      continue
    rs = [float(rewards[b, i]) for i in idx]
    m, s = _mean(rs), _std(rs, ddof)
    for i in idx:
      adv[b, i] = (float(rewards[b, i]) - m) / (s + std_eps)
  return adv


def dr_grpo(rewards, valid=None):
  valid = _default_valid(rewards, valid)
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = _valid_members(valid, b)
    if len(idx) < 2:
      continue
    m = _mean([float(rewards[b, i]) for i in idx])
    for i in idx:
      adv[b, i] = float(rewards[b, i]) - m
  return adv


def rloo(rewards, valid=None):
  """r_i minus the mean of the other valid members' rewards."""
  valid = _default_valid(rewards, valid)
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = _valid_members(valid, b)
    if len(idx) < 2:
      continue
    for i in idx:
      others = [float(rewards[b, j]) for j in idx if j != i]
      adv[b, i] = float(rewards[b, i]) - _mean(others)
  return adv


def edge_grpo(rewards, shannon, valid=None, ddof=1, std_eps=1e-6, eps_p=1e-6,
              clip_min=None, clip_max=None):
  """A_i * mean(P) / (P_i + eps_p), the factor optionally clipped; returns (adv, factor)."""
  valid = _default_valid(rewards, valid)
  base = grpo(rewards, valid, ddof, std_eps)
  factor = np.ones(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = _valid_members(valid, b)
    if not idx:
      continue
    p_mean = _mean([float(shannon[b, i]) for i in idx])
    for i in idx:
      f = p_mean / (float(shannon[b, i]) + eps_p)
      if clip_min is not None:
        f = max(f, clip_min)
      if clip_max is not None:
        f = min(f, clip_max)
      factor[b, i] = f
  return base * factor, factor


def egpo(rewards, entropy, correct, valid=None, *, variant="egpo", lam_min=0.8,
         lam_max=2.0, eps_h=1e-5, nsr=True, nsr_advantage=-1.0, ddof=1, std_eps=1e-6):
  """EGPO Eqs. 6-11 with the Table 2 variant; returns (advantages, weights)."""
  valid = _default_valid(rewards, valid)
  (c_lo, c_hi), (w_lo, w_hi) = variant_bounds(variant, lam_min, lam_max)
  _, _, nsr_weight_mode, renorm = VARIANT_TABLE[variant]
  z = grpo(rewards, valid, ddof, std_eps)
  adv = np.zeros(rewards.shape)
  weights = np.ones(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = _valid_members(valid, b)
    if not idx:
      continue
    h_bar = _mean([float(entropy[b, i]) for i in idx])  # Eq. 6, valid members only
    w_hat = {i: h_bar / (float(entropy[b, i]) + eps_h) for i in idx}  # Eq. 7
    if renorm == "before_clamp":
      m = _mean(list(w_hat.values()))
      if m > 0:
        w_hat = {i: w_hat[i] / m for i in idx}
    w = {}
    for i in idx:  # Eq. 8 with the variant's per-sign bounds
      lo, hi = (c_lo, c_hi) if correct[b, i] else (w_lo, w_hi)
      w[i] = min(max(w_hat[i], lo), hi)
    if renorm == "after_clamp":  # Eq. 9
      m = _mean(list(w.values()))
      if m > 0:
        w = {i: w[i] / m for i in idx}
    n_correct = sum(1 for i in idx if correct[b, i])
    all_wrong = n_correct == 0
    if nsr_weight_mode == "1" and all_wrong:
      w = {i: 1.0 for i in idx}
    for i in idx:
      weights[b, i] = w[i]
    if len(idx) < 2:
      continue
    for i in idx:  # Eq. 10 triage, then Eq. 11
      if n_correct == len(idx):
        a = 0.0
      elif all_wrong:
        a = nsr_advantage if nsr else 0.0
      else:
        a = z[b, i]
      adv[b, i] = w[i] * a
  return adv, weights


def token_entropy(logits):
  """Shannon entropy of softmax over the last axis, in float64; -inf logits have p = 0."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros(logits.shape[:-1])
  for idx in np.ndindex(*logits.shape[:-1]):
    row = logits[idx]
    live = [x for x in row if x != -np.inf]
    if not live:
      continue
    m = max(live)
    z = sum(math.exp(x - m) for x in live)
    out[idx] = -sum((math.exp(x - m) / z) * (x - m - math.log(z)) for x in live)
  return out
