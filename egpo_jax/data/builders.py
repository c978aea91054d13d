"""tensorflow-datasets builders for the paper's benchmarks, a user's JSONL and the synthetic
task. They write array_record files (no TensorFlow needed) read by `tfds.data_source`.

    from egpo_jax.data import builders
    source = builders.prepare("egpo_gsm8k", "test", data_dir=tmp, manual_dir="../shared/data")

A benchmark builder reads `<manual_dir>/<folder>/<split>.jsonl` (or `<manual_dir>/<split>.jsonl`)
when present, and otherwise downloads the official public file (`URLS`; a `urls=` argument
points it at a mirror). Bad records are skipped with a counted `BadRecordWarning`, or the
build is rejected (config `on_bad_record="raise"`); the build's `info.metadata` keeps the
counts and the first ids with their reasons.

Builder configs change the data on disk: give a config with other values its own name.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from egpo_jax.data import records as records_lib

_RECORD_FEATURES = {
    "id": tfds.features.Text(),
    "problem": tfds.features.Text(),
    "answer": tfds.features.Text(),
    "solution": tfds.features.Text(),
    "subject": tfds.features.Text(),
    "level": tfds.features.Scalar(dtype=np.int32),
    "verifier": tfds.features.Text(),
}

def _code_path(cls) -> epath.Path:
  """This file. tfds's own lookup needs `importlib_resources` (declared only for Python < 3.9)
  for builders defined in a package; its fallback, used here, needs nothing."""
  return epath.Path(inspect.getfile(cls))


_QWEN_EVAL = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data"


@dataclasses.dataclass(eq=False)
class RecordConfig(tfds.core.BuilderConfig):
  """on_bad_record: "skip" (warn and count) or "raise" (reject the build).
  max_problem_chars: problems longer than this are bad records (None: no limit)."""
  on_bad_record: str = "skip"
  max_problem_chars: int | None = None


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads one JSONL file per split through a `records` parser."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [RecordConfig(name="default")]
  FILE_FORMAT = "array_record"
  FOLDER: ClassVar[str] = ""
  SPLITS: ClassVar[Mapping[str, str]] = {}
  URLS: ClassVar[Mapping[str, str]] = {}
  EXTRA_FEATURES: ClassVar[Mapping[str, Any]] = {}
  DESCRIPTION: ClassVar[str] = ""
  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def __init__(self, *, urls: Mapping[str, str] | None = None, file_format: str | None = None,
               **kwargs):
    self._urls = dict(self.URLS if urls is None else urls)
    super().__init__(file_format=file_format or self.FILE_FORMAT, **kwargs)

  def _parse(self, raw: Mapping[str, Any], index: int) -> dict[str, Any]:
    raise NotImplementedError

  def _id_fields(self) -> tuple[str, ...]:
    return records_lib.DEFAULT_ID_FIELDS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({**_RECORD_FEATURES, **self.EXTRA_FEATURES}),
        metadata=tfds.core.MetadataDict(),
        # Records stay in file order (record i = the i-th good line); loaders shuffle.
        disable_shuffling=True)

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name
    files = ", ".join(f"{self.FOLDER}/{f}" for f in self.SPLITS.values())
    return (f"Put {files} (JSONL, one record a line, as published) under the manual_dir, "
            "e.g. ../shared/data; without it the builder downloads from the official URLs.")

  def _local_file(self, dl_manager, filename: str) -> str | None:
    manual = getattr(dl_manager, "_manual_dir", None)
    if not manual:
      return None
    for candidate in (os.path.join(os.fspath(manual), self.FOLDER, filename),
                      os.path.join(os.fspath(manual), filename)):
      if os.path.isfile(candidate):
        return candidate
    return None

  def _split_generators(self, dl_manager):
    paths = {}
    for split, filename in self.SPLITS.items():
      local = self._local_file(dl_manager, filename)
      if local is None:
        url = self._urls.get(split)
        if not url:
          raise FileNotFoundError(f"{self.name}: no {self.FOLDER}/{filename} in manual_dir "
                                  f"and no URL for split {split!r}. "
                                  f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        try:
          local = os.fspath(dl_manager.download(url))
        except Exception as e:  # pylint: disable=broad-except
          raise FileNotFoundError(
              f"{self.name}: no {self.FOLDER}/{filename} in manual_dir, and downloading {url} "
              f"failed ({type(e).__name__}: {e}). {self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
      paths[split] = local
    return {split: self._generate_examples(path, split) for split, path in paths.items()}

  def _generate_examples(self, path: str, split: str):
    cfg = self.builder_config
    records, report = records_lib.read_jsonl(path, self._parse,
                                             max_problem_chars=cfg.max_problem_chars,
                                             id_fields=self._id_fields())
    report.source = f"{self.name}/{split}"
    records_lib.apply_policy(report, cfg.on_bad_record)
    self.info.metadata.setdefault("bad_records", {})[split] = report.to_json()
    for i, rec in enumerate(records):
      yield i, rec


class Math500(_JsonlBuilder):
  """MATH-500 (the MATH test subset of PRM800K; Lightman et al. 2023)."""
  name = "egpo_math500"
  FOLDER = "math500"
  SPLITS = {"test": "test.jsonl"}
  URLS = {"test": "https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/"
                  "test.jsonl"}
  DESCRIPTION = "MATH-500: problem, solution, answer, subject, level, unique_id."

  def _parse(self, raw, index):
    return records_lib.math500(raw, index)


class Gsm8k(_JsonlBuilder):
  """GSM8K (Cobbe et al. 2021): train 7,473 and test 1,319 grade-school problems."""
  name = "egpo_gsm8k"
  FOLDER = "gsm8k"
  SPLITS = {"train": "train.jsonl", "test": "test.jsonl"}
  URLS = {s: "https://raw.githubusercontent.com/openai/grade-school-math/master/"
             f"grade_school_math/data/{s}.jsonl" for s in ("train", "test")}
  DESCRIPTION = "GSM8K; the reference answer is the number after '####'."

  def _parse(self, raw, index):
    return records_lib.gsm8k(raw, index)


class MinervaMath(_JsonlBuilder):
  """Minerva's MIT OpenCourseWare problems (Lewkowycz et al. 2022), 272 problems."""
  name = "egpo_minerva_math"
  FOLDER = "minerva_math"
  SPLITS = {"test": "test.jsonl"}
  URLS = {"test": f"{_QWEN_EVAL}/minerva_math/test.jsonl"}
  DESCRIPTION = "Minerva math; the reference answer is the solution's last \\boxed{}."

  def _parse(self, raw, index):
    return records_lib.minerva_math(raw, index)


