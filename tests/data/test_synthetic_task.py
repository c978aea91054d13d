"""The synthetic arithmetic task: jnp generator vs host text, layouts, and the jnp verifier
against its host twin on thousands of random (mostly malformed) responses."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, strategies as st

from egpo_jax.data import synthetic as S
from egpo_jax.models.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer

TOK = ByteTokenizer()
B = 256


def _ids(text: str) -> list[int]:
  return TOK.encode(text)


def _batch(texts, t=32, masks=None):
  ids = np.zeros((len(texts), t), np.int32)
  mask = np.zeros((len(texts), t), bool)
  for i, s in enumerate(texts):
    row = _ids(s)[:t]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, (mask if masks is None else masks)


def _evaluate(text: str) -> int:
  """Left-to-right + and - over the integers of a prompt like '12+3-4='."""
  assert re.fullmatch(r"\d+([+-]\d+)+=", text), text
  tokens = re.findall(r"[+-]?\d+", text[:-1])
  return sum(int(t) for t in tokens)


@pytest.fixture(scope="module", params=[2, 7])
def rendered(request):
  d = request.param
  p = S.sample_problems(jax.random.key(d), B, difficulty=d)
  prompt, pmask = S.prompt_ids(p, difficulty=d, prompt_len=S.max_prompt_len(d) + 3)
  sol, smask = S.solution_ids(p, difficulty=d, response_len=S.max_response_len(d))
  return d, jax.device_get(p), *map(np.asarray, (prompt, pmask, sol, smask))


def test_prompts_are_left_padded_and_decode_to_the_host_text(rendered):
  d, p, prompt, pmask, _, _ = rendered
  lv = S.level(d)
  assert prompt.dtype == np.int32 and pmask.dtype == np.bool_
  assert (np.diff(pmask.astype(int), axis=1) >= 0).all(), "mask must be a suffix"
  assert (prompt[~pmask] == PAD_ID).all()
  first = np.argmax(pmask, axis=1)
  assert (prompt[np.arange(B), first] == BOS_ID).all()
  for i in range(B):
    text = TOK.decode(prompt[i][pmask[i]])
    k = int(p.num_terms_B[i])
    assert text == S.problem_text(p.operands_BxK[i], p.signs_BxK[i], k)
    assert _evaluate(text) == int(p.answers_B[i])
    assert lv.min_operands <= k <= lv.max_operands
  assert pmask.sum(1).max() <= S.max_prompt_len(d)


def test_solutions_decode_to_the_host_text_and_verify(rendered):
  d, p, _, _, sol, smask = rendered
  lens = smask.sum(1)
  assert (sol[np.arange(B), lens - 1] == EOS_ID).all()
  assert lens.max() <= S.max_response_len(d)
  for i in range(B):
    text = TOK.decode(sol[i][smask[i]])
    assert text == S.solution_text(p.operands_BxK[i], p.signs_BxK[i], int(p.num_terms_B[i]))
  answers = jnp.asarray(p.answers_B)
  assert bool(S.verify(sol, smask, answers).all())
  assert not bool(S.verify(sol, smask, answers + 1).any())
  assert S.host_verify(sol, smask, p.answers_B).all()


def test_worked_solution_example():
  ops, signs = [47, 85, 9], [1, 1, -1]
  assert S.problem_text(ops, signs, 3) == "47+85-9="
  assert S.solution_text(ops, signs, 3) == "47+85=132,\\boxed{123}"
  assert S.solution_text(ops, signs, 2) == "\\boxed{132}"


def test_distribution_and_seeds():
  d = 2
  lv = S.level(d)
  # 16 draws of the fixture's compiled batch size rather than a new shape to compile.
  p = _many_problems(jax.random.key(0), d, 16)
  live = np.arange(lv.max_operands)[None] < p.num_terms_B[:, None]
  ops = p.operands_BxK[live]
  assert ops.min() == 0 and ops.max() == lv.max_operand
  counts = np.bincount(ops, minlength=lv.max_operand + 1)
  assert counts.min() > 0.5 * counts.mean()
  terms = np.bincount(p.num_terms_B)[lv.min_operands:]
  assert terms.min() > 0.4 * len(p.num_terms_B) / len(terms)
  assert (p.operands_BxK[~live] == 0).all() and (p.signs_BxK == 1).all()
  again = _many_problems(jax.random.key(0), d, 16)
  other = _many_problems(jax.random.key(1), d, 16)
  np.testing.assert_array_equal(p.operands_BxK, again.operands_BxK)
  assert (p.operands_BxK != other.operands_BxK).any()


def _many_problems(key, difficulty, n):
  parts = [jax.device_get(S.sample_problems(k, B, difficulty=difficulty))
           for k in jax.random.split(key, n)]
  return S.Problems(*(np.concatenate(f) for f in zip(*parts)))


def test_sft_batch_layout():
  key = jax.random.key(3)
  p_len, r_len = S.max_prompt_len(2) + 3, S.max_response_len(2)  # the fixture's shapes
  tokens, attn, loss = map(np.asarray, S.sft_batch(key, batch_size=B, difficulty=2,
                                                    prompt_len=p_len, response_len=r_len))
  assert tokens.shape == attn.shape == loss.shape == (B, p_len + r_len)
  p = S.sample_problems(key, B, difficulty=2)
  prompt, pmask = map(np.asarray, S.prompt_ids(p, difficulty=2, prompt_len=p_len))
  sol, smask = map(np.asarray, S.solution_ids(p, difficulty=2, response_len=r_len))
  np.testing.assert_array_equal(tokens, np.concatenate([prompt, sol], 1))
  np.testing.assert_array_equal(attn, np.concatenate([pmask, smask], 1))
  assert not loss[:, :p_len].any()
  np.testing.assert_array_equal(loss[:, p_len:], smask)


def test_jax_task_interface_and_errors():
  p_len = S.max_prompt_len(2) + 3
  task = S.jax_task(difficulty=2, prompt_len=p_len)
  ids, mask, answers = task.sample_prompts(jax.random.key(0), B)
  chex.assert_shape([ids, mask], (B, p_len))
  chex.assert_shape(answers, (B,))
  assert answers.dtype == jnp.int32
  p = S.sample_problems(jax.random.key(0), B, difficulty=2)
  np.testing.assert_array_equal(answers, p.answers_B)
  sol = S.solution_ids(p, difficulty=2, response_len=S.max_response_len(2))
  n = jnp.repeat(answers, 2)
  correct = task.verify(jnp.repeat(sol[0], 2, 0), jnp.repeat(sol[1], 2, 0), n)
  assert correct.shape == (2 * B,) and bool(correct.all())
  with pytest.raises(ValueError, match="difficulty=0"):
    S.jax_task(difficulty=0)
  with pytest.raises(ValueError, match="prompt_len=4 is too short"):
    S.jax_task(difficulty=2, prompt_len=4)
  with pytest.raises(ValueError, match="response_len=8 is too short"):
    S.sft_batch(jax.random.key(0), batch_size=2, difficulty=2, prompt_len=32, response_len=8)
  with pytest.raises(ValueError, match="operand slots"):
    S.prompt_ids(S.sample_problems(jax.random.key(0), 2, difficulty=2), difficulty=6,
                 prompt_len=32)


class VerifyVariantsTest(parameterized.TestCase):
  """Hand-written responses, jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_cases(self):
    verify = self.variant(S.verify.__wrapped__)
    cases = [  # (text, answer, correct)
        ("3+4=\\boxed{7}", 7, True),
        ("\\boxed{-12}", -12, True),
        ("\\boxed{12}", -12, False),
        ("\\boxed{7}\\boxed{8}", 7, False),      # only the last box counts
        ("\\boxed{8}\\boxed{7}", 7, True),
        ("\\boxed{7", 7, False),                  # unclosed
        ("\\boxed{}", 0, False),                  # empty
        ("\\boxed{ 7}", 7, False),                # a space is malformed
        ("\\boxed{007}", 7, True),
        ("\\boxed{1234567890}", 1234567890, False),  # over 9 digits
        ("boxed{7}", 7, False),
        ("7", 7, False),
    ]
    ids, mask = _batch([c[0] for c in cases])
    got = verify(jnp.asarray(ids), jnp.asarray(mask),
                 jnp.asarray([c[1] for c in cases], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), [c[2] for c in cases])

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_and_eos_end_the_response(self):
    verify = self.variant(S.verify.__wrapped__)
    text = "\\boxed{7}"
    ids, mask = _batch([text] * 4)
    mask[1, 3] = False                      # a masked-out token inside the box
    ids[2, 4] = EOS_ID                      # EOS before the box closes
    ids[3, len(text)] = EOS_ID              # EOS right after: fine
    mask[3, len(text)] = True
    mask[3, len(text) + 1:] = True          # masked-in junk after EOS is ignored
    ids[3, len(text) + 1:len(text) + 10] = _ids("\\boxed{9}")
    got = verify(jnp.asarray(ids), jnp.asarray(mask), jnp.full((4,), 7, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), [True, False, False, True])


