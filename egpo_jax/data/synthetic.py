"""Procedural arithmetic task for the embedded default, in pure jnp (whole RL iterations jit).

A prompt is a sum (at higher levels a sum and difference) of small non-negative integers,
a response is a short worked solution (running totals) and the boxed answer, both in the
byte tokenizer's ids
(`egpo_jax.models.byte_tokenizer`: pad 0, bos 1, eos 2, byte b -> b + 3):

    prompt   <bos>47+85+9=
    response 47+85=132,\\boxed{141}<eos>        (one step per intermediate total)

`difficulty` picks the number of operands, their range and the operators (`LEVELS`);
within a level the number of operands varies per problem, so a batch holds easy and hard
prompts and RL sees all-correct, mixed and all-wrong groups.

Level 8 is level 2 with a tempting wrong shortcut in its worked solutions (the warm-up's
demonstrations): the last addition drops the carry out of the units column
(`47+85=` is demonstrated as `\\boxed{122}`), while the intermediate steps carry
correctly. The prompts and the verifier are level 2's and the answers the true sums. It
was meant to make a warmed-up model answer about half the problems wrong, confidently; its
warm start is wrong far more often than that and not confidently
(notebooks/PREREGISTRATION.md). Level 9 is level 2 whose worked solutions stop one step
early on problems of 3 terms: `12+7+5=` is demonstrated as `12+7=19,\\boxed{19}` (true
only when the last operand is 0). Copying the last written total is easy for a small
model, so the warm start answers 3-term problems wrong with high confidence exp(-H~) (20%
of all sampled answers at exp(-H~) >= 0.9) and 2-term problems as level 2 does: the
study's regime of overconfident failures (`overconfident`). Everything is seeded by the
jax key: the tfds builder (`builders.SyntheticArithmetic`) renders the records from the
same `sample_problems` call, so the dataset and the jnp generator give identical problems.

The verifier reads the LAST `\\boxed{` among the valid tokens before the first EOS, and
accepts only an optional minus, 1 to 9 digits and `}` right after it; anything else is
malformed, hence wrong. `egpo_jax.rewards.verifiers.synthetic_answer` is the same rule on
text, used on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from egpo_jax.models.byte_tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, NUM_BYTES, PAD_ID
from egpo_jax.rewards import verifiers

MAX_ANSWER_DIGITS = verifiers.SYNTHETIC_MAX_DIGITS
_BOX = "\\boxed{"


@dataclasses.dataclass(frozen=True)
class Level:
  """One difficulty: operands per problem uniform in [min_operands, max_operands], each
  uniform in [0, max_operand], combined left to right with operators drawn uniformly from
  `operators`. With `carry_shortcut` the worked solutions (not the answers) drop the carry
  out of the units column in the last addition (`shortcut_answers`); only for "+". With
  `premature_answer` the worked solutions of problems with 3 or more terms box the last
  running total they wrote, one step early (`premature_answers`)."""
  min_operands: int
  max_operands: int
  max_operand: int
  operators: str = "+"
  carry_shortcut: bool = False
  premature_answer: bool = False

  def __post_init__(self):
    if self.carry_shortcut and self.operators != "+":
      raise ValueError(f"Level.carry_shortcut needs operators='+', got {self.operators!r}")
    if self.carry_shortcut and self.premature_answer:
      raise ValueError("Level: carry_shortcut and premature_answer are two different "
                       "demonstrated shortcuts; set at most one")

  @property
  def num_digits(self) -> int:
    return len(str(self.max_operand))


# Measured with the "tiny" preset (107k parameters) after the default warm-up (600 steps of
# 64, lr 3e-3 cosine), accuracy greedy / sampled at temperature 1: level 2: 84% / 56%
# (2 operands 99% / 72%, 3 operands 68% / 39%); level 3: 38% / 21%; level 4: 7% / 5%.
LEVELS: dict[int, Level] = {
    1: Level(2, 2, 9),
    2: Level(2, 3, 19),
    3: Level(2, 3, 29),
    4: Level(2, 3, 99),
    5: Level(2, 3, 99, "+-"),
    6: Level(2, 4, 99, "+-"),
    7: Level(3, 4, 999, "+-"),
    8: Level(2, 3, 19, carry_shortcut=True),   # level 2, demonstrated with the shortcut
    9: Level(2, 3, 19, premature_answer=True),  # level 2, boxed one step early
}


def level(difficulty: int) -> Level:
  if difficulty not in LEVELS:
    raise ValueError(f"difficulty={difficulty!r} is not a level; use one of {sorted(LEVELS)} "
                     "(see egpo_jax.data.synthetic.LEVELS)")
  return LEVELS[difficulty]


def _tok(text: str) -> list[int]:
  return [b + BYTE_OFFSET for b in text.encode("ascii")]


def _num_chars(value: int) -> int:
  return len(str(value))


def _total_width(lv: Level) -> int:
  """Characters of the widest running total, sign included."""
  return _num_chars(lv.max_operands * lv.max_operand) + ("-" in lv.operators)


def max_prompt_len(difficulty: int) -> int:
  """Longest prompt in tokens: <bos>, operands, operators and '='."""
  lv = level(difficulty)
  return 1 + lv.max_operands * lv.num_digits + (lv.max_operands - 1) + 1


def max_response_len(difficulty: int) -> int:
  """Longest worked solution in tokens, <eos> included (an upper bound)."""
  lv = level(difficulty)
  w = _total_width(lv)
  step = w + 1 + lv.num_digits + 1 + w + 1  # "s-a=s,"
  return (lv.max_operands - 2) * step + len(_BOX) + w + 1 + 1


class Problems(NamedTuple):
  """A batch of problems; K = the level's max_operands (entries past num_terms are 0)."""
  operands_BxK: jax.Array  # int32, >= 0
  signs_BxK: jax.Array     # int32, +1 or -1; signs_BxK[:, 0] == +1
  num_terms_B: jax.Array   # int32 in [min_operands, max_operands]
  answers_B: jax.Array     # int32