class MmluStem(_JsonlBuilder):
  """MMLU's STEM subjects (Hendrycks et al. 2021) as Qwen2.5-Math evaluates them."""
  name = "egpo_mmlu_stem"
  FOLDER = "mmlu_stem"
  SPLITS = {"test": "test.jsonl"}
  URLS = {"test": f"{_QWEN_EVAL}/mmlu_stem/test.jsonl"}
  EXTRA_FEATURES = {"choices": tfds.features.Sequence(tfds.features.Text())}
  DESCRIPTION = "MMLU-STEM; the problem lists the choices, the answer is a letter."

  def _parse(self, raw, index):
    return records_lib.mmlu_stem(raw, index)


class Aime24(_JsonlBuilder):
  """AIME 2024 I and II, 30 problems."""
  name = "egpo_aime24"
  FOLDER = "aime24"
  SPLITS = {"test": "test.jsonl"}
  URLS = {"test": f"{_QWEN_EVAL}/aime24/test.jsonl"}

  def _parse(self, raw, index):
    return records_lib.aime24(raw, index)


class Amc23(_JsonlBuilder):
  """AMC 2023 (12A/12B), 40 problems."""
  name = "egpo_amc23"
  FOLDER = "amc23"
  SPLITS = {"test": "test.jsonl"}
  URLS = {"test": f"{_QWEN_EVAL}/amc23/test.jsonl"}

  def _parse(self, raw, index):
    return records_lib.amc23(raw, index)


@dataclasses.dataclass(eq=False)
class JsonlConfig(RecordConfig):
  """A user's JSONL: files per split (absolute, or relative to manual_dir), field names,
  the answer format ("raw" | "boxed" | "gsm8k") and the verifier kind of its records."""
  files: Mapping[str, str] = dataclasses.field(default_factory=dict)
  problem_field: str = "problem"
  answer_field: str = "answer"
  id_field: str = ""
  solution_field: str = ""
  answer_format: str = "raw"
  verifier: str = "math"


