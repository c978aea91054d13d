"""Prompt templates per model family: a problem -> chat messages or a raw prompt string.

The instruction is the one the paper's evaluation uses (Qwen2.5-Math's chain-of-thought
prompt): "Please reason step by step, and put your final answer within \\boxed{}."
Qwen2.5-Math puts it in the system message; DeepSeek-R1-Distill takes no system prompt,
so it follows the problem in the user turn, and the response opens with "<think>\\n"
(DeepSeek's usage notes). Rendering the messages with a tokenizer's chat template is the
tokenizer's job (`tokenizer.apply_chat_template`); `render` glues the two together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of your final answer "
                      "(A, B, C or D) within \\boxed{}.")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """system: the system message (None: none); user: a format string with {problem} and
  {instruction}; response_prefix: text the response starts with (appended to the prompt);
  raw: the prompt for base models used without a chat template."""
  name: str
  system: str | None
  user: str
  response_prefix: str = ""
  raw: str = "{problem}\n{instruction}\n"


TEMPLATES: dict[str, PromptTemplate] = {
    "qwen25_math": PromptTemplate("qwen25_math", system="{instruction}", user="{problem}"),
    "r1_distill": PromptTemplate("r1_distill", system=None, user="{problem}\n{instruction}",
                                 response_prefix="<think>\n"),
    # The synthetic task: the problem text is the whole prompt.
    "plain": PromptTemplate("plain", system=None, user="{problem}", raw="{problem}"),
}


def get(name: str) -> PromptTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown prompt template {name!r}; use one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def instruction_for(verifier: str) -> str:
  """The answer-format instruction for a record's verifier kind."""
  return CHOICE_INSTRUCTION if verifier == "multiple_choice" else BOXED_INSTRUCTION


def messages(problem: str, template: str = "qwen25_math", *, verifier: str = "math"
             ) -> list[dict[str, str]]:
  """[{"role": "system", ...}, {"role": "user", ...}] for a chat template."""
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f"problem must be a non-empty string, got {problem!r}")
  t = get(template)
  fields = {"problem": problem, "instruction": instruction_for(verifier)}
  out = []
  if t.system is not None:
    out.append({"role": "system", "content": t.system.format(**fields)})
  out.append({"role": "user", "content": t.user.format(**fields)})
  return out


def raw_prompt(problem: str, template: str = "qwen25_math", *, verifier: str = "math") -> str:
  """The prompt without a chat template (base models, the byte tokenizer)."""
  t = get(template)
  return t.raw.format(problem=problem, instruction=instruction_for(verifier)) + t.response_prefix


class ChatTokenizer(Protocol):
  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                          ) -> str: ...

  def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


def render(problem: str, tokenizer: ChatTokenizer, template: str = "qwen25_math", *,
           verifier: str = "math", chat: bool = True) -> str:
  """The full prompt text: the chat template's rendering plus the response prefix."""
  if not chat:
    return raw_prompt(problem, template, verifier=verifier)
  text = tokenizer.apply_chat_template(messages(problem, template, verifier=verifier),
                                       add_generation_prompt=True)
  prefix = get(template).response_prefix
  # Newer R1-Distill chat templates already open the think block themselves.
  return text if prefix and text.endswith(prefix) else text + prefix


def encoder(tokenizer: ChatTokenizer, template: str = "qwen25_math", *, chat: bool = True,
            add_bos: bool = False) -> Callable[[dict[str, Any]], list[int]]:
  """record -> prompt token ids, for `loader.PromptIterator`."""
  get(template)

  def encode(record: dict[str, Any]) -> list[int]:
    text = render(record["problem"], tokenizer, template,
                  verifier=record.get("verifier", "math"), chat=chat)
    return list(tokenizer.encode(text, add_bos=add_bos))

  return encode
