"""Tokenizers: the HF wrapper against transformers' PreTrainedTokenizerFast, chat templates,
the paper's prompt styles, and the byte tokenizer's HF export."""

import json

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from egpo_jax.data import templates
from egpo_jax.models import tokenizer as tok_lib
from egpo_jax.models.byte_tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers")

# A Qwen2.5-Math-style template: default system prompt, tools branch with tojson, tool
# messages grouped with loop lookbehind.
QWEN_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'Please reason step by step, and put your final answer within \\boxed{}.' }}{%- endif %}
    {{- "\n\n# Tools\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A DeepSeek-R1-Distill-style template: bos_token, namespace state, {% generation %} tags.
R1_TEMPLATE = r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(system_prompt='', is_first=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' }}{% generation %}{{ content + '<｜end▁of▁sentence｜>' }}{% endgeneration %}{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CORPUS = ["What is 2 + 2? The answer is \\boxed{4}.", "Please reason step by step, and "
          "put your final answer within \\boxed{}.", "Let x = 3; then x^2 = 9.",
          "日本語のテキスト and émojis 🙂", "You are a helpful assistant."] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Solve x^2 = 9."},
     {"role": "assistant", "content": "<think>hmm</think>x = 3 or x = -3"},
     {"role": "user", "content": "日本語 🙂?"}],
    [{"role": "user", "content": "call it"}, {"role": "tool", "content": "42"},
     {"role": "tool", "content": "43"}, {"role": "user", "content": "and?"}],
]


def _write_folder(path, template, **config):
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path / "tokenizer.json"))
  with open(path / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
               **config}, f)
  return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  qwen = _write_folder(tmp_path_factory.mktemp("qwen"), QWEN_TEMPLATE, bos_token=None,
                       eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  with open(f"{qwen}/generation_config.json", "w") as f:
    json.dump({"eos_token_id": [2, 0]}, f)
  r1 = _write_folder(tmp_path_factory.mktemp("r1"), R1_TEMPLATE,
                     bos_token={"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>",
                                  "lstrip": False, "normalized": True, "rstrip": False,
                                  "single_word": False, "special": True},
                     eos_token="<｜end▁of▁sentence｜>", pad_token=None)
  return {"qwen": qwen, "r1": r1}


@pytest.mark.parametrize("which", ["qwen", "r1"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_like_transformers(folders, which, conv, gen):
  ours = tok_lib.HFTokenizer.from_pretrained(folders[which])
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(folders[which])
  messages = CONVERSATIONS[conv]
  text = ours.apply_chat_template(messages, add_generation_prompt=gen)
  assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
  assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


def test_tools_branch_uses_transformers_tojson(folders):
  ours = tok_lib.HFTokenizer.from_pretrained(folders["qwen"])
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(folders["qwen"])
  tools = [{"name": "add", "description": "adds <a> & <b>", "parameters": {"a": "int"}}]
  messages = CONVERSATIONS[0]
  want = ref.apply_chat_template(messages, tools=tools, tokenize=False,
                                 add_generation_prompt=True)
  assert ours.apply_chat_template(messages, tools=tools) == want
  assert '"adds <a> & <b>"' in want  # not HTML-escaped


def test_special_ids_and_round_trip(folders):
  qwen = tok_lib.HFTokenizer.from_pretrained(folders["qwen"])
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(folders["qwen"])
  assert qwen.bos_id is None and qwen.eos_id == ref.eos_token_id
  assert qwen.pad_id == ref.pad_token_id
  # generation_config.json adds <|im_end|> (id 2) to the stop set, after the config's EOS.
  assert qwen.eos_ids == (0, 2) and qwen.token_to_id("<|im_end|>") == 2
  assert qwen.vocab_size == len(ref)
  text = "Let x = 3; then 日本 🙂 <|im_end|>"
  ids = qwen.encode(text)
  assert qwen.decode(ids, skip_special_tokens=False) == text
  assert qwen.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  with pytest.raises(ValueError, match="no bos_token"):
    qwen.encode("x", add_bos=True)
  r1 = tok_lib.HFTokenizer.from_pretrained(folders["r1"])
  assert r1.pad_id == r1.eos_id  # no pad token: pad with EOS
  assert r1.encode("hi", add_bos=True)[0] == r1.bos_id == SPECIALS.index(
      "<｜begin▁of▁sentence｜>")
  with pytest.raises(KeyError, match="not a token"):
    r1.token_to_id("<nope>")


def test_paper_prompts_with_real_chat_templates(folders):
  qwen = tok_lib.HFTokenizer.from_pretrained(folders["qwen"])
  r1 = tok_lib.HFTokenizer.from_pretrained(folders["r1"])
  assert templates.render("1+1?", qwen, "qwen25_math") == (
      "<|im_start|>system\nPlease reason step by step, and put your final answer within "
      "\\boxed{}.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
  # This R1 template opens the think block itself: it is not opened twice.
  assert templates.render("1+1?", r1, "r1_distill") == (
      "<｜begin▁of▁sentence｜><｜User｜>1+1?\nPlease reason step by step, and put your final "
      "answer within \\boxed{}.<｜Assistant｜><think>\n")
  # Templates without the think opener get it appended.
  byte = ByteTokenizer()
  assert templates.render("q", byte, "r1_distill").endswith("assistant: <think>\n")
  assert templates.render("q", byte, "qwen25_math", chat=False) == (
      "q\n" + templates.BOXED_INSTRUCTION + "\n")


def test_template_sandbox_blocks_python_internals():
  template = tok_lib.compile_chat_template("{{ messages.__class__.__mro__ }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    template.render(messages=[])
  with pytest.raises(jinja2.exceptions.TemplateError, match="only user"):
    tok_lib.compile_chat_template("{{ raise_exception('only user') }}").render()


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tok_lib.HFTokenizer.from_pretrained(str(tmp_path))
  assert isinstance(tok_lib.load_tokenizer("byte:512"), ByteTokenizer)
  assert tok_lib.load_tokenizer("byte:512").vocab_size == 512


def test_byte_tokenizer_exports_an_identical_hf_tokenizer(tmp_path):
  byte = ByteTokenizer(extra_special_tokens=["<think>", "</think>"], vocab_size=512)
  byte.save_hf(str(tmp_path))
  ours = tok_lib.HFTokenizer.from_pretrained(str(tmp_path))
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  for text in ["hello world", " lead", "héllo <think>x</think> 日本\x00\n  z", ""]:
    ids = byte.encode(text)
    assert ours.encode(text) == ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == byte.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == byte.decode(
        ids, skip_special_tokens=False)
  assert (ours.pad_id, ours.bos_id, ours.eos_ids) == (byte.pad_id, byte.bos_id, byte.eos_ids)
  messages = CONVERSATIONS[1]
  assert ours.apply_chat_template(messages) == byte.apply_chat_template(messages) == (
      ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
