"""The domain of every config field and CLI flag: one table, read by the validator and
rendered as docs/CONFIG.md (`python -m egpo_jax.training.config_domains > docs/CONFIG.md`;
a test keeps the two in sync).

Adding a field is one line in `FIELDS`:

    Field("ppo.pass_micro_batch", ints(lo=0), 0, "use >= 0 (0 = the whole micro-batch)"),

with its domain (`ints`, `floats`, `choice`, `boolean`, `text`, `path`, `strings`, ...),
its default (the value experiments/configs/default.py sets; a config that lacks an
`optional=True` field gets this value) and the fix the error message suggests. Lists of
choices are callables reading their single source (a registry, a module's constant), so
registering a new estimator or loss needs no edit here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from egpo_jax.core import advantages, entropy, losses, registry
from egpo_jax.data import synthetic, templates
from egpo_jax.evaluation import benchmarks
from egpo_jax.models import config as model_config_lib
from egpo_jax import rewards  # registers the reward functions  # noqa: F401
from egpo_jax.training import distributed, iteration, optimizer

# Choice lists, each read from its single source.
TASKS = ("synthetic", "jsonl")
BAD_RECORD_POLICIES = ("skip", "raise")
HF_PRESET = "hf"


def model_presets() -> tuple[str, ...]:
  return tuple(sorted(model_config_lib.NAMED_CONFIGS)) + (HF_PRESET,)


def model_names() -> tuple[str, ...]:
  return tuple(sorted(model_config_lib.NAMED_CONFIGS))


def dtypes() -> tuple[str, ...]:
  return tuple(sorted(model_config_lib._DTYPES))  # pylint: disable=protected-access


def variants() -> tuple[str, ...]:
  return tuple(advantages.EGPO_VARIANT_NAMES)


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a field accepts: `ok(value)` decides, `text` says it in the docs and in
  errors (a callable: choices are read from their registry when shown), and `bad` is one
  value outside it (the domain test uses it)."""
  describe: Callable[[], str]
  ok: Callable[[Any], bool]
  bad: Any
  input_kind: str | None = None   # "file" / "dir": an input path, which must exist to train

  @property
  def text(self) -> str:
    return self.describe()


def _domain(text: str, ok: Callable[[Any], bool], bad: Any) -> Domain:
  return Domain(lambda: text, ok, bad)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _bounds(lo, hi, lo_open, hi_open) -> str:
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo}")
  if hi is not None:
    parts.append(f"{'<' if hi_open else '<='} {hi}")
  return " and ".join(parts)


def _in(v, lo, hi, lo_open, hi_open) -> bool:
  return ((lo is None or (v > lo if lo_open else v >= lo))
          and (hi is None or (v < hi if hi_open else v <= hi)))


def ints(lo: int | None = None, hi: int | None = None, *, also: tuple[int, ...] = ()
         ) -> Domain:
  """An integer in [lo, hi], or one of `also` (e.g. -1 = "from the environment")."""
  text = " ".join(filter(None, ("int", _bounds(lo, hi, False, False))))
  if also:
    text += f", or {' or '.join(map(str, also))}"
  bad = lo - 1 if lo is not None else hi + 1
  while bad in also:
    bad -= 1
  return _domain(text, lambda v: _is_int(v) and (v in also or _in(v, lo, hi, False, False)),
                bad)


def floats(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, also: tuple[float, ...] = ()) -> Domain:
  """A finite number in the interval, or one of `also` (e.g. 0 = off)."""
  text = " ".join(filter(None, ("float", _bounds(lo, hi, lo_open, hi_open))))
  if also:
    text += f", or {' or '.join(map(str, also))}"
  if lo is not None:
    bad = lo if lo_open and lo not in also else lo - 1
  else:
    bad = hi if hi_open else hi + 1
  return _domain(text, lambda v: _is_real(v) and (
      v in also or _in(v, lo, hi, lo_open, hi_open)), bad)


def choice(source: Callable[[], Sequence[str]] | Sequence[str], *,
           case_insensitive: bool = False) -> Domain:
  """One of the names `source` gives (a callable is read when checked: registries)."""
  names = source if callable(source) else (lambda: tuple(source))

  def ok(v):
    known = [n.lower() for n in names()] if case_insensitive else list(names())
    return isinstance(v, str) and (v.lower() if case_insensitive else v) in known

  return Domain(lambda: "one of " + ", ".join(repr(n) for n in names()), ok, "no-such-choice")


