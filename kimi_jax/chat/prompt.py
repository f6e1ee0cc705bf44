"""Prompt token ids for a conversation, with message text unable to smuggle in control tokens.

The chat template needs special tokens (`<|im_user|>`, `<|tool_call_begin|>`…) to become control
tokens, but the same strings typed by a user, returned by a tool or written into arguments must stay
plain text. We render the template with every free-text field replaced by a placeholder, then encode
the template's own text with special tokens allowed and each field's text with them disallowed.
"""

from __future__ import annotations

import copy
import re

from kimi_jax.chat.template import ChatTemplate
from kimi_jax.chat.tokenizer import Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use code points: never produced by the template itself
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_STRUCTURAL_KEYS = {"role", "type"}  # values the template compares against, never free text


def _hide_text(value, texts: list[str]):
    """Copy of `value` with every string (outside structural keys) replaced by a placeholder."""
    if isinstance(value, str):
        texts.append(value)
        return f"{_OPEN}{len(texts) - 1}{_CLOSE}"
    if isinstance(value, dict):
        return {k: (v if k in _STRUCTURAL_KEYS else _hide_text(v, texts)) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide_text(v, texts) for v in value]
    return value


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, messages, tools=None, *,
                add_generation_prompt: bool = True) -> list[int]:
    texts: list[str] = []
    hidden = _hide_text(copy.deepcopy(list(messages)), texts)
    hidden_tools = _hide_text(copy.deepcopy(list(tools)), texts) if tools else None
    rendered = template.render(hidden, hidden_tools, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(rendered):
        ids += tokenizer.encode(rendered[pos:m.start()], allow_special=True)
        ids += tokenizer.encode(texts[int(m.group(1))])
        pos = m.end()
    ids += tokenizer.encode(rendered[pos:], allow_special=True)
    return ids
