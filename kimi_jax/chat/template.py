"""Chat template rendering in the Jinja environment transformers uses (docs/k2-format.md §6).

The environment matters for byte-exact prompts: trim_blocks/lstrip_blocks, a `tojson` that keeps
non-ASCII raw and does not HTML-escape, and tools deep-sorted by key as K2's tokenizer does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_jax.errors import KimiError

TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def deep_sort(value):
    """A copy of `value` with every dict's keys in sorted order, at every depth."""
    if isinstance(value, dict):
        return {key: deep_sort(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [deep_sort(item) for item in value]
    return value


class ChatTemplate:
    """A parsed chat template; `render` turns an OpenAI-style conversation into prompt text."""

    def __init__(self, source: str, *, origin: str = "<string>"):
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as e:
            raise KimiError(f"{origin}: cannot parse chat template (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        """The checkpoint's own `chat_template.jinja`."""
        file = Path(path) / TEMPLATE_FILE
        try:
            source = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KimiError(f"{file}: chat template not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise KimiError(f"{file}: cannot read chat template ({e})") from None
        return cls(source, origin=str(file))

    @classmethod
    def default(cls) -> ChatTemplate:
        """kimi_jax's own K2 Thinking template (package data)."""
        return _default_template()

    def render(self, messages, tools=None, *, add_generation_prompt: bool = True, **kwargs) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                tools=deep_sort(list(tools)) if tools else None,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except (TemplateError, TypeError, ValueError) as e:
            # TypeError/ValueError come from tojson on values JSON cannot represent.
            raise KimiError(f"{self.origin}: cannot render the conversation: {e}") from None


@lru_cache(maxsize=1)
def _default_template() -> ChatTemplate:
    file = resources.files("kimi_jax.chat").joinpath(TEMPLATE_FILE)
    return ChatTemplate(file.read_text(encoding="utf-8"), origin=f"kimi_jax/chat/{TEMPLATE_FILE}")


def render_chat(
    messages, tools=None, add_generation_prompt: bool = True, template: ChatTemplate | None = None
) -> str:
    """Render with `template`, or with kimi_jax's default K2 Thinking template."""
    template = template or ChatTemplate.default()
    return template.render(messages, tools, add_generation_prompt=add_generation_prompt)