def int_choice(source: Callable[[], Sequence[int]]) -> Domain:
  """One of the integers `source` gives (e.g. the synthetic task's levels)."""
  return Domain(lambda: "int, one of " + ", ".join(map(str, source())),
                lambda v: _is_int(v) and v in source(), 0)


def boolean() -> Domain:
  return _domain("bool", lambda v: isinstance(v, bool), "yes")


def text(*, allow_empty: bool = True) -> Domain:
  return _domain("str" if allow_empty else "non-empty str",
                lambda v: isinstance(v, str) and (allow_empty or bool(v)), 3 if allow_empty else "")


def path(kind: str) -> Domain:
  """'' or an existing file / folder (checked at start-up, before a run writes anything)."""
  exists = os.path.isfile if kind == "file" else os.path.isdir
  return Domain(lambda: f"'' or an existing {kind}",
                lambda v: isinstance(v, str) and (v == "" or exists(v)),
                "/nonexistent/egpo_jax_input", input_kind=kind)


def held_out_set() -> Domain:
  """'' (none), a benchmark name, or an existing .jsonl file (checked at start-up)."""
  return Domain(lambda: f"'', one of {', '.join(benchmarks.BENCHMARKS)}, or an existing "
                ".jsonl file",
                lambda v: isinstance(v, str) and (v in ("",) + benchmarks.BENCHMARKS or (
                    v.endswith(".jsonl") and os.path.isfile(v))),
                "/nonexistent/held_out.jsonl", input_kind="file")


def strings() -> Domain:
  """A tuple (or list) of non-empty strings; () = none."""
  return _domain("tuple of non-empty str",
                lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str) and s
                                                               for s in v), ("",))


def int_tuple(lo: int = 0) -> Domain:
  """A tuple (or list) of ints >= lo; () = none."""
  return _domain(f"tuple of int >= {lo}",
                 lambda v: isinstance(v, (tuple, list)) and all(_is_int(i) and i >= lo
                                                                for i in v), [-1])


def clamp_pair() -> Domain:
  """(low, high) with 0 < low <= 1 <= high, or () = no clamp."""
  return _domain("() or (low, high) with 0 < low <= 1 <= high",
                lambda v: isinstance(v, (tuple, list)) and (
                    len(v) == 0 or (len(v) == 2 and all(_is_real(x) for x in v)
                                    and 0 < v[0] <= 1 <= v[1])), (2.0, 0.5))


