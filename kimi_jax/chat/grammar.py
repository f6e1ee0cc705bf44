"""The grammar of what K2 may write after its reasoning, for constrained decoding with llguidance.

K2 Thinking writes `<think> REASONING </think> CONTENT [tool-call section] <|im_end|>`
(docs/k2-format.md §7.1). The reasoning stays free; this module builds the Lark grammar (llguidance's
dialect) of the rest, from the request:

    tools + tool_choice   the section `<|tool_calls_section_begin|>` (<|tool_call_begin|>
                          functions.NAME:IDX <|tool_call_argument_begin|> ARGS <|tool_call_end|>)+
                          `<|tool_calls_section_end|>`, NAME a declared function, IDX the
                          conversation's call counter going on from `first_index`, ARGS JSON valid
                          under that function's `parameters` (strict) or any text (not strict)
    content_schema        the content is JSON valid under this schema (response_format)

    tool_choice   auto: content, then maybe calls; or, with a content schema, the JSON or calls
                  none: content only; required: calls only (at least one); function: exactly one
                  call, of that function

Control tokens appear in the grammar by id (`<[163595]>`), so they come only as the tokenizer's
special tokens, never spelled out in text. JSON is written with `, ` / `: ` or without the space,
and no other whitespace: the model's own style, and no room for a sampler to wander in blank space.

Schemas llguidance cannot compile, and invalid ones, raise `GrammarError` naming the function (or
the response format) and llguidance's reason.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import llguidance

from kimi_jax.chat.parser import MARKER_RE
from kimi_jax.errors import KimiError

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

# Calls in one section (K2 makes a handful at most); the grammar spells out each one's IDX.
MAX_PARALLEL_CALLS = 32

_JSON_STYLE = {"item_separator": ", ?", "key_separator": ": ?", "whitespace_flexible": False}


class GrammarError(KimiError):
    """A schema that cannot constrain decoding. `param` names the request field (OpenAI style)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # 'auto' | 'none' | 'required' | 'function'
    name: str | None = None  # the function, for mode 'function'


@dataclasses.dataclass(frozen=True)
class _Function:
    name: str
    arguments: dict | None  # JSON schema of the arguments; None: any text (not strict)
    param: str  # where the schema came from, for errors


def _object_schema(parameters, name: str, param: str) -> dict:
    """`parameters` as the schema of an arguments object: a schema without a type gets
    `"type": "object"`, one of another type is refused (arguments are always an object)."""
    schema = dict(parameters) if parameters is not None else {"type": "object", "properties": {}}
    kind = schema.get("type")
    if kind is None:
        schema["type"] = "object"
    elif isinstance(kind, list) and "object" in kind:
        schema["type"] = "object"
    elif kind != "object":
        raise GrammarError(f"function {name!r}: the parameters schema has type {json.dumps(kind)}, but "
                           "tool-call arguments are a JSON object: give \"type\": \"object\"", param)
    return schema


def _literals(schema):
    """Every string a schema makes the output spell out exactly: property names, enum and const values."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("enum", "const"):
                yield from _json_strings(value)
            elif key == "properties" and isinstance(value, dict):
                yield from value
                for sub in value.values():
                    yield from _literals(sub)
            elif key == "required" and isinstance(value, list):
                yield from (name for name in value if isinstance(name, str))
            else:
                yield from _literals(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _literals(item)


def _json_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _refuse_markers(schema, what: str, param: str) -> None:
    """The output parser reads a control token's name in text as that marker, so a value the schema
    forces to contain one could never be written (kimi_jax.chat.constraint masks such spellings)."""
    for text in _literals(schema):
        if (m := MARKER_RE.search(text)):
            raise GrammarError(f"{what}: the schema requires the text {text!r}, which holds the control token "
                               f"{m.group()!r}: no output can contain it", param)


def _styled(schema: dict) -> dict:
    """The schema with our JSON layout (llguidance reads `x-guidance` at the top level)."""
    styled = copy.copy(schema)
    styled["x-guidance"] = _JSON_STYLE
    return styled


def schema_error(schema) -> str | None:
    """llguidance's reason why `schema` cannot constrain JSON, or None if it can."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_styled(schema))
    except (ValueError, TypeError) as e:
        return str(e)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if failed else None


