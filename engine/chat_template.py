"""Chat templates: a model's jinja2 template rendered the way Hugging Face renders it.

The template comes from the model (`chat_template.jinja`, `tokenizer_config.json`'s
`chat_template` -- a string or a list of named templates --, or GGUF metadata); models without
one get a ChatML fallback and say so (`is_fallback`). Templates are untrusted code from the
internet, so they run in jinja2's `ImmutableSandboxedEnvironment`, and one that reaches for an
underscore attribute (`__class__`, `__globals__`, `__subclasses__`, ...) is refused outright.

Conventions (those of transformers' `apply_chat_template`): variables `messages`,
`add_generation_prompt`, `tools` (None when absent), `documents`, the special token strings
(`bos_token`, `eos_token`, ...); globals `raise_exception`, `strftime_now`, `namespace`; the `tojson`
filter without HTML escaping; `{% break %}`/`{% continue %}`; `{% generation %}` blocks pass through.
This module knows nothing of token ids: the `Tokenizer` hands it strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import TokenizerError

# ChatML, as used by SmolLM2/Qwen: the fallback for models that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as their body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises instead of rendering as undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed"
        )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & for HTML; chat templates want plain JSON
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _make_env() -> _StrictSandbox:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _unsafe_names(tree: nodes.Node) -> list[str]:
    """Underscore attribute or item names the template spells out (`x.__class__`, `x['_y']`)."""
    found = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        else:
            continue
        if name.startswith("_"):
            found.append(name)
    return found


def _plain(value: Any) -> Any:
    """Messages as plain dicts/lists/strings, so the template sees no caller objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class ChatTemplate:
    """A compiled chat template. `source` names where it came from (for error messages)."""

    def __init__(self, template: str, *, source: str = "chat template", is_fallback: bool = False):
        self.template = template
        self.source = source
        self.is_fallback = is_fallback
        env = _make_env()
        try:
            tree = env.parse(template)
        except TemplateError as e:
            raise TokenizerError(f"{source}: the chat template does not parse: {e}") from None
        unsafe = _unsafe_names(tree)
        if unsafe:
            raise TokenizerError(
                f"{source}: the chat template reaches for {unsafe[0]!r}; refused by the sandbox"
            )
        self._compiled = env.from_string(template)

    @classmethod
    def fallback(cls) -> ChatTemplate:
        return cls(CHATML_TEMPLATE, source="ChatML fallback", is_fallback=True)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str | None] | None = None,
        tools: Any = None,
        documents: Any = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (a list of {"role", "content", ...} dicts)."""
        variables: dict[str, Any] = {
            k: v for k, v in (special_tokens or {}).items() if v is not None
        }
        variables.update(_plain(kwargs))
        try:
            return self._compiled.render(
                messages=_plain(list(messages)),
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except SecurityError as e:
            raise TokenizerError(f"{self.source}: refused by the sandbox: {e}") from None
        except TemplateError as e:
            message = " ".join(str(e).split())
            raise TokenizerError(f"{self.source}: the chat template failed: {message}") from None


def pick_template(value: Any, source: str) -> str | None:
    """`tokenizer_config.json`'s `chat_template`: a string, or a list of {"name", "template"}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
        return None
    raise TokenizerError(
        f"{source}: 'chat_template' is a {type(value).__name__}, not a string or list"
    )