def _random_responses(rng: np.random.Generator, n: int, t: int):
  """Token soup built from the grammar's pieces: mostly malformed, sometimes right."""
  pieces = ["\\boxed{", "}", "{", "-", "\\boxed", "boxed{", "=", ",", "+", " ", "\\"]
  ids = np.zeros((n, t), np.int32)
  answers = rng.integers(-60, 200, n)
  for i in range(n):
    row: list[int] = []
    while len(row) < t:
      r = rng.random()
      if r < 0.25:
        row += _ids(rng.choice(pieces))
      elif r < 0.45:
        row += _ids(str(rng.integers(0, 10**rng.integers(1, 11))))
      elif r < 0.55:
        row += _ids(f"\\boxed{{{answers[i] + rng.integers(-1, 2) * (rng.random() < 0.3)}}}")
      elif r < 0.62:
        row.append(int(rng.choice([PAD_ID, BOS_ID, EOS_ID, 259, 300])))
      elif r < 0.7:
        row += [int(b) + 3 for b in rng.integers(128, 256, rng.integers(1, 3))]
      else:
        row += _ids(chr(rng.integers(32, 127)))
    ids[i] = row[:t]
  lengths = rng.integers(0, t + 1, n)
  mask = np.arange(t)[None] < lengths[:, None]
  holes = rng.random((n, t)) < 0.02
  mask = np.where(rng.random((n, 1)) < 0.2, mask & ~holes, mask)
  return ids, mask, answers.astype(np.int32)