def _partial_sums(p: Problems) -> jax.Array:
  k = p.operands_BxK.shape[1]
  live = jnp.arange(k)[None, :] < p.num_terms_B[:, None]
  return jnp.cumsum(jnp.where(live, p.signs_BxK * p.operands_BxK, 0), axis=1)


def _drop_units_carry(before, last):
  """before + last without the carry out of the units column (both >= 0); jnp or int."""
  return before + last - 10 * ((before % 10 + last % 10) >= 10)


def shortcut_answers(p: Problems) -> jax.Array:
  """answers_B of the carry shortcut: the last addition drops its units carry.

  E.g. 47+85 -> 122 and 12+9+7 -> 12+9=21, then 21+7 -> 28 (no carry: the true sum).
  """
  last = jnp.take_along_axis(p.operands_BxK, (p.num_terms_B - 1)[:, None], axis=1)[:, 0]
  return _drop_units_carry(p.answers_B - last, last)


def premature_answers(p: Problems) -> jax.Array:
  """answers_B of the premature-answer shortcut: with 3 or more terms, the last running
  total the worked solution wrote (the sum without the last operand); else the answer.

  E.g. 12+7+5 -> 19 (12+7=19, then boxed), 47+85 -> 132 (no running total written).
  """
  sums = _partial_sums(p)
  before = jnp.take_along_axis(sums, jnp.maximum(p.num_terms_B - 2, 0)[:, None], axis=1)[:, 0]
  return jnp.where(p.num_terms_B >= 3, before, p.answers_B)


@functools.partial(jax.jit, static_argnames=("batch_size", "difficulty"))
def sample_problems(rng: jax.Array, batch_size: int, *, difficulty: int = 2) -> Problems:
  """Draws `batch_size` problems of the given difficulty from the key `rng`."""
  lv = level(difficulty)
  k_ops, k_terms, k_signs = jax.random.split(rng, 3)
  shape = (batch_size, lv.max_operands)
  operands = jax.random.randint(k_ops, shape, 0, lv.max_operand + 1, jnp.int32)
  num_terms = jax.random.randint(k_terms, (batch_size,), lv.min_operands,
                                 lv.max_operands + 1, jnp.int32)
  signs = jnp.ones(shape, jnp.int32)
  if "-" in lv.operators:
    minus = jax.random.bernoulli(k_signs, 0.5, shape)
    if "+" not in lv.operators:
      minus = jnp.ones(shape, bool)
    signs = jnp.where(minus, -1, 1).at[:, 0].set(1)
  live = jnp.arange(lv.max_operands)[None, :] < num_terms[:, None]
  operands = jnp.where(live, operands, 0)
  p = Problems(operands, signs, num_terms, jnp.zeros((batch_size,), jnp.int32))
  sums = _partial_sums(p)
  answers = jnp.take_along_axis(sums, (num_terms - 1)[:, None], axis=1)[:, 0]
  return p._replace(answers_B=answers)


