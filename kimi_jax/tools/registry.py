"""The tool registry: tools the model may call, built from plain Python functions.

`ToolRegistry.register(fn)` derives the OpenAI-style JSON schema from the signature's type hints and
a Google-style docstring; `specs()` is the `tools` list the chat template declares. `call(name,
arguments)` is the one place model output meets Python: it never raises for anything the model
wrote — unknown tools, bad JSON, missing/unexpected/wrong-typed arguments, a tool that raises or
hangs all come back as a short `error: ...` result the model can read and recover from.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import threading
import types
import typing
from collections.abc import Callable
from typing import Literal

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # K2 ids are functions.NAME:IDX; '-' or '.' break parsers
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object",
               type(None): "null"}


@dataclasses.dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


class ToolError(Exception):
    """Raised by a tool for an expected failure; the model sees `error: <message>` and nothing else."""


class _ArgError(Exception):
    pass


class _TimedOut(Exception):  # not TimeoutError: a tool may raise that itself, and it means something else
    pass


# ---- schema from signature + docstring -----------------------------------------------------------

def _type_schema(hint) -> tuple[dict, bool]:
    """(JSON schema, accepts null) of a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported union {hint}: only Optional[X] is allowed")
        return _type_schema(rest[0])[0], True
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in (str, int, float, bool):
            raise TypeError(f"Literal values must share one of str/int/float/bool: {hint}")
        return {"type": _JSON_TYPES[next(iter(kinds))], "enum": list(args)}, False
    if origin is list or hint is list:
        return ({"type": "array", "items": _type_schema(args[0])[0]} if args else {"type": "array"}), False
    if origin is dict or hint is dict:
        return {"type": "object"}, False
    if hint in (str, int, float, bool):
        return {"type": _JSON_TYPES[hint]}, False
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return {}, False
    raise TypeError(f"unsupported parameter type {hint!r}")


_ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) of a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    first = []
    for line in lines:
        if not line.strip():
            if first:
                break
            continue
        if line.strip() in _ARGS_HEADERS or line.strip() == "Returns:":
            break
        first.append(line.strip())
    params: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in _ARGS_HEADERS)
    except StopIteration:
        return " ".join(first), params
    indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section ("Returns:", ...)
        if indent is None:
            indent = depth
        m = re.match(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line.strip())
        if depth == indent and m:
            current = m.group(1).lstrip("*")
            params[current] = m.group(2)
        elif current is not None:
            params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(first), params


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    schema: dict
    required: bool
    nullable: bool


@dataclasses.dataclass(frozen=True)
class _Tool:
    name: str
    fn: Callable
    description: str
    params: tuple[_Param, ...]

    def spec(self, closed: bool = False) -> dict:
        properties = {p.name: p.schema for p in self.params}
        parameters = {"type": "object", "properties": properties}
        required = [p.name for p in self.params if p.required]
        if required:
            parameters["required"] = required
        if closed:
            parameters["additionalProperties"] = False
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": parameters}}


def _describe(fn: Callable, name: str) -> _Tool:
    description, docs = _parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"tool {name!r}: parameter {p.name!r} cannot be passed by name from JSON")
        schema, nullable = _type_schema(hints.get(p.name, inspect.Parameter.empty))
        schema = dict(schema)
        if docs.get(p.name):
            schema["description"] = docs[p.name]
        params.append(_Param(p.name, schema, p.default is p.empty, nullable))
    unknown = set(docs) - {p.name for p in params}
    if unknown:
        raise TypeError(f"tool {name!r}: docstring documents unknown parameters {sorted(unknown)}")
    return _Tool(name, fn, description, tuple(params))


# ---- argument validation -------------------------------------------------------------------------

