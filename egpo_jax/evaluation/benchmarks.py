"""The evaluation benchmarks as uniform records (id, problem, answer, subject, level, verifier).

The paper's benchmarks are read from local JSONL files (`<data_dir>/<name>/test.jsonl`,
e.g. ../shared/data) with the same parsers as the tfds builders of `egpo_jax.data`
(`data.records.PARSERS`), so a record here is the record a built dataset holds; without a
local file the tfds builder is used (it downloads where a network exists). The
`synthetic` benchmark is the demo's arithmetic task: the test split of
`data.builders.SyntheticArithmetic` (problems drawn from a fixed seed by the same jnp
sampler the trainer uses), scored by the task's jnp verifier.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from egpo_jax.data import records as records_lib

PAPER_BENCHMARKS = ("math500", "gsm8k", "minerva_math", "mmlu_stem", "aime24", "amc23")
SYNTHETIC = "synthetic"
BENCHMARKS = PAPER_BENCHMARKS + (SYNTHETIC,)
# The synthetic test split's size (data.builders.SyntheticConfig.num_test); --limit picks
# a prefix of it, so a smaller evaluation is a subset of a larger one.
SYNTHETIC_TEST_SIZE = 1000
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Benchmark:
  """One benchmark's records and where they came from."""
  name: str
  records: list[dict[str, Any]]
  source: str
  bad_records: records_lib.ReadReport | None = None


def default_data_dir() -> str | None:
  """$EGPO_SHARED_DATA, else ../shared/data beside the repository, if it exists."""
  for path in (os.environ.get("EGPO_SHARED_DATA"), os.path.join(_REPO, "..", "shared", "data")):
    if path and os.path.isdir(path):
      return os.path.abspath(path)
  return None


def parse_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
  """'math500,gsm8k' (or a list) -> validated names, in order, without duplicates."""
  names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
  names = list(dict.fromkeys(n for n in names if n))
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown or not names:
    raise ValueError(f"--benchmarks: unknown {unknown or 'empty list'}; use a comma-separated "
                     f"subset of {', '.join(BENCHMARKS)}")
  return names


def synthetic_records(num: int = SYNTHETIC_TEST_SIZE, *, difficulty: int = 2,
                      seed: int = 0) -> list[dict[str, Any]]:
  """The test split of `SyntheticArithmetic(difficulty, seed)` as records, first `num`."""
  from egpo_jax.data import builders, synthetic  # pylint: disable=g-import-not-at-top
  key = builders.synthetic_split_key(seed, "test")
  problems = synthetic.host_problems(key, max(num, SYNTHETIC_TEST_SIZE), difficulty=difficulty)
  return [{"id": f"test/{i}", "problem": p["problem"], "answer": p["answer"],
           "solution": p["solution"], "subject": f"difficulty {difficulty}",
           "level": int(p["num_operands"]), "verifier": "synthetic"}
          for i, p in enumerate(problems[:num])]


def load(name: str, *, data_dir: str | None = None, split: str = "test",
         tfds_dir: str | None = None, synthetic_difficulty: int = 2,
         synthetic_seed: int = 0, synthetic_size: int = SYNTHETIC_TEST_SIZE) -> Benchmark:
  """All records of one benchmark's split (bad lines are skipped and counted).

  Args:
    name: one of `BENCHMARKS`.
    data_dir: folder with `<name>/<split>.jsonl` (default: `default_data_dir()`).
    split: the split to read.
    tfds_dir: where the tfds builder keeps a built dataset when no local file exists.
    synthetic_difficulty, synthetic_seed, synthetic_size: the synthetic task's test split.
  """
  parse_names([name])
  if name == SYNTHETIC:
    return Benchmark(name, synthetic_records(synthetic_size, difficulty=synthetic_difficulty,
                                             seed=synthetic_seed),
                     source=f"synthetic(difficulty={synthetic_difficulty}, "
                            f"seed={synthetic_seed})")
  data_dir = data_dir or default_data_dir()
  path = os.path.join(data_dir, name, f"{split}.jsonl") if data_dir else None
  if path and os.path.isfile(path):
    recs, report = records_lib.read_jsonl(path, records_lib.PARSERS[name])
    return Benchmark(name, recs, source=os.path.abspath(path), bad_records=report)
  return _load_tfds(name, split, data_dir, tfds_dir)


def _load_tfds(name: str, split: str, data_dir: str | None, tfds_dir: str | None) -> Benchmark:
  from egpo_jax.data import builders, loader  # pylint: disable=g-import-not-at-top
  tfds_dir = tfds_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  try:
    source = builders.prepare(f"egpo_{name}", split, data_dir=tfds_dir, manual_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - the builder's error says what is missing
    raise FileNotFoundError(
        f"benchmark {name!r}: no {name}/{split}.jsonl under --data_dir={data_dir!r} and the "
        f"tfds builder failed ({type(e).__name__}: {e}); point --data_dir at a folder "
        "holding it (e.g. ../shared/data)") from e
  recs = [loader.decode_record(source[i]) for i in range(len(source))]
  return Benchmark(name, recs, source=f"tfds egpo_{name}/{split} in {tfds_dir}")
