"""Host verification throughput (responses/s) of boxed LaTeX answers with math-verify:
in this process (the baseline) against the worker pool with 1 and 2 processes.

The workload is a batch as training sees it: G = 8 responses for each of B prompts, half
of them right in another form than the reference (fractions vs decimals, reordered sets,
`x=` prefixes, `\\dfrac`), half wrong, each with a line of reasoning before its box. The
pool rows include the inter-process round trips; worker start-up is reported separately.
"""

from __future__ import annotations

import random
import time

from benchmarks import harness
from egpo_jax import rewards

NOTES = """Every item is one `check` (box extraction, units guard, math-verify parse and
verify, the reference's parse cached). The pool's own cost is small: about 0.2 ms per item
(5,000-6,000 trivial items/s through the pipes, measured with the regex-only "synthetic"
kind), against several ms of sympy per math item. Worker start-up (importing sympy and
math-verify) is paid once per pool. These numbers were taken on 2 CPU cores shared with
other jobs (load average about 8), where extra processes only compete for the same cores,
so the pool rows here are a floor, not what 2 free cores give; rerun on an idle machine."""


def _problem(rng: random.Random):
  """(reference, a right answer in another form, a wrong answer)."""
  kind = rng.randrange(5)
  a, b = rng.randint(1, 40), rng.randint(2, 12)
  if kind == 0:
    return f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
  if kind == 1:
    return f"{a / 4}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 0.01}"
  if kind == 2:
    return (f"\\{{{a}, {b}, {a + b}\\}}", f"\\{{{a + b}, {a}, {b}\\}}",
            f"\\{{{a}, {b}\\}}")
  if kind == 3:
    return f"{a}", f"x={a}", f"x={a + b}"
  return (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{b}}}\\cdot {a}", f"{a}\\sqrt{{{b + 1}}}")


def _batch(num_prompts: int, group: int, seed: int = 0):
  rng = random.Random(seed)
  responses, references = [], []
  for _ in range(num_prompts):
    ref, right, wrong = _problem(rng)
    for j in range(group):
      answer = right if j % 2 == 0 else wrong
      responses.append(f"We simplify step by step and check the result. "
                       f"Hence the answer is \\boxed{{{answer}}}.")
      references.append(ref)
  return responses, references


def run(quick: bool) -> list[harness.Row]:
  responses, references = _batch(8 if quick else 32, 8)
  n = len(responses)
  repeats = 2 if quick else 3
  expected = [j % 2 == 0 for j in range(n)]

  def in_process():
    out = rewards.check_in_process("math", responses, references, timeout=5.0)
    assert out.correct.tolist() == expected, out.reasons
    return out.correct

  fns = {"in-process": in_process}
  startup = {}
  pools = []
  for workers in (1, 2):
    start = time.perf_counter()
    pool = rewards.VerifierPool(workers)
    startup[workers] = time.perf_counter() - start
    pools.append(pool)

    def pooled(pool=pool):
      out = pool.check("math", responses, references, timeout=5.0)
      assert out.correct.tolist() == expected, out.reasons
      return out.correct

    fns[f"pool, {workers} worker{'s' if workers > 1 else ''}"] = pooled
  try:
    rows = harness.alternate_rows(fns, warmup=1, repeats=repeats)
  finally:
    for pool in pools:
      pool.close()
  for row in rows:
    row.extra["responses"] = n
    row.extra["responses/s"] = round(n / row.seconds, 1)
    if row.name != "in-process":
      row.baseline = "in-process"
      row.extra["start-up s"] = round(startup[1 if "1 worker" in row.name else 2], 2)
  return rows
