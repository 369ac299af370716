"""Chat templates render exactly as transformers' `apply_chat_template` does, and safely.

- The default GGUF's own template (inserts a default system prompt) and hand-written HF-style
  templates (Llama-2 style with `bos_token` and `raise_exception`, Zephyr style with
  `eos_token`, one with `tools`/`tojson`/`namespace`/loop controls/`{% generation %}`), with and
  without a system prompt, `add_generation_prompt` on and off: our text equals transformers'.
- Where a folder keeps its template: `chat_template.jinja`, `tokenizer_config.json` (string or a
  list of named templates, "default" picked); none at all gives the ChatML fallback, flagged.
- The sandbox: templates reaching for `__class__`, `__globals__`, `__subclasses__` (spelled out or
  built at run time) are refused with a one-line `TokenizerError`; `raise_exception` becomes one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.chat_template import CHATML_TEMPLATE, ChatTemplate
from engine.errors import TokenizerError
from engine.tokenizer import Tokenizer

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

TOOLISH = """{%- set ns = namespace(n=0, sys='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.sys = m.content -%}{%- continue -%}{%- endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if ns.n > 5 -%}{%- break -%}{%- endif -%}
  <{{ m.role }} n="{{ ns.n }}">{% generation %}{{ m.content | trim }}{% endgeneration %}</{{ m.role }}>
{% endfor -%}
{%- if ns.sys %}[system: {{ ns.sys | tojson }}]{% endif -%}
{%- if tools is not none %}[tools: {{ tools | tojson }}]{% endif -%}
{{ {"k": "<&>", "u": "é"} | tojson }}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""

CONVERSATIONS = {
    "no-system": [
        {"role": "user", "content": "Hi there! 🙂"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write 2+2 in <code>."},
    ],
    "system": [
        {"role": "system", "content": 'You are terse. Say "ok".'},
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "你好"},
    ],
}


@pytest.fixture(scope="module")
def hf_folder(default_model_path, tmp_path_factory) -> Path:
    """The default GGUF's tokenizer as transformers saves it (tokenizer.json, chat_template.jinja)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path = Path(default_model_path)
    if path.is_dir():
        path = sorted(path.glob("*.gguf"))[0]
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    ref.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(hf_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_folder))


def _reference_text(ref, template, messages, add_generation_prompt, **kwargs) -> str:
    return ref.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_template_matches_transformers(
    default_model_path, reference, conversation, add_generation_prompt
):
    ours = Tokenizer.from_path(default_model_path)
    assert not ours.chat_template_is_fallback
    messages = CONVERSATIONS[conversation]
    expected = _reference_text(reference, None, messages, add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    if conversation == "no-system":
        assert "You are a helpful AI assistant named SmolLM" in expected


@pytest.mark.slow
@pytest.mark.parametrize("template", [LLAMA2, ZEPHYR, TOOLISH], ids=["llama2", "zephyr", "tools"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_handwritten_templates_match_transformers(
    hf_folder, reference, tmp_path, template, conversation, add_generation_prompt
):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").write_text(template)
    ours = Tokenizer.from_path(folder)
    messages = CONVERSATIONS[conversation]
    expected = _reference_text(reference, template, messages, add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    if template is TOOLISH:
        tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
        expected = _reference_text(
            reference, template, messages, add_generation_prompt, tools=tools
        )
        assert ours.apply_chat_template(messages, add_generation_prompt, tools=tools) == expected


def test_template_sources_in_a_folder(hf_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    bare = Tokenizer.from_path(folder)
    assert bare.chat_template_is_fallback and bare.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert (
        bare.apply_chat_template(messages)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )

    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS{{ messages[0].content }}"},
        {"name": "default", "template": "DEFAULT{{ messages[0].content }}"},
    ]
    config_path.write_text(json.dumps(config))
    listed = Tokenizer.from_path(folder)
    assert not listed.chat_template_is_fallback
    assert listed.apply_chat_template(messages) == "DEFAULThi"

    config["chat_template"] = "CONFIG{{ messages[0].content }}"
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_path(folder).apply_chat_template(messages) == "CONFIGhi"
    (folder / "chat_template.jinja").write_text("JINJA{{ messages[0].content }}")
    assert Tokenizer.from_path(folder).apply_chat_template(messages) == "JINJAhi"


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages | attr('__class__') }}",
    "{% set name = '__cla' ~ 'ss__' %}{{ ''[name] }}",
    "{% set ns = namespace() %}{{ ns.__init__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_refuses_underscore_attributes(template):
    with pytest.raises(TokenizerError) as info:
        ChatTemplate(template, source="evil.jinja").render([{"role": "user", "content": "x"}])
    message = str(info.value)
    assert "evil.jinja" in message and "\n" not in message


def test_refused_template_fails_chat_not_loading(hf_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").write_text(ESCAPES[0])
    tok = Tokenizer.from_path(folder)  # raw completion still works
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(TokenizerError, match="sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_raise_exception_is_a_one_line_tokenizer_error():
    template = ChatTemplate(LLAMA2, source="llama2.jinja")
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(TokenizerError, match="roles must alternate"):
        template.render(bad, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def test_strftime_now_is_available():
    from datetime import datetime

    out = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert out == str(datetime.now().year)
