"""Byte-level tokenizer for tiny models: 256 bytes plus named special tokens.

Ids: 0 = <pad>, 1 = <bos>, 2 = <eos>, 3..258 = bytes 0..255, then the extra special
tokens in order. Any UTF-8 text round-trips, so a tiny model can read any benchmark's
text. It has the same interface as the Hugging Face tokenizer wrapper in
`egpo_jax.models.tokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
NUM_BYTES = 256
# The same template as ByteTokenizer.apply_chat_template, for exported tokenizer folders.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  chars = list(printable)
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(printable, chars)}


class ByteTokenizer:
  """Maps text to UTF-8 byte ids (offset by 3) and back; special tokens are atomic."""

  def __init__(self, extra_special_tokens: Sequence[str] = (), vocab_size: int | None = None):
    base = BYTE_OFFSET + NUM_BYTES
    self.special_tokens = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
    for i, tok in enumerate(extra_special_tokens):
      if tok in self.special_tokens:
        raise ValueError(f"extra_special_tokens: {tok!r} is listed twice or is reserved")
      self.special_tokens[tok] = base + i
    needed = base + len(extra_special_tokens)
    if vocab_size is None:
      vocab_size = needed
    if vocab_size < needed:
      raise ValueError(f"vocab_size={vocab_size} is smaller than the {needed} ids this "
                       "tokenizer needs; raise vocab_size or drop extra_special_tokens")
    self.vocab_size = vocab_size
    self._id_to_special = {v: k for k, v in self.special_tokens.items()}
    # Longest first, so that one special token that prefixes another never wins.
    self._specials_by_len = sorted(extra_special_tokens, key=len, reverse=True)

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (EOS_ID,)

  def token_to_id(self, token: str) -> int:
    if token in self.special_tokens:
      return self.special_tokens[token]
    data = token.encode("utf-8")
    if len(data) != 1:
      raise KeyError(f"{token!r} is neither a special token nor a single byte")
    return data[0] + BYTE_OFFSET

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [BOS_ID] if add_bos else []
    i = 0
    while i < len(text):
      for tok in self._specials_by_len:
        if text.startswith(tok, i):
          ids.append(self.special_tokens[tok])
          i += len(tok)
          break
      else:
        j = i + 1
        while j < len(text) and not any(text.startswith(t, j) for t in self._specials_by_len):
          j += 1
        ids.extend(b + BYTE_OFFSET for b in text[i:j].encode("utf-8"))
        i = j
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    out = bytearray()
    pieces: list[str] = []
    for raw in ids:
      i = int(raw)
      if BYTE_OFFSET <= i < BYTE_OFFSET + NUM_BYTES:
        out.append(i - BYTE_OFFSET)
        continue
      if out:
        pieces.append(out.decode("utf-8", errors="replace"))
        out = bytearray()
      if not skip_special_tokens and i in self._id_to_special:
        pieces.append(self._id_to_special[i])
    if out:
      pieces.append(out.decode("utf-8", errors="replace"))
    return "".join(pieces)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """A minimal role-tagged template; tiny models learn it from scratch."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")

  def save_hf(self, directory: str) -> list[str]:
    """Writes tokenizer.json + tokenizer_config.json that load as the same tokenizer.

    The files use a byte-level BPE without merges, so `HFTokenizer` and transformers'
    PreTrainedTokenizerFast produce exactly this tokenizer's ids.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {tok: i for tok, i in self.special_tokens.items()}
    vocab.update({ch: b + BYTE_OFFSET for b, ch in _bytes_to_unicode().items()})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(self.special_tokens))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]