def host_port() -> Domain:
  """'' (read $EGPO_COORDINATOR_ADDRESS) or host:port."""
  def ok(v):
    host, sep, port = v.rpartition(":") if isinstance(v, str) else ("", "", "")
    return isinstance(v, str) and (v == "" or (bool(sep and host) and port.isdigit()))
  return _domain("'' or host:port", ok, "no-port")


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted name, domain, default, and the fix an error suggests.
  `optional` fields may be absent from a config (older configs, config.json of older
  runs); they then take `default`."""
  name: str
  domain: Domain
  default: Any
  fix: str
  optional: bool = False


# Every field the trainer reads, in the order of experiments/configs/default.py.
FIELDS: tuple[Field, ...] = (
    Field("seed", ints(lo=0), 0, "use a non-negative integer"),
    # model
    Field("model.preset", choice(model_presets), "tiny",
          "a named config of egpo_jax/models/config.py, or 'hf' with model.path"),
    Field("model.name", choice(lambda: ("",) + model_names(), case_insensitive=True), "",
          "'' or the backbone's named config (a preset of egpo_jax/models/config.py); with "
          "preset 'hf' the checkpoint's config.json must have its shapes"),
    Field("model.path", path("dir"), "",
          "the Hugging Face checkpoint folder (config.json + safetensors); needed for 'hf'"),
    Field("model.dtype", choice(dtypes), "float32", "the compute dtype (params stay float32)"),
    Field("model.remat", boolean(), False,
          "deprecated (model.remat_policy): True = 'full', recompute each layer's activations"),
    Field("model.remat_policy", choice(("",) + model_config_lib.REMAT_POLICIES), "",
          "each layer's rematerialisation policy (egpo_jax/models/config.py REMAT_POLICIES); "
          "'' follows model.remat", optional=True),
    Field("model.attention", choice(model_config_lib.ATTENTION_IMPLEMENTATIONS), "blockwise",
          "the attention implementation (egpo_jax/models/attention.py): 'cudnn' needs a GPU "
          "and bfloat16, 'splash' a TPU", optional=True),
    # task
    Field("task.name", choice(TASKS), "synthetic",
          "'synthetic' (jnp task, jitted loop) or 'jsonl' (host-verified math problems)"),
    Field("task.difficulty", int_choice(lambda: sorted(synthetic.LEVELS)), 2,
          "a level of egpo_jax/data/synthetic.py (LEVELS)"),
    Field("task.train_file", path("file"), "",
          "the training JSONL (one problem per line); needed for task.name='jsonl'"),
    Field("task.problem_field", text(allow_empty=False), "problem",
          "the JSONL key holding the problem text"),
    Field("task.answer_field", text(allow_empty=False), "answer",
          "the JSONL key holding the reference answer"),
    Field("task.max_prompt_len", ints(lo=1), 16, "use >= 1 (tokens; longer prompts are skipped)"),
    Field("task.reward", choice(registry.reward_functions.names), "synthetic",
          "a reward function of egpo_jax.core.registry.reward_functions"),
    Field("task.template", choice(lambda: tuple(sorted(templates.TEMPLATES))), "plain",
          "a prompt template of egpo_jax/data/templates.py"),
    Field("task.on_bad_record", choice(BAD_RECORD_POLICIES), "skip",
          "'skip' drops a bad JSONL record with a warning, 'raise' stops at the first",
          optional=True),
    Field("task.max_new_tokens_field", text(), "",
          "the JSONL key holding a record's response token cap (an int in "
          "[1, rollout.max_new_tokens], else a bad record; needs rollout.slots > 0); "
          "'' = every response gets rollout.max_new_tokens", optional=True),
    # rollout
    Field("rollout.prompts_per_batch", ints(lo=1), 64, "use >= 1"),
    Field("rollout.group_size", ints(lo=2), 8,
          "group statistics need at least 2 responses per prompt"),
    Field("rollout.max_new_tokens", ints(lo=1), 24, "use >= 1"),
    Field("rollout.temperature", floats(lo=0, lo_open=True), 1.0,
          "use > 0: at 0 (greedy) every response of a group is the same and nothing is "
          "learned"),
    Field("rollout.top_p", floats(lo=0, hi=1, lo_open=True), 1.0, "use a value in (0, 1]"),
    Field("rollout.top_k", ints(lo=0), 0, "use >= 0 (0 = off)"),
    Field("rollout.cache_phases", ints(lo=1), 4,
          "use >= 1 (1 = one decode loop on the whole cache)"),
    Field("rollout.shared_prompt_min_len", ints(lo=0), 64,
          "use >= 0 (0 = always share the prompt's cache slots)"),
    Field("rollout.stop_strings", strings(), (),
          "a tuple of non-empty strings; host mode cuts a response after the first one",
          optional=True),
    Field("rollout.stop_token_ids", int_tuple(), (),
          "token ids that end a response besides the tokenizer's EOS ids (e.g. "
          "<|im_end|>'s); the sampler keeps the token and stops", optional=True),
    Field("rollout.slots", ints(lo=0), 0,
          "use >= 0; > 0 runs host mode's rollout on that many continuous-batching decode "
          "slots, 0 the static sampler", optional=True),
    Field("rollout.chunk_steps", ints(lo=1), 32,
          "use >= 1: with rollout.slots, decode steps between hand-offs of finished "
          "responses to the verifier", optional=True),
    Field("rollout.tensor", ints(lo=0), 0,
          "use >= 0 dividing the devices and the model's query and KV heads: host mode "
          "decodes on its own mesh over the same devices, tensor groups of this size as "
          "data-parallel replicas (params cast and resharded once per iteration); 0 = on "
          "the training mesh",
          optional=True),
    Field("rollout.decode_attention", choice(("full", "bounded", "pallas")), "bounded",
          "'bounded' (with rollout.slots, attention reads only each slot's used cache "
          "blocks), 'pallas' (the same blocks in a Pallas kernel: GPU/TPU; interpreted, "
          "slow, on CPU) or 'full' (every slot's whole cache)", optional=True),
    Field("rollout.read_block", ints(lo=1), 64,
          "use >= 1: own cache slots per block read by decode_attention 'bounded'/'pallas' "
          "('pallas': a power of two >= 16 on GPU, a multiple of 128 on TPU)", optional=True),
    Field("rollout.table_entries", ints(lo=0), 0,
          "use >= 0: with rollout.slots, prompt-table entries, refilled inside the decode "
          "loop as prompts finish (0 = all the batch's prompts)", optional=True),
    # algo
    Field("algo.advantage", choice(registry.advantage_estimators.names), "egpo",
          "a name in egpo_jax.core.registry.advantage_estimators"),
    Field("algo.variant", choice(variants, case_insensitive=True), "egpo",
          "an EGPO variant of egpo_jax/core/advantages.py (Table 2)"),
    Field("algo.lam_min", floats(lo=0, hi=1, lo_open=True), 0.8,
          "EGPO needs 0 < lam_min <= 1 (Eq. 8)"),
    Field("algo.lam_max", floats(lo=1), 2.0, "EGPO needs lam_max >= 1 (Eq. 8)"),
    Field("algo.eps_h", floats(lo=0, lo_open=True), 1e-5,
          "use a small positive number (Eq. 7 divides by entropy + eps_h)"),
    Field("algo.nsr_advantage", floats(hi=0, hi_open=True), -1.0,
          "use < 0 (the advantage of an all-wrong group's responses)"),
    Field("algo.ddof", ints(lo=0, hi=1), 1, "use 0 (population std) or 1 (sample std)"),
    Field("algo.std_eps", floats(lo=0, lo_open=True), 1e-6, "use a small positive number"),
    Field("algo.entropy_segment", choice(entropy.SEGMENTS), "joint",
          "the response segment whose entropy calibrates (docs/METHOD.md)"),
    Field("algo.segment_delimiter", text(allow_empty=False), "</think>",
          "the text that ends the thinking segment"),
    Field("algo.edge_clamp", clamp_pair(), (0.5, 2.0),
          "EDGE-GRPO's weight clamp: () or (low, high) with 0 < low <= 1 <= high"),
    # loss
    Field("loss.name", choice(registry.policy_losses.names), "ppo_clip",
          "a name in egpo_jax.core.registry.policy_losses"),
    Field("loss.eps_low", floats(lo=0), 0.2, "clip ranges must be >= 0"),
    Field("loss.eps_high", floats(lo=0), 0.2, "clip ranges must be >= 0"),
    Field("loss.dual_clip", floats(lo=1, lo_open=True, also=(0,)), 0.0,
          "use 0 (off) or a value > 1 (the dual-clip bound on negative advantages)"),
    Field("loss.aggregation", choice(losses.AGG_MODES), "token-mean",
          "a loss aggregation of egpo_jax/core/losses.py"),
    Field("loss.kl_coef", floats(lo=0), 0.0, "use >= 0 (0 = no KL term)"),
    Field("loss.kl_estimator", choice(losses.KL_ESTIMATORS), "k3", "Schulman's KL estimator"),
    Field("loss.old_logps", choice(iteration.OLD_LOGPS), "sampler",
          "'sampler' (the sampler's log-probs) or 'recompute' (the trainer's forward)"),
    Field("loss.tis_cap", floats(lo=0), 0.0, "use >= 0 (0 = off)"),
    Field("loss.overlong_buffer", ints(lo=0), 0, "use >= 0 tokens (0 = off)"),
    Field("loss.mask_truncated", boolean(), False, "True drops truncated responses' tokens"),
    Field("loss.logprob_chunk", ints(lo=1), 1024, "use >= 1 (vocabulary chunk of the log-probs)"),
    # dynamic sampling
    Field("dynamic_sampling.enabled", boolean(), False, "True resamples all-same groups"),
    Field("dynamic_sampling.oversample", ints(lo=1), 2, "use >= 1"),
    Field("dynamic_sampling.max_tries", ints(lo=1), 4, "use >= 1"),
    # optim
    Field("optim.lr", floats(lo=0, lo_open=True), 1e-4, "use a positive learning rate"),
    Field("optim.schedule", choice(optimizer.SCHEDULES), "constant",
          "a learning-rate schedule of egpo_jax/training/optimizer.py"),
    Field("optim.warmup_steps", ints(lo=0), 10, "use >= 0 (0 = no learning-rate warm-up)"),
    Field("optim.weight_decay", floats(lo=0), 0.0, "use >= 0"),
    Field("optim.b1", floats(lo=0, hi=1, hi_open=True), 0.9, "use a value in [0, 1)"),
    Field("optim.b2", floats(lo=0, hi=1, hi_open=True), 0.99, "use a value in [0, 1)"),
    Field("optim.grad_clip", floats(lo=0, lo_open=True), 1.0, "use a positive global norm"),
    Field("optim.moment_dtype", choice(optimizer.MOMENT_DTYPES), "float32",
          "AdamW's moments' storage; bfloat16 halves it (params stay float32)", optional=True),
    # ppo
    Field("ppo.epochs", ints(lo=1), 1, "use >= 1"),
    Field("ppo.minibatches", ints(lo=1), 1,
          "use >= 1 dividing prompts_per_batch x group_size"),
    Field("ppo.micro_batches", ints(lo=1), 1,
          "use >= 1 dividing prompts_per_batch x group_size / minibatches"),
    Field("ppo.share_prompts", boolean(), True,
          "True runs a prompt's forward once for its group"),
    Field("ppo.length_buckets", ints(lo=0), 0,
          "use >= 0; > 0 trims host mode's update micro-batches to this many response-"
          "length buckets (update.bucketed_update), 0 pads every row to max_new_tokens",
          optional=True),
    # warm-up
    Field("warmup.steps", ints(lo=0), 500, "use >= 0 (0 = no SFT warm-up before RL)"),
    Field("warmup.batch_size", ints(lo=1), 64, "use >= 1"),
    Field("warmup.lr", floats(lo=0, lo_open=True), 3e-3, "use a positive learning rate"),
    # train
    Field("train.iterations", ints(lo=0), 100, "use >= 0"),
    Field("train.iterations_per_call", ints(lo=1), 10, "use >= 1"),
    Field("train.checkpoint_every", ints(lo=1), 10, "use >= 1"),
    Field("train.keep_checkpoints", ints(lo=1), 3,
          "use >= 1: 0 would delete every checkpoint, the trained model included"),
    Field("train.max_consecutive_nonfinite", ints(lo=1), 5, "use >= 1"),
    Field("train.eval_prompts", ints(lo=1), 256, "use >= 1"),
    Field("train.eval_every", ints(lo=0), 20, "use >= 0 (0 = validate only at the end)"),
    Field("train.eval_set", held_out_set(), "",
          "the held-out set of a host-verified task (task.name='jsonl'): a benchmark name "
          "or a JSONL like task.train_file; its first train.eval_prompts problems that fit "
          "are evaluated before RL, every train.eval_every iterations and after; '' = none",
          optional=True),
    Field("train.tensorboard", boolean(), True, "True also writes TensorBoard scalars"),
    # mesh
    Field("mesh.data", ints(lo=1, also=(-1,)), 1, "use >= 1, or -1 (= the remaining devices)",
          optional=True),
    Field("mesh.fsdp", ints(lo=1, also=(-1,)), -1, "use >= 1, or -1 (= the remaining devices)",
          optional=True),
    Field("mesh.tensor", ints(lo=1, also=(-1,)), 1,
          "use >= 1, or -1 (= the remaining devices)", optional=True),
    # distributed
    Field("distributed.mode", choice(distributed.MODES), "auto",
          "'auto' (join when num_processes > 1), 'on' or 'off'", optional=True),
    Field("distributed.coordinator_address", host_port(), "",
          "host:port of process 0, or '' to read $EGPO_COORDINATOR_ADDRESS", optional=True),
    Field("distributed.num_processes", ints(lo=0), 0,
          "use >= 1, or 0 to read $EGPO_NUM_PROCESSES", optional=True),
    Field("distributed.process_id", ints(lo=0, also=(-1,)), -1,
          "use an id in [0, num_processes), or -1 to read $EGPO_PROCESS_ID", optional=True),
    Field("distributed.timeout_s", ints(lo=1), 300, "use a positive timeout in seconds",
          optional=True),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


@dataclasses.dataclass(frozen=True)
class Flag:
  """A command-line flag of experiments.main."""
  name: str
  domain: str
  default: str
  fix: str


FLAGS: tuple[Flag, ...] = (
    Flag("--config", "a config file (path[:argument])", "experiments/configs/default.py",
         "a Python file with get_config(), e.g. experiments/configs/paper.py:egpo,"
         "qwen2.5-math-7b"),
    Flag("--config.<field>", "the field's domain (table below)", "the config's value",
         "one field of the table below, e.g. --config.train.iterations=40"),
    Flag("--workdir", "a writable folder", "workdir/default",
         "where checkpoints, metrics and plots go; the same workdir resumes"),
    Flag("--verbosity", "int (absl)", "0",
         "1 shows the traceback of a start-up error and info logs"),
    Flag("--dry_run", "bool", "false",
         "compile one iteration's phases from abstract shapes, print per-device memory and "
         "collectives, train nothing (no weights, data or tokenizer needed)"),
    Flag("--dry_run_devices", "int >= 0", "0",
         "with --dry_run: this many fake CPU devices stand in for the target; must be a "
         "multiple of the mesh (0 = the real devices)"),
    Flag("--dry_run_json", "a writable file path", "''",
         "with --dry_run: also write the report as JSON here"),
    Flag("--device_memory_gb", "float >= 0", "0",
         "with --dry_run: exit 1 naming the phase when one needs more per device (0 = no "
         "check)"),
)


def _render_default(v: Any) -> str:
  return repr(tuple(v)) if isinstance(v, list) else repr(v)


def markdown() -> str:
  """docs/CONFIG.md: the flags and fields tables, generated from this module."""
  lines = [
      "# Configuration reference",
      "",
      "Generated from `egpo_jax/training/config_domains.py` (the validator's own table) by",
      "`python -m egpo_jax.training.config_domains > docs/CONFIG.md`; a test fails when the",
      "two differ. `experiments.main` checks every field at start-up, before it writes",
      "anything, and exits 2 with one line naming the field, the value and the fix",
      "(`--verbosity=1` adds the traceback). Fields marked optional may be missing from a",
      "config (then they take the default).",
      "",
      "## Command-line flags of `experiments.main`",
      "",
      "| flag | domain | default | notes |",
      "|---|---|---|---|",
  ]
  lines += [f"| `{f.name}` | {f.domain} | `{f.default}` | {f.fix} |" for f in FLAGS]
  lines += ["", "## Config fields", "",
            "| field | domain | default | required | fix hint |", "|---|---|---|---|---|"]
  for f in FIELDS:
    dom = f.domain.text.replace("|", "\\|")
    lines.append(f"| `{f.name}` | {dom} | `{_render_default(f.default)}` | "
                 f"{'optional' if f.optional else 'yes'} | {f.fix} |")
  lines += ["", "Checks across fields: " + "; ".join(CROSS_CHECKS) + ".", ""]
  lines += ["## What the user sees", "",
            "Bad input tried, or a signal sent, the line `python -m experiments.main` prints",
            "on stderr, and its exit code. Nothing is written to the workdir on exit 2.", "",
            "| input | exit | message |", "|---|---|---|"]
  lines += [f"| `{cmd}` | {code} | `{msg}` |" for cmd, code, msg in WHAT_THE_USER_SEES]
  return "\n".join(lines) + "\n"


# The rules that tie fields together (config.validate checks them after the table).
CROSS_CHECKS = (
    "`model.preset='hf'` needs `model.path`, or `model.name` alone for that backbone's "
    "shapes with random weights and the byte tokenizer (a dry run, with a warning)",
    "`model.name`, when set with `model.preset='hf'`, must match the shapes of the "
    "checkpoint's config.json; with a named preset it must equal the preset",
    "`task.train_file` is required when `task.name='jsonl'`",
    "`warmup.steps` must be 0 unless `task.name='synthetic'`",
    "for the synthetic task, `task.max_prompt_len` must hold its longest prompt (and, with "
    "a warm-up, `rollout.max_new_tokens` its longest worked solution)",
    "`rollout.prompts_per_batch x rollout.group_size` must divide into `ppo.minibatches x "
    "ppo.micro_batches`",
    "`train.eval_every` need not be a multiple of `train.iterations_per_call`: chunks also "
    "end at multiples of `train.eval_every`, so validations run on exactly those iterations",
    "`rollout.slots` and `ppo.length_buckets` act in host mode only (`task.name='jsonl'`)",
    "`task.max_new_tokens_field` (per-record response caps) needs `rollout.slots > 0`",
    "unknown fields are refused (with the nearest known name), except a field of `algo`, "
    "`loss` or `task` that the chosen registered estimator, loss or reward function "
    "declares as a parameter: it is that function's own hyperparameter, passed by name",
)

# Bad inputs to `python -m experiments.main` and the exact line it prints, with its exit
# code. tests/training/test_config_domains.py runs every row that starts with "--".
WHAT_THE_USER_SEES: tuple[tuple[str, int, str], ...] = (
    ("--config.train.keep_checkpoints=0", 2,
     "error: config.train.keep_checkpoints=0: use >= 1: 0 would delete every checkpoint, "
     "the trained model included (domain: int >= 1)"),
    ("--config.rollout.temperature=0", 2,
     "error: config.rollout.temperature=0.0: use > 0: at 0 (greedy) every response of a "
     "group is the same and nothing is learned (domain: float > 0)"),
    ("--config.loss.dual_clip=0.5", 2,
     "error: config.loss.dual_clip=0.5: use 0 (off) or a value > 1 (the dual-clip bound on "
     "negative advantages) (domain: float > 1, or 0)"),
    ("--config.optim.schedule=linear", 2,
     "error: config.optim.schedule='linear': a learning-rate schedule of "
     "egpo_jax/training/optimizer.py (domain: one of 'constant', 'cosine')"),
    ("--config.model.dtype=float64", 2,
     "error: config.model.dtype='float64': the compute dtype (params stay float32) (domain: "
     "one of 'bfloat16', 'float16', 'float32')"),
    ("--config.model.preset=hf", 2,
     "error: config.model.path='': model.preset='hf' needs the Hugging Face checkpoint "
     "folder (or model.name for its shapes with random weights)"),
    ("--config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b", 2,
     "error: config.task.train_file='': task.name='jsonl' needs the training JSONL, e.g. "
     "--config.task.train_file=/data/train.jsonl"),
    ("--config.train.keep_checkpoint=3", 2,
     "error: config.train.keep_checkpoint: there is no such field; did you mean "
     "train.keep_checkpoints? docs/CONFIG.md lists every field"),
    ("--config.train.iterations=ten", 2,
     "error: flag --config.train.iterations=ten: invalid literal for int() with base 10: "
     "'ten'"),
    ("--config=nofile.py", 2,
     "error: Configuration is not available because of an earlier failure to load: Failed "
     "loading config file config_config: OSError: [Errno 2] No such file or directory: "
     "'nofile.py'"),
    ("Ctrl-C while training", 130,
     "interrupted (Ctrl-C): stopped after iteration N and saved WORKDIR/checkpoints/N; run "
     "the same command again to resume"),
    ("a second Ctrl-C", 130,
     "second Ctrl-C: aborted; the next run resumes from the newest complete checkpoint"),
    ("SIGTERM while training", 75,
     "preempted: stopped after iteration N and saved WORKDIR/checkpoints/N; run the same "
     "command again to resume"),
    ("SIGTERM during the supervised warm-up (Ctrl-C: the same, 130)", 75,
     "preempted: stopped during the supervised warm-up after step S of W; nothing was saved, "
     "and running the same command again restarts the warm-up from step 0 (it is "
     "deterministic)"),
    ("the same command again, after a stop", 0,
     "resumed at iteration N of T from WORKDIR/checkpoints/N"),
)


if __name__ == "__main__":
  print(markdown(), end="")