class Jsonl(_JsonlBuilder):
  """A user's own training JSONL (e.g. OpenR1-Math-style), configured by `JsonlConfig`.

      cfg = JsonlConfig(name="openr1_10k", files={"train": "/data/openr1.jsonl"},
                        answer_field="answer")
      builders.prepare(Jsonl, "train", data_dir=..., config=cfg)
  """
  name = "egpo_jsonl"
  BUILDER_CONFIGS = [JsonlConfig(name="default")]

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.files:
      raise ValueError("JsonlConfig.files is empty: map split names to JSONL paths, "
                       "e.g. files={'train': '/path/train.jsonl'}")
    manual = getattr(dl_manager, "_manual_dir", None)
    out = {}
    for split, path in cfg.files.items():
      if not os.path.isabs(path) and manual:
        path = os.path.join(os.fspath(manual), path)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"JsonlConfig.files[{split!r}] = {path!r} does not exist")
      out[split] = self._generate_examples(path, split)
    return out

  def _id_fields(self) -> tuple[str, ...]:
    cfg = self.builder_config
    return ((cfg.id_field,) if cfg.id_field else ()) + records_lib.DEFAULT_ID_FIELDS

  def _parse(self, raw, index):
    cfg = self.builder_config
    return records_lib.generic(raw, index, problem_field=cfg.problem_field,
                               answer_field=cfg.answer_field, id_field=cfg.id_field,
                               solution_field=cfg.solution_field,
                               answer_format=cfg.answer_format, verifier=cfg.verifier)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """The synthetic arithmetic task: difficulty (`synthetic.LEVELS`), seed, split sizes."""
  difficulty: int = 2
  seed: int = 0
  num_train: int = 20_000
  num_test: int = 1_000


class SyntheticArithmetic(tfds.core.GeneratorBasedBuilder):
  """Records rendered from `synthetic.sample_problems`, so they equal the jnp generator's.

  Split s draws its problems with `synthetic_split_key(seed, s)`; the record's `level`
  is the problem's number of operands and `solution` its worked solution.
  """
  name = "egpo_synthetic_arithmetic"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticConfig(name="default")]
  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def __init__(self, *, file_format: str | None = None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        dict(_RECORD_FEATURES)), description="Procedural arithmetic with worked solutions.",
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split: str, num: int):
    from egpo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    cfg = self.builder_config
    problems = synthetic.host_problems(synthetic_split_key(cfg.seed, split), num,
                                       difficulty=cfg.difficulty)
    for i, p in enumerate(problems):
      yield i, {"id": f"{split}/{i}", "problem": p["problem"], "answer": p["answer"],
                "solution": p["solution"], "subject": f"difficulty {cfg.difficulty}",
                "level": p["num_operands"], "verifier": "synthetic"}


def synthetic_split_key(seed: int, split: str):
  """The jax key a split of `SyntheticArithmetic` draws its problems from."""
  import jax  # pylint: disable=g-import-not-at-top
  salt = {"train": 0, "test": 1}[split]
  return jax.random.fold_in(jax.random.key(seed), salt)


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    b.name: b for b in (Math500, Gsm8k, MinervaMath, MmluStem, Aime24, Amc23, Jsonl,
                        SyntheticArithmetic)}


def prepare(builder: str | type[tfds.core.GeneratorBasedBuilder], split: str | None = None, *,
            data_dir: str, manual_dir: str | None = None, config=None, urls=None,
            download: bool = True):
  """Builds the dataset once (later calls reuse it) and returns its data source(s).

  Args:
    builder: a name in `BUILDERS` (e.g. "egpo_gsm8k") or a builder class.
    split: a split name, or None for a dict of all splits.
    data_dir: where tfds keeps the built dataset (and downloads).
    manual_dir: folder holding local copies (`<folder>/<split>.jsonl`).
    config: a config name or object (`RecordConfig`, `JsonlConfig`, `SyntheticConfig`).
    urls: mirror URLs per split (benchmark builders only).
    download: False to only read an already built dataset.
  """
  cls = BUILDERS.get(builder) if isinstance(builder, str) else builder
  if cls is None:
    raise ValueError(f"unknown builder {builder!r}; use one of {sorted(BUILDERS)}")
  kwargs: dict[str, Any] = {"data_dir": data_dir, "config": config}
  if urls is not None:
    kwargs["urls"] = urls
  b = cls(**kwargs)
  if download:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b.as_data_source(split=split)
