"""Hugging Face tokenizers from a checkpoint folder, with their chat templates.

`HFTokenizer` wraps the `tokenizers` library (tokenizer.json) with the special tokens and
the chat template of tokenizer_config.json, rendered with jinja2 in a sandbox exactly as
transformers renders it (a chat template is untrusted code from the Hub). It has the
same interface as `egpo_jax.models.byte_tokenizer.ByteTokenizer`, so trainer, sampler
and evaluation code take either.

The paper's prompts (problem -> messages -> text) live in `egpo_jax.data.templates`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from egpo_jax.models.byte_tokenizer import ByteTokenizer



def _token_content(value: Any) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    return value.get("content")
  return str(value)


class _Namespace(jinja2.utils.Namespace):
  """jinja2's namespace without underscore attributes (no route to CPython internals)."""

  def __init__(*args, **kwargs):  # noqa: N805  (jinja2's own signature trick)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot set underscore attributes on a namespace ({name!r})")


class _TemplateDict:
  """`dict(...)` for templates without exposing the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' override: jinja's own tojson escapes HTML characters.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' {% generation %} blocks (assistant masks) and renders the body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def compile_chat_template(template: str) -> jinja2.Template:
  """Compiles a chat template in the sandboxed environment transformers uses."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.globals["namespace"] = _Namespace
  env.globals["dict"] = _TemplateDict()
  return env.from_string(template)


class HFTokenizer:
  """A checkpoint's tokenizer.json + tokenizer_config.json (+ generation_config.json)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, tokenizer_config: Mapping[str, Any],
               generation_config: Mapping[str, Any] | None = None,
               extra_eos_tokens: Sequence[str] = ()):
    self._tok = tokenizer
    self.config = dict(tokenizer_config)
    self.special_tokens_map = {
        k: _token_content(self.config.get(k))
        for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    self._bos = self._optional_id("bos_token")
    self._eos = self._optional_id("eos_token")
    if self._eos is None:
      raise ValueError("tokenizer_config.json: eos_token is missing or not in the vocabulary; "
                       "generation needs an end-of-sequence token")
    pad = self._optional_id("pad_token")
    self._pad = self._eos if pad is None else pad
    eos = [self._eos]
    gen_eos = (generation_config or {}).get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
      eos.append(int(i))
    eos += [self.token_to_id(t) for t in extra_eos_tokens]
    self._eos_ids = tuple(dict.fromkeys(eos))
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
      template = {t["name"]: t["template"] for t in template}.get("default")
    self.chat_template = template
    self._compiled = compile_chat_template(template) if template else None

  @classmethod
  def from_pretrained(cls, path: str, extra_eos_tokens: Sequence[str] = ()) -> HFTokenizer:
    """Loads tokenizer.json, tokenizer_config.json and (if present) generation_config.json.

    A chat template in a separate chat_template.jinja file (newer checkpoints) is used
    when tokenizer_config.json has none.
    """
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
      raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is needed; "
                              "convert slow tokenizers with transformers first)")
    tokenizer = tokenizers.Tokenizer.from_file(tok_file)
    config = _read_json(os.path.join(path, "tokenizer_config.json"), required=True)
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
    for k, v in special_map.items():
      config.setdefault(k, v)
    jinja_file = os.path.join(path, "chat_template.jinja")
    if not config.get("chat_template") and os.path.exists(jinja_file):
      with open(jinja_file) as f:
        config["chat_template"] = f.read()
    generation = _read_json(os.path.join(path, "generation_config.json"))
    return cls(tokenizer, config, generation, extra_eos_tokens)

  def _optional_id(self, key: str) -> int | None:
    token = self.special_tokens_map.get(key)
    return None if token is None else self._tok.token_to_id(token)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos_ids

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{token!r} is not a token of this vocabulary")
    return i

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in the text map to their ids.

    The tokenizer's own post-processor is not applied (BOS is explicit), so a rendered
    chat template that already holds BOS is not given a second one.
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self._bos is None:
        raise ValueError("encode(add_bos=True): this tokenizer has no bos_token")
      ids = [self._bos] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, *,
                          tools: Sequence[Mapping[str, Any]] | None = None, **kwargs) -> str:
    """Renders messages with the checkpoint's template, as transformers does (tokenize=False).

    `tools` are JSON schemas; further keyword arguments reach the template as variables.
    """
    if self._compiled is None:
      raise ValueError("this tokenizer has no chat_template; render the prompt without one "
                       "(egpo_jax.data.templates.render(..., chat=False))")
    context = {k: v for k, v in self.special_tokens_map.items() if v is not None}
    context.update(kwargs)
    return self._compiled.render(
        messages=[dict(m) for m in messages], tools=None if tools is None else list(tools),
        documents=None, add_generation_prompt=add_generation_prompt, **context)


def _read_json(file: str, required: bool = False) -> dict:
  if not os.path.exists(file):
    if required:
      raise FileNotFoundError(f"{file} is missing; a tokenizer folder needs it")
    return {}
  with open(file) as f:
    return json.load(f)


def load_tokenizer(spec: str, **kwargs) -> HFTokenizer | ByteTokenizer:
  """'byte' (or 'byte:<vocab_size>') -> ByteTokenizer; a folder path -> HFTokenizer."""
  if spec == "byte" or spec.startswith("byte:"):
    size = int(spec.split(":", 1)[1]) if ":" in spec else None
    return ByteTokenizer(vocab_size=size, **kwargs)
  return HFTokenizer.from_pretrained(spec, **kwargs)