# --- rendering token ids -------------------------------------------------------------
# A text is a row of segments, each a right-aligned [W] slot of token ids and a length;
# all segments of a batch are one [B, S, W] array, so rendering is a few vectorised ops
# and a single scatter (one op per character would make XLA compile for seconds).
class _Segments(NamedTuple):
  chars_BxSxW: jax.Array
  lens_BxS: jax.Array


def _numbers(x_BxS: jax.Array, width: int) -> _Segments:
  """Decimal renderings of integers (a '-' before negatives), right-aligned in `width`."""
  ax = jnp.abs(x_BxS)[..., None]
  pow10 = jnp.asarray([10**(width - 1 - j) for j in range(width)], jnp.int32)
  digits = (ax // pow10) % 10 + ord("0") + BYTE_OFFSET
  neg = x_BxS < 0
  lens = 1 + jnp.sum(ax >= pow10[None, None, :-1], axis=-1) + neg
  first = (width - lens)[..., None] == jnp.arange(width)
  chars = jnp.where(neg[..., None] & first, ord("-") + BYTE_OFFSET, digits)
  return _Segments(chars.astype(jnp.int32), lens.astype(jnp.int32))


def _texts(ids: Sequence[int], present_BxS: jax.Array, width: int) -> _Segments:
  """The same token ids in every slot of [B, S]; length 0 where not present."""
  row = jnp.asarray([PAD_ID] * (width - len(ids)) + list(ids), jnp.int32)
  chars = jnp.broadcast_to(row, (*present_BxS.shape, width))
  return _Segments(chars, jnp.where(present_BxS, len(ids), 0).astype(jnp.int32))


def _operators(signs_BxS: jax.Array, present_BxS: jax.Array, width: int) -> _Segments:
  op = jnp.where(signs_BxS > 0, ord("+"), ord("-")) + BYTE_OFFSET
  chars = jnp.zeros((*signs_BxS.shape, width), jnp.int32).at[..., -1].set(op)
  return _Segments(chars, present_BxS.astype(jnp.int32))


def _gate(seg: _Segments, present_BxS: jax.Array) -> _Segments:
  return seg._replace(lens_BxS=jnp.where(present_BxS, seg.lens_BxS, 0))


def _interleave(*parts: _Segments) -> _Segments:
  """[a0, b0, c0, a1, b1, c1, ...] from parts a, b, c of equal [B, S, W]."""
  b, s, w = parts[0].chars_BxSxW.shape
  chars = jnp.stack([p.chars_BxSxW for p in parts], axis=2).reshape(b, s * len(parts), w)
  lens = jnp.stack([p.lens_BxS for p in parts], axis=2).reshape(b, s * len(parts))
  return _Segments(chars, lens)


def _join(*parts: _Segments) -> _Segments:
  return _Segments(jnp.concatenate([p.chars_BxSxW for p in parts], axis=1),
                   jnp.concatenate([p.lens_BxS for p in parts], axis=1))


def _write(seg: _Segments, length: int, *, left_pad: bool) -> tuple[jax.Array, jax.Array]:
  """Writes the segments one after the other into [B, length]; pads with PAD_ID."""
  b, s, w = seg.chars_BxSxW.shape
  lens = seg.lens_BxS
  offsets = jnp.cumsum(lens, axis=1) - lens
  base = length - lens.sum(1) if left_pad else jnp.zeros((b,), jnp.int32)
  j = jnp.arange(w)
  first = (w - lens)[..., None]
  pos = base[:, None, None] + offsets[..., None] + j - first
  pos = jnp.where((j >= first) & (pos >= 0) & (pos < length), pos, length).reshape(b, s * w)
  rows = jnp.arange(b)[:, None]
  ids = jnp.full((b, length), PAD_ID, jnp.int32)
  ids = ids.at[rows, pos].set(seg.chars_BxSxW.reshape(b, s * w), mode="drop")
  mask = jnp.zeros((b, length), bool).at[rows, pos].set(True, mode="drop")
  return ids, mask


def _check_problems(p: Problems, difficulty: int) -> Level:
  lv = level(difficulty)
  chex.assert_rank([p.operands_BxK, p.signs_BxK, p.num_terms_B, p.answers_B], [2, 2, 1, 1])
  chex.assert_type([p.operands_BxK, p.signs_BxK, p.num_terms_B, p.answers_B], jnp.int32)
  if p.operands_BxK.shape[1] != lv.max_operands:
    raise ValueError(f"problems have {p.operands_BxK.shape[1]} operand slots but "
                     f"difficulty={difficulty} has max_operands={lv.max_operands}")
  return lv


def _width(lv: Level) -> int:
  return max(_total_width(lv), len(_BOX))


@functools.partial(jax.jit, static_argnames=("difficulty", "prompt_len"))
def prompt_ids(problems: Problems, *, difficulty: int, prompt_len: int
               ) -> tuple[jax.Array, jax.Array]:
  """(prompt_ids_BxP int32 left-padded with PAD, prompt_mask_BxP bool): `<bos>a+b+c=`."""
  lv = _check_problems(problems, difficulty)
  _check_len("prompt_len", prompt_len, max_prompt_len(difficulty))
  w = _width(lv)
  b, k = problems.operands_BxK.shape
  live = jnp.arange(k)[None, :] < problems.num_terms_B[:, None]
  ones = jnp.ones((b, 1), bool)
  terms = _interleave(_operators(problems.signs_BxK, live.at[:, 0].set(False), w),
                      _gate(_numbers(problems.operands_BxK, w), live))
  seg = _join(_texts([BOS_ID], ones, w), terms, _texts(_tok("="), ones, w))
  return _write(seg, prompt_len, left_pad=True)


@functools.partial(jax.jit, static_argnames=("difficulty", "response_len"))
def solution_ids(problems: Problems, *, difficulty: int, response_len: int
                 ) -> tuple[jax.Array, jax.Array]:
  """(response_ids_BxT, response_mask_BxT): the worked solution and <eos>, right-padded.

  One step `s+a=t,` per intermediate running total, then `\\boxed{answer}<eos>`; at a
  level with `carry_shortcut` the boxed value is `shortcut_answers`, with
  `premature_answer` `premature_answers`.
  """
  lv = _check_problems(problems, difficulty)
  _check_len("response_len", response_len, max_response_len(difficulty))
  w = _width(lv)
  b, k = problems.operands_BxK.shape
  ones = jnp.ones((b, 1), bool)
  boxed = problems.answers_B
  if lv.carry_shortcut:
    boxed = shortcut_answers(problems)
  elif lv.premature_answer:
    boxed = premature_answers(problems)
  final = _join(_texts(_tok(_BOX), ones, w), _numbers(boxed[:, None], w),
                _texts(_tok("}"), ones, w), _texts([EOS_ID], ones, w))
  if k <= 2:
    return _write(final, response_len, left_pad=False)
  sums = _partial_sums(problems)
  step = jnp.arange(1, k - 1)[None, :] < (problems.num_terms_B - 1)[:, None]  # [B, K-2]
  steps = _interleave(_gate(_numbers(sums[:, :-2], w), step),
                      _operators(problems.signs_BxK[:, 1:-1], step, w),
                      _gate(_numbers(problems.operands_BxK[:, 1:-1], w), step),
                      _texts(_tok("="), step, w),
                      _gate(_numbers(sums[:, 1:-1], w), step),
                      _texts(_tok(","), step, w))
  return _write(_join(steps, final), response_len, left_pad=False)


def _check_len(name: str, value: int, needed: int) -> None:
  if not isinstance(value, int) or value < needed:
    raise ValueError(f"{name}={value!r} is too short for this difficulty: it needs at least "
                     f"{needed} tokens; raise {name}")


@functools.partial(jax.jit, static_argnames=("batch_size", "difficulty", "prompt_len"))
def sample_prompts(rng: jax.Array, batch_size: int, *, difficulty: int = 2,
                   prompt_len: int = 32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(prompt_ids_BxP int32 left-padded with 0, prompt_mask_BxP bool, answers_B int32)."""
  p = sample_problems(rng, batch_size, difficulty=difficulty)
  ids, mask = prompt_ids(p, difficulty=difficulty, prompt_len=prompt_len)
  return ids, mask, p.answers_B


@functools.partial(jax.jit, static_argnames=("batch_size", "difficulty", "prompt_len",
                                             "response_len"))
def sft_batch(rng: jax.Array, *, batch_size: int, difficulty: int = 2, prompt_len: int = 32,
              response_len: int = 32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A supervised warm-up batch: (tokens_BxL, attn_mask_BxL, loss_mask_BxL), L = P + T.

  tokens = left-padded prompt ++ worked solution; the loss mask selects the solution
  tokens and its <eos> (the targets of next-token cross-entropy).
  """
  p = sample_problems(rng, batch_size, difficulty=difficulty)
  pids, pmask = prompt_ids(p, difficulty=difficulty, prompt_len=prompt_len)
  rids, rmask = solution_ids(p, difficulty=difficulty, response_len=response_len)
  tokens = jnp.concatenate([pids, rids], axis=1)
  attn = jnp.concatenate([pmask, rmask], axis=1)
  loss = jnp.concatenate([jnp.zeros_like(pmask), rmask], axis=1)
  return tokens, attn, loss


# --- verifier ------------------------------------------------------------------------
@jax.jit
def verify(response_ids_NxT: jax.Array, response_mask_NxT: jax.Array, answers_N: jax.Array
           ) -> jax.Array:
  """correct_N: the last `\\boxed{` of each response holds exactly its answer.

  Only tokens where the mask is set and that come before the first (masked-in) EOS are
  read; a masked-out token or any non-byte token breaks a pattern like any other
  character would. Malformed answers (no box, no digits, over 9 digits, no `}`) are wrong.
  """
  chex.assert_rank([response_ids_NxT, response_mask_NxT, answers_N], [2, 2, 1])
  chex.assert_equal_shape([response_ids_NxT, response_mask_NxT])
  chex.assert_equal_shape_prefix([response_ids_NxT, answers_N], 1)
  chex.assert_type(answers_N, int)
  n, t = response_ids_NxT.shape
  ids = response_ids_NxT.astype(jnp.int32)
  mask = response_mask_NxT.astype(bool)
  eos_seen = jnp.cumsum(mask & (ids == EOS_ID), axis=1) > 0
  valid = mask & ~eos_seen
  # -1 never equals a byte token, so invalid positions break every pattern.
  pad = len(_BOX) + MAX_ANSWER_DIGITS + 2
  chars = jnp.pad(jnp.where(valid, ids, -1), ((0, 0), (0, pad)), constant_values=-1)

  box = jnp.ones((n, t), bool)
  for k, c in enumerate(_tok(_BOX)):
    box &= chars[:, k:k + t] == c
  start = jnp.max(jnp.where(box, jnp.arange(t)[None, :], -1), axis=1)
  found = start >= 0

  width = MAX_ANSWER_DIGITS + 2
  window = jnp.take_along_axis(
      chars, jnp.maximum(start, 0)[:, None] + len(_BOX) + jnp.arange(width)[None, :], axis=1)
  minus = window[:, 0] == ord("-") + BYTE_OFFSET
  body = jnp.where(minus[:, None], window[:, 1:], window[:, :-1])
  digit = body - (ord("0") + BYTE_OFFSET)
  is_digit = (digit >= 0) & (digit <= 9)
  num_digits = jnp.sum(jnp.cumprod(is_digit, axis=1), axis=1)
  closes = jnp.take_along_axis(body, num_digits[:, None], axis=1)[:, 0] == ord("}") + BYTE_OFFSET
  well_formed = found & (num_digits >= 1) & (num_digits <= MAX_ANSWER_DIGITS) & closes

  value = jnp.zeros((n,), jnp.int32)
  for j in range(MAX_ANSWER_DIGITS):
    value = jnp.where(j < num_digits, value * 10 + jnp.clip(digit[:, j], 0, 9), value)
  value = jnp.where(minus, -value, value)
  return well_formed & (value == answers_N.astype(jnp.int32))


class SyntheticTask(NamedTuple):
  """The `training.iteration.JaxTask` interface: sample_prompts(rng, B), verify(...)."""
  sample_prompts: Any
  verify: Any


def jax_task(difficulty: int = 2, prompt_len: int = 32) -> SyntheticTask:
  """The task at a difficulty, with `sample_prompts(rng, batch_size)` bound to it."""
  level(difficulty)
  _check_len("prompt_len", prompt_len, max_prompt_len(difficulty))

  def sample(rng: jax.Array, batch_size: int):
    return sample_prompts(rng, batch_size, difficulty=difficulty, prompt_len=prompt_len)

  return SyntheticTask(sample_prompts=sample, verify=verify)


# --- host side -----------------------------------------------------------------------
def problem_text(operands: Sequence[int], signs: Sequence[int], num_terms: int) -> str:
  """The prompt without <bos>, e.g. '47+85+9='."""
  parts = [str(int(operands[0]))]
  for k in range(1, int(num_terms)):
    parts.append(("+" if signs[k] > 0 else "-") + str(int(operands[k])))
  return "".join(parts) + "="


def solution_text(operands: Sequence[int], signs: Sequence[int], num_terms: int, *,
                  carry_shortcut: bool = False, premature_answer: bool = False) -> str:
  """The worked solution without <eos>, e.g. '47+85=132,\\boxed{141}'; with
  `carry_shortcut` the last addition drops its units carry (see `shortcut_answers`), with
  `premature_answer` a problem of 3 or more terms boxes its last written running total
  (see `premature_answers`)."""
  total = int(operands[0])
  steps = []
  for k in range(1, int(num_terms)):
    new = total + int(signs[k]) * int(operands[k])
    if k < int(num_terms) - 1:
      steps.append(f"{total}{'+' if signs[k] > 0 else '-'}{int(operands[k])}={new},")
    elif carry_shortcut:
      new = _drop_units_carry(total, int(operands[k]))
    elif premature_answer and steps:
      new = total
    total = new
  return "".join(steps) + _BOX + str(total) + "}"


def host_problems(rng: jax.Array, num: int, *, difficulty: int = 2) -> list[dict[str, Any]]:
  """`num` problems from `sample_problems(rng, num)` as text records (for the tfds builder)."""
  p = jax.device_get(sample_problems(rng, num, difficulty=difficulty))
  lv = level(difficulty)
  out = []
  for i in range(num):
    ops, signs, k = p.operands_BxK[i], p.signs_BxK[i], int(p.num_terms_B[i])
    out.append({"problem": problem_text(ops, signs, k),
                "solution": solution_text(ops, signs, k, carry_shortcut=lv.carry_shortcut,
                                          premature_answer=lv.premature_answer),
                "answer": str(int(p.answers_B[i])), "num_operands": k})
  return out


def verification_text(response_ids: Sequence[int], response_mask: Sequence[bool]) -> str:
  """The text `verify` reads: valid tokens before the first EOS, others as U+FFFD."""
  data = bytearray()
  for tok, m in zip(np.asarray(response_ids).tolist(), np.asarray(response_mask).tolist()):
    if m and tok == EOS_ID:
      break
    is_byte = BYTE_OFFSET <= tok < BYTE_OFFSET + NUM_BYTES
    data.append(tok - BYTE_OFFSET if (m and is_byte) else 0xFF)
  return data.decode("utf-8", errors="replace")


def host_verify(response_ids_NxT: np.ndarray, response_mask_NxT: np.ndarray,
                answers_N: Sequence[int]) -> np.ndarray:
  """The host twin of `verify` (through `rewards.verifiers.synthetic_answer`)."""
  return np.array([verifiers.synthetic_answer(verification_text(ids, m)) == int(a)
                   for ids, m, a in zip(response_ids_NxT, response_mask_NxT, answers_N)], bool)
