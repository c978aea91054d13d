"""The paper's benchmarks built from ../shared/data, and gold self-consistency: each
reference answer, written the way a model would write it, is scored by the verifier.

Every rejection is listed, with its reason, in gold_rejections.json next to this file;
regenerate it with EGPO_UPDATE_GOLD=1 after a deliberate verifier change.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from egpo_jax import rewards
from egpo_jax.data import builders
from egpo_jax.data.loader import decode_record

tfds.disable_progress_bar()

SIZES = {("egpo_math500", "test"): 500, ("egpo_gsm8k", "train"): 7473,
         ("egpo_gsm8k", "test"): 1319, ("egpo_minerva_math", "test"): 272,
         ("egpo_mmlu_stem", "test"): 3018, ("egpo_aime24", "test"): 30,
         ("egpo_amc23", "test"): 40}
# Acceptance floors per group of benchmarks (the bar: 99%; letters: all).
GROUPS = {"math500": ["egpo_math500"], "gsm8k": ["egpo_gsm8k"],
          "minerva": ["egpo_minerva_math"], "aime_amc": ["egpo_aime24", "egpo_amc23"],
          "mmlu_stem": ["egpo_mmlu_stem"]}
FLOORS = {"math500": 0.99, "gsm8k": 0.99, "minerva": 0.99, "aime_amc": 0.99, "mmlu_stem": 1.0}
REJECTIONS = os.path.join(os.path.dirname(__file__), "gold_rejections.json")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory, shared_data_dir):
  """Every benchmark split, built once into a tmp data_dir, as decoded records."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for name in sorted({n for n, _ in SIZES}):
    sources = builders.prepare(name, None, data_dir=data_dir, manual_dir=shared_data_dir)
    for split, src in sources.items():
      out[name, split] = [decode_record(src[i]) for i in range(len(src))]
    meta = builders.BUILDERS[name](data_dir=data_dir).info.metadata["bad_records"]
    for split, report in meta.items():
      assert report["num_bad"] == 0, (name, split, report)
  return out


def test_sizes_and_fields(benchmarks):
  assert {k: len(v) for k, v in benchmarks.items()} == SIZES
  gsm = benchmarks["egpo_gsm8k", "test"][0]
  assert gsm["answer"] == "18" and gsm["problem"].startswith("Janet")
  assert gsm["solution"].endswith("every day at the farmer’s market.")
  assert gsm["verifier"] == "gsm8k"
  assert all("," not in r["answer"] for r in benchmarks["egpo_gsm8k", "train"])
  m = benchmarks["egpo_math500", "test"][0]
  assert (m["id"], m["subject"], m["level"]) == ("test/precalculus/807.json", "Precalculus", 2)
  assert m["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
  assert benchmarks["egpo_minerva_math", "test"][0]["answer"] == "1.6"
  mc = benchmarks["egpo_mmlu_stem", "test"][0]
  assert mc["answer"] == "C" and "\nAnswer Choices: (A) maintain" in mc["problem"]
  assert mc["choices"][2].startswith("reduce the carrying capacity")
  assert mc["verifier"] == "multiple_choice"
  assert benchmarks["egpo_amc23", "test"][0]["answer"] == "27"
  assert benchmarks["egpo_aime24", "test"][0]["level"] == -1
  for records in benchmarks.values():
    assert all(r["problem"].strip() and r["answer"].strip() for r in records)
    assert len({r["id"] for r in records}) == len(records)


def _restyle(latex: str) -> str:
  """Meaning-preserving LaTeX habits of models: \\dfrac, no \\left/\\right, no spacing."""
  for a, b in (("\\dfrac", "\\frac"), ("\\frac", "\\dfrac"), ("\\left", ""),
               ("\\right", ""), ("\\!", ""), ("\\,", "")):
    latex = latex.replace(a, b)
  return " ".join(latex.split()).replace(", ", ",")


def _as_a_model_writes_it(name: str, record) -> str:
  """The reference in another form where the source has one, inside a final box."""
  answer = record["answer"]
  if name in ("egpo_math500", "egpo_minerva_math"):
    answer = _restyle(answer)
  elif name == "egpo_gsm8k":
    answer = f"{int(answer):,}"                                 # thousands separators
  elif name == "egpo_amc23":
    answer = repr(float(answer))                                # "27" -> "27.0"
  elif name == "egpo_aime24":
    answer = f"{int(answer):03d}"                               # AIME's three digits
  elif name == "egpo_mmlu_stem":
    answer = f"({answer}) {record['choices'][ord(answer) - ord('A')]}"
  return f"Working through the problem step by step... so the answer is \\boxed{{{answer}}}."


@pytest.mark.slow
def test_gold_self_consistency(benchmarks):
  keys, kinds, responses, references = [], [], [], []
  for (name, split), records in sorted(benchmarks.items()):
    for r in records:
      keys.append((name, split, r["id"]))
      kinds.append(r["verifier"])
      responses.append(_as_a_model_writes_it(name, r))
      references.append(r["answer"])
  # Negative control: the answers against the next problem's reference (competition math).
  control = [i for i, (n, _, _) in enumerate(keys)
             if n in ("egpo_math500", "egpo_minerva_math", "egpo_aime24", "egpo_amc23")][::4]
  shifted = [references[control[(j + 1) % len(control)]] for j in range(len(control))]
  with rewards.VerifierPool(2) as pool:
    out = pool.check(kinds, responses, references, timeout=10.0)
    wrong = pool.check([kinds[i] for i in control], [responses[i] for i in control], shifted,
                       timeout=10.0)
  same = np.array([references[i] == s for i, s in zip(control, shifted)])
  assert wrong.correct[~same].mean() < 0.02, wrong.correct[~same].mean()
  rejected = {f"{n}/{s}/{i}": {"reference": ref, "reason": why}
              for (n, s, i), ok, ref, why in zip(keys, out.correct, references, out.reasons)
              if not ok}
  if os.environ.get("EGPO_UPDATE_GOLD"):
    with open(REJECTIONS, "w") as f:
      json.dump(rejected, f, indent=1, sort_keys=True, ensure_ascii=False)
      f.write("\n")
  with open(REJECTIONS) as f:
    listed = json.load(f)
  assert rejected == listed, (
      "gold rejections changed; unlisted: "
      f"{ {k: v for k, v in rejected.items() if k not in listed} }, "
      f"no longer rejected: {sorted(set(listed) - set(rejected))}")
  correct = dict(zip(keys, out.correct))
  for group, names in GROUPS.items():
    scores = [ok for (n, _, _), ok in correct.items() if n in names]
    assert np.mean(scores) >= FLOORS[group], (group, np.mean(scores))