def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check(value, schema: dict, where: str):
    """`value` validated against `schema` (and normalised: ints for floats, 3.0 for an integer)."""
    if "enum" in schema:
        if value not in schema["enum"] or type(value) is not type(schema["enum"][0]):
            options = ", ".join(json.dumps(v) for v in schema["enum"])
            raise _ArgError(f"{where} must be one of {options}; got {json.dumps(value)}")
        return value
    kind = schema.get("type")
    if kind is None:
        return value
    if kind == "number" and type(value) in (int, float):
        return float(value)
    if kind == "integer" and type(value) is float and value.is_integer():
        return int(value)  # JSON Schema counts 3.0 as an integer, and models write it
    if _JSON_TYPES.get(type(value)) != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise _ArgError(f"{where} must be {article} {kind}, got {_json_type(value)}")
    if kind == "array" and "items" in schema:
        return [_check(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _bind(tool: _Tool, args: dict) -> dict:
    names = [p.name for p in tool.params]
    unexpected = [k for k in args if k not in names]
    if unexpected:
        raise _ArgError(f"unexpected parameter '{unexpected[0]}' for {tool.name}; "
                        f"parameters: {', '.join(names) or '(none)'}")
    bound = {}
    for p in tool.params:
        if p.name not in args:
            if p.required:
                raise _ArgError(f"missing required parameter '{p.name}' for {tool.name}")
            continue
        value = args[p.name]
        nulled = value is None and p.nullable
        bound[p.name] = None if nulled else _check(value, p.schema, f"parameter '{p.name}'")
    return bound


def _run_with_timeout(fn: Callable, kwargs: dict, timeout: float):
    """Run fn(**kwargs) on a daemon thread: a hung tool costs one idle thread, never the caller."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the model, not swallowed
            outcome["error"] = e

    thread = threading.Thread(target=work, daemon=True, name="kimi-tool")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _TimedOut
    error = outcome.get("error")
    if error is not None:
        if not isinstance(error, Exception):  # SystemExit from a tool must not end the caller's agent loop
            error = RuntimeError(f"the tool raised {type(error).__name__}")
        raise error
    if "value" not in outcome:
        raise RuntimeError("the tool stopped without returning")
    return outcome["value"]


def _format(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# ---- registry ------------------------------------------------------------------------------------

class ToolRegistry:
    """Named tools with schemas; `call` turns a model's tool call into a `ToolResult`."""

    def __init__(self, *, max_result_chars: int = 4000):
        self._tools: dict[str, _Tool] = {}
        self.max_result_chars = max_result_chars

    def register(self, fn: Callable | None = None, *, name: str | None = None) -> Callable:
        """Add `fn` as a tool; usable as `@registry.register` or `@registry.register(name=...)`."""
        if fn is None:
            return lambda f: self.register(f, name=name)
        name = name or fn.__name__
        if not _NAME.match(name):
            raise ValueError(f"tool name {name!r} must match {_NAME.pattern}")
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        self._tools[name] = _describe(fn, name)
        return fn

    def names(self) -> list[str]:
        """The registered tools' names, in registration order."""
        return list(self._tools)

    def __contains__(self, name) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self, names: list[str] | None = None, *, closed: bool = False) -> list[dict]:
        """The OpenAI `tools` list, of every tool or of `names` in that order. `closed`: each
        parameters object also says `"additionalProperties": false`, as `call` refuses parameters
        the function does not take (what strict decoding holds calls to; prompts declare the
        schemas as they are)."""
        for n in names or ():
            if n not in self._tools:
                raise KeyError(f"unknown tool {n!r}")
        return [self._tools[n].spec(closed) for n in (self._tools if names is None else names)]

    def call(self, name: str, arguments: str | dict, *, timeout: float = 10.0) -> ToolResult:
        """Run tool `name` with `arguments` (a JSON object string, or an already-parsed dict)."""
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self._tools) or "(none)"
            return ToolResult(f"error: unknown tool '{name}'; available: {available}", True)
        if isinstance(arguments, str):
            if not arguments.strip():
                arguments = "{}"  # a call with no arguments is often written with an empty string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return ToolResult(f"error: arguments for {name} are not valid JSON ({e.msg} at char {e.pos})",
                                  True)
        if not isinstance(arguments, dict):
            got = _json_type(arguments)
            return ToolResult(f"error: arguments for {name} must be a JSON object, got {got}", True)
        try:
            value = _run_with_timeout(tool.fn, _bind(tool, arguments), timeout)
        except _ArgError as e:
            return ToolResult(f"error: {e}", True)
        except _TimedOut:
            return ToolResult(f"error: {name} timed out after {timeout:g}s", True)
        except ToolError as e:
            return ToolResult(f"error: {e}", True)
        except Exception as e:  # noqa: BLE001 - any failure inside a tool is the model's to read
            return ToolResult(f"error: {name} failed: {type(e).__name__}: {e}", True)
        content = _format(value)
        if len(content) > self.max_result_chars:
            content = content[:self.max_result_chars] + "...[truncated]"
        return ToolResult(content, False)
