"""The workload every system runs, and the worker protocol. Standard library only: the
peer runners import it from their own virtualenvs, where egpo_jax is not installed.

Worker protocol (stdin/stdout, one JSON object per line). A worker is started as
`PYTHON -m benchmarks.peers.<runner> --model NAME --scenario NAME --model-dir DIR`
from the repository root; it loads the model, compiles and warms up, then prints
`{"ready": true, "info": {...}}`. Each line "run" on stdin makes it time one repeat and
print `{"seconds": s, "phases": {"generation": s, ...}}`; "quit" ends it. Anything else
it prints goes to stderr, so stdout stays parseable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys

# The models of the issue: tiny is overhead-bound, small compute-bound on a CPU.
MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=1408),
}
VOCAB_SIZE = 512
SCENARIOS = ("rollout", "iteration")
SYSTEMS = ("ours", "trl", "tunix")


def worker_parser(description: str | None) -> argparse.ArgumentParser:
  """The command line every runner takes (--model, --scenario, --quick); add your own."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--model", choices=sorted(MODELS), required=True)
  parser.add_argument("--scenario", choices=SCENARIOS, required=True)
  parser.add_argument("--quick", action="store_true")
  return parser


@dataclasses.dataclass(frozen=True)
class Workload:
  """B prompts x G samples, P-token prompts, exactly T new tokens (EOS never sampled).

  The reward is 1 if the completion contains `target_id`, else 0: cheap and identical in
  every system (about 12% of 64 uniform tokens out of 512 contain it, so most groups
  are mixed). The loss: token-mean clipped surrogate, clip 0.2, no KL (beta 0), one
  AdamW step per rollout batch.
  """
  num_prompts: int = 8
  group_size: int = 8
  prompt_len: int = 16
  new_tokens: int = 64
  target_id: int = 7
  eos_id: int = 2
  pad_id: int = 0
  first_word_id: int = 3
  clip_eps: float = 0.2
  learning_rate: float = 1e-6
  temperature: float = 1.0
  seed: int = 0

  @property
  def num_responses(self) -> int:
    return self.num_prompts * self.group_size

  def prompt_ids(self) -> list[list[int]]:
    """B fixed prompts of word tokens (never pad, EOS or the target)."""
    rng = random.Random(self.seed)
    words = [i for i in range(self.first_word_id, VOCAB_SIZE) if i != self.target_id]
    return [[rng.choice(words) for _ in range(self.prompt_len)]
            for _ in range(self.num_prompts)]


def workload(quick: bool = False) -> Workload:
  return Workload(num_prompts=4, group_size=4, new_tokens=16) if quick else Workload()


def token_text(i: int) -> str:
  """The word of token i in the benchmark tokenizer (a whitespace word-level vocab)."""
  return f"w{i}"


def prompt_text(ids: list[int]) -> str:
  return " ".join(token_text(i) for i in ids)


def cache_dir() -> str:
  """Where venvs, model files and results live: outside git (override: EGPO_PEERS_HOME)."""
  default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "egpo_jax", "peers")
  return os.environ.get("EGPO_PEERS_HOME", default)


def model_dir(name: str) -> str:
  return os.path.join(cache_dir(), "models", name)


def emit(obj: dict) -> None:
  """One protocol line on the real stdout."""
  sys.__stdout__.write(json.dumps(obj) + "\n")
  sys.__stdout__.flush()


def serve(setup, run_once, info: dict) -> None:
  """The worker loop: `setup()` compiles and warms up; each "run" times `run_once()`,
  which returns (seconds, phases dict)."""
  # Libraries print to stdout (progress bars, banners): keep protocol lines apart.
  sys.stdout = sys.stderr
  setup()
  emit({"ready": True, "info": info})
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
      break
    if cmd == "run":
      seconds, phases = run_once()
      emit({"seconds": seconds, "phases": phases})
    elif cmd:
      emit({"error": f"unknown command {cmd!r}; use 'run' or 'quit'"})