def test_jnp_and_host_verifiers_agree_on_random_responses():
  ids, mask, answers = _random_responses(np.random.default_rng(0), 3000, 32)
  got = np.asarray(S.verify(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(answers)))
  want = S.host_verify(ids, mask, answers)
  bad = np.flatnonzero(got != want)
  assert bad.size == 0, [(S.verification_text(ids[i], mask[i]), answers[i]) for i in bad[:5]]
  # Both classes occur, and the rows with a box are not all one way.
  assert 100 < want.sum() < 2900
  boxed = np.array([S.verification_text(r, m).rfind("\\boxed{") >= 0 for r, m in zip(ids, mask)])
  assert boxed.sum() > 1000 and (~want[boxed]).sum() > 300


@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6),
       st.text(alphabet="0123456789+-={}x ,", max_size=8))
def test_verify_property_last_box_decides(value, answer, junk):
  text = f"{junk}\\boxed{{{value}}}"
  ids, mask = _batch([text], t=32)
  got = bool(S.verify(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([answer], jnp.int32))[0])
  assert got == (value == answer)


def test_carry_shortcut_level_demonstrates_a_confident_wrong_rule():
  """Level 8: level 2's prompts and true answers; its worked solutions box the sum whose
  last addition drops the units carry, so exactly the problems with that carry are
  demonstrated wrong."""
  d = 8
  assert S.max_prompt_len(d) == S.max_prompt_len(2)
  p = jax.device_get(S.sample_problems(jax.random.key(5), B, difficulty=d))
  p2 = jax.device_get(S.sample_problems(jax.random.key(5), B, difficulty=2))
  np.testing.assert_array_equal(p.answers_B, p2.answers_B)   # the task is level 2's
  sol, smask = map(np.asarray, S.solution_ids(p, difficulty=d,
                                              response_len=S.max_response_len(d)))
  last = p.operands_BxK[np.arange(B), p.num_terms_B - 1]
  carry = ((p.answers_B - last) % 10 + last % 10) >= 10
  assert 0.3 < carry.mean() < 0.6, carry.mean()
  shortcut = np.asarray(S.shortcut_answers(S.Problems(*map(jnp.asarray, p))))
  np.testing.assert_array_equal(shortcut, np.where(carry, p.answers_B - 10, p.answers_B))
  correct = np.asarray(S.verify(sol, smask, jnp.asarray(p.answers_B)))
  np.testing.assert_array_equal(correct, ~carry)
  np.testing.assert_array_equal(S.verify(sol, smask, jnp.asarray(shortcut)), True)
  for i in range(B):
    assert TOK.decode(sol[i][smask[i]]) == S.solution_text(
        p.operands_BxK[i], p.signs_BxK[i], int(p.num_terms_B[i]), carry_shortcut=True)
  assert S.solution_text([47, 85], [1, 1], 2, carry_shortcut=True) == "\\boxed{122}"
  # Intermediate steps carry; only the last addition drops it.
  assert (S.solution_text([18, 5, 7], [1, 1, 1], 3, carry_shortcut=True)
          == "18+5=23,\\boxed{20}")
  # Host records: the demonstration uses the shortcut, the answer is the true sum.
  q = S.sample_problems(jax.random.key(6), 64, difficulty=d)
  recs = S.host_problems(jax.random.key(6), 64, difficulty=d)
  assert [r["answer"] for r in recs] == [str(int(a)) for a in q.answers_B]
  assert [r["solution"].split("{")[-1][:-1] for r in recs] == [
      str(int(a)) for a in S.shortcut_answers(q)]
  with pytest.raises(ValueError, match="carry_shortcut"):
    S.Level(2, 3, 19, "+-", carry_shortcut=True)


