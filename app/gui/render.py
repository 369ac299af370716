"""Markdown to the HTML subset QTextBrowser shows, with Pygments-highlighted code blocks.

Raw HTML in a message is escaped (a model's `<b>` shows as text, never as markup). Each code
block gets a "Copy" link `copy-code:<message>:<block>`; the caller keeps the block texts.
A reply still streaming may hold an open ``` fence: it is closed for display only.
Knows nothing about conversations or the engine.
"""

from __future__ import annotations

import html
import re

import markdown
from pygments.styles import get_style_by_name

_FENCE = re.compile(r"^\s*(```|~~~)([^\n`]*)\n(.*?)(?:^\s*\1\s*$|\Z)", re.M | re.S)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a message, in order (what the Copy links copy)."""
    return [m.group(3).rstrip("\n") for m in _FENCE.finditer(_close_fence(text))]


def _close_fence(text: str) -> str:
    fences = re.findall(r"^\s*(```|~~~)", text, re.M)
    if len(fences) % 2:
        return text.rstrip("\n") + "\n" + fences[-1] + "\n"
    return text


def _style(dark: bool) -> str:
    return "monokai" if dark else "friendly"


def _md(dark: bool) -> markdown.Markdown:
    md = markdown.Markdown(
        extensions=["fenced_code", "codehilite", "tables", "sane_lists"],
        extension_configs={
            "codehilite": {
                "noclasses": True,
                "guess_lang": False,
                "pygments_style": _style(dark),
            }
        },
    )
    # no raw HTML from model output: those tags are shown escaped
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md


_CACHE: dict[tuple[str, bool, int], str] = {}


def render_markdown(text: str, dark: bool = False, msg_index: int = 0) -> str:
    """HTML for one message body; code blocks carry Copy links numbered per message."""
    key = (text, dark, msg_index)
    if key in _CACHE:
        return _CACHE[key]
    body = _md(dark).convert(_close_fence(text))
    link_color = "#8ab4f8" if dark else "#1a5fb4"
    bg = get_style_by_name(_style(dark)).background_color
    counter = iter(range(10_000))

    def wrap(match: re.Match) -> str:
        i = next(counter)
        inner = match.group(0)
        return (
            f'<table width="100%" cellpadding="8" cellspacing="0" bgcolor="{bg}" '
            f'style="margin-top:4px; margin-bottom:4px;"><tr><td>'
            f'<p align="right" style="margin:0;"><a href="copy-code:{msg_index}:{i}" '
            f'style="color:{link_color}; text-decoration:none; font-size:small;">Copy code</a></p>'
            f"{inner}</td></tr></table>"
        )

    body = re.sub(r'<div class="codehilite".*?</pre></div>', wrap, body, flags=re.S)
    body = body.replace("\n</code></pre>", "</code></pre>")  # no empty last line
    # code without a fence language may come out as a bare <pre><code>
    body = body.replace("<pre>", '<pre style="font-family: monospace;">')
    if len(_CACHE) > 2000:
        _CACHE.clear()
    _CACHE[key] = body
    return body


def escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")