class _Lark:
    """Accumulates rules of one grammar."""

    def __init__(self, tokenizer):
        self._tid = tokenizer.token_id
        self.lines: list[str] = []

    def token(self, name: str) -> str:
        return f"<[{self._tid(name)}]>"

    def rule(self, name: str, body: str) -> str:
        self.lines.append(f"{name}: {body}")
        return name

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _functions(tools, strict: bool) -> list[_Function]:
    out = []
    for i, tool in enumerate(tools or ()):
        function = tool["function"]
        name, param = function["name"], f"tools[{i}].function.parameters"
        strict_here = strict and function.get("strict") is not False
        arguments = _object_schema(function.get("parameters"), name, param) if strict_here else None
        if arguments is not None:
            _refuse_markers(arguments, f"function {name!r}", param)
        out.append(_Function(name, arguments, param))
    return out


def output_grammar(tokenizer, *, tools: list[dict] | None = None, tool_choice: ToolChoice = ToolChoice(),
                   first_index: int = 0, parallel: bool = True, strict: bool = True,
                   content_schema: dict | None = None, content_param: str = "response_format") -> str | None:
    """The Lark grammar of the output after the reasoning, or None when nothing constrains it (no
    content schema, and no tools or tool_choice auto with parallel calls and no strict arguments).

    `tools`: OpenAI-style declarations; a function with `"strict": false` keeps free arguments.
    `first_index`: the call counter of the first call (calls already in the conversation)."""
    functions = _functions(tools, strict) if tool_choice.mode != "none" else []
    if content_schema is None and (not tools or (
            tool_choice.mode == "auto" and parallel and all(f.arguments is None for f in functions))):
        return None  # the model's own output, as without a grammar
    g = _Lark(tokenizer)
    if content_schema is not None:
        _refuse_markers(content_schema, content_param, content_param)
        content = g.rule("content", f"%json {json.dumps(_styled(content_schema), ensure_ascii=False)}")
    else:
        g.rule("TEXT", "/(?s:.+)/")
        content = "TEXT?"
    if not functions:
        g.rule("start", content)
        return g.text()
    arguments = []
    for i, f in enumerate(functions):
        if f.arguments is None:
            arguments.append(g.rule(f"args_{i}", "ARGS_TEXT"))
        else:
            arguments.append(g.rule(f"args_{i}", f"%json {json.dumps(_styled(f.arguments), ensure_ascii=False)}"))
    if any(f.arguments is None for f in functions):
        g.rule("ARGS_TEXT", "/(?s:.*)/")

    # Parametric rules (llguidance: `rule::_` takes the call's position k in the section): one rule
    # per function, however many calls may follow each other, and IDX = first_index + k.
    n = 1 if tool_choice.mode == "function" or not parallel else MAX_PARALLEL_CALLS
    g.rule("idx::_", " | ".join(f'"{first_index + k}" %if eq(_, {k})' for k in range(n)))
    for i, f in enumerate(functions):
        g.rule(f"fn_{i}::_", f"{json.dumps(f'{f.name}:')} idx::_ {g.token(ARGS_BEGIN)} {arguments[i]}")
    if tool_choice.mode == "function":
        which = [next(i for i, f in enumerate(functions) if f.name == tool_choice.name)]
    else:
        which = range(len(functions))
    heads = " | ".join(f"fn_{i}::_" for i in which)
    g.rule("call::_", f'{g.token(CALL_BEGIN)} "functions." ({heads}) {g.token(CALL_END)}')
    g.rule("calls::_", f"call::_ | call::_ calls::incr([0:8]) %if lt(_, {n - 1})" if n > 1 else "call::_")
    calls = "calls::0"
    section = g.rule("section", f"{g.token(SECTION_BEGIN)} {calls} {g.token(SECTION_END)}")
    if tool_choice.mode in ("required", "function"):
        g.rule("start", section)
    elif content_schema is not None:
        g.rule("start", f"{content} | {section}")
    else:
        g.rule("start", f"{content} {section}?")
    return g.text()


def check_schemas(tools: list[dict] | None = None, *, strict: bool = True, content_schema: dict | None = None,
                  content_param: str = "response_format") -> None:
    """Raise GrammarError naming the first schema that cannot constrain decoding, and why."""
    for f in _functions(tools, strict):
        if f.arguments is not None and (reason := schema_error(f.arguments)):
            raise GrammarError(f"function {f.name!r}: its parameters schema cannot be enforced: {reason}", f.param)
    if content_schema is not None and (reason := schema_error(content_schema)):
        raise GrammarError(f"{content_param}: the schema cannot be enforced: {reason}", content_param)