def test_premature_answer_level_boxes_the_last_written_total():
  """Level 9: level 2's prompts and true answers; a problem of 3 terms is demonstrated
  with the running total it wrote boxed (one step early), so it is demonstrated wrong
  exactly when its last operand is not 0; 2-term problems are demonstrated as level 2."""
  d = 9
  assert S.max_prompt_len(d) == S.max_prompt_len(2)
  assert S.max_response_len(d) == S.max_response_len(2)
  p = jax.device_get(S.sample_problems(jax.random.key(7), B, difficulty=d))
  p2 = jax.device_get(S.sample_problems(jax.random.key(7), B, difficulty=2))
  np.testing.assert_array_equal(p.answers_B, p2.answers_B)   # the task is level 2's
  sol, smask = map(np.asarray, S.solution_ids(p, difficulty=d,
                                              response_len=S.max_response_len(d)))
  rows = np.arange(B)
  last = p.operands_BxK[rows, p.num_terms_B - 1]
  wrong = (p.num_terms_B == 3) & (last != 0)
  assert 0.4 < wrong.mean() < 0.55, wrong.mean()   # half 3-term, 20 of 21 last != 0
  early = np.asarray(S.premature_answers(S.Problems(*map(jnp.asarray, p))))
  np.testing.assert_array_equal(early, np.where(p.num_terms_B == 3, p.answers_B - last,
                                                p.answers_B))
  np.testing.assert_array_equal(np.asarray(S.verify(sol, smask, jnp.asarray(p.answers_B))),
                                ~wrong)
  np.testing.assert_array_equal(S.verify(sol, smask, jnp.asarray(early)), True)
  for i in range(B):
    assert TOK.decode(sol[i][smask[i]]) == S.solution_text(
        p.operands_BxK[i], p.signs_BxK[i], int(p.num_terms_B[i]), premature_answer=True)
  assert S.solution_text([12, 7, 5], [1, 1, 1], 3, premature_answer=True) == \
      "12+7=19,\\boxed{19}"
  assert S.solution_text([47, 85], [1, 1], 2, premature_answer=True) == "\\boxed{132}"
  # Host records: the demonstration stops early, the answer is the true sum.
  q = S.sample_problems(jax.random.key(8), 64, difficulty=d)
  recs = S.host_problems(jax.random.key(8), 64, difficulty=d)
  assert [r["answer"] for r in recs] == [str(int(a)) for a in q.answers_B]
  assert [r["solution"].split("{")[-1][:-1] for r in recs] == [
      str(int(a)) for a in S.premature_answers(q)]
  with pytest.raises(ValueError, match="at most one"):
    S.Level(2, 3, 19, carry_shortcut=True, premature_answer=True)
