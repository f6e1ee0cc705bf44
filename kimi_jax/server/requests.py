"""Request bodies of the OpenAI API, checked field by field into plain dataclasses.

Every refusal is a 400 naming the field (`messages[2].role`, `tool_choice`), as OpenAI answers
(its 422s included). Fields this server cannot honour (logprobs, penalties, n > 1, images) are
refused rather than silently ignored; fields that change nothing here (`user`, `metadata`,
`store`, ...) are accepted and ignored, as clients send them routinely. Whether a schema can be
enforced is decided when the request's grammar is built (service.py), also as a 400.
"""

from __future__ import annotations

import dataclasses
import math
import re

from kimi_jax.chat.grammar import ToolChoice
from kimi_jax.server.errors import bad_request

MAX_STOP_STRINGS = 4
_ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI allows [a-zA-Z0-9_-]{1,64}; dots are added because K2's tool ecosystem uses them (mcp.x.y).
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The generation fields both endpoints share. None: not given (the server's default applies)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    """What the content after the reasoning must be: a JSON schema (None: free text)."""

    schema: dict | None = None
    param: str = "response_format"  # the field the schema came from, for errors


@dataclasses.dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    response_format: ResponseFormat
    sampling: Sampling


@dataclasses.dataclass
class CompletionRequest:
    model: str | None
    prompt: str | list[int]
    echo: bool
    sampling: Sampling


# ---- field helpers -------------------------------------------------------------------------------

def _type_name(kind) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
             dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)


def _get(body: dict, name: str, kind, default=None, *, param: str | None = None):
    """body[name] checked against `kind` (None counts as absent). Booleans are not numbers here."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise bad_request(f"'{param or name}' must be {_type_name(kind)}", param or name)
    return value


def _unsupported(body: dict, name: str, allowed, why: str):
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad_request(f"'{name}' {why}", name)


def parse_sampling(body: dict, *, max_tokens_default: int | None = None) -> Sampling:
    n = _get(body, "n", int, 1)
    if n != 1:
        raise bad_request(f"'n' must be 1: this server returns one choice per request (got {n})", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, (0, 0.0), "is not supported (only 0)")
    _unsupported(body, "logprobs", (False, 0), "is not supported")
    _unsupported(body, "top_logprobs", (0,), "is not supported")
    _unsupported(body, "logit_bias", ({},), "is not supported")
    _unsupported(body, "best_of", (1,), "is not supported (only 1)")
    max_tokens = _get(body, "max_completion_tokens", int, param="max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _get(body, "max_tokens", int, max_tokens_default), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{param}' must be at least 1, got {max_tokens}", param)
    temperature = _get(body, "temperature", (int, float))
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_request(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = _get(body, "top_p", (int, float))
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"'top_p' must be greater than 0 and at most 1, got {top_p}", "top_p")
    top_k = _get(body, "top_k", int)
    if top_k is not None and top_k < 0:
        raise bad_request(f"'top_k' must be 0 (off) or more, got {top_k}", "top_k")
    seed = _get(body, "seed", int)
    stop = _get(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    if not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a string or an array of non-empty strings", "stop")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = _get(options, "include_usage", bool, False, param="stream_options.include_usage")
    return Sampling(max_tokens, temperature, top_p, top_k, seed, stop, stream, include_usage)


# ---- chat ----------------------------------------------------------------------------------------

def _text_content(content, param: str, *, required: bool) -> str | None:
    """A message's content as one string: a string, or an array of text parts. Images and audio
    are refused: the model reads text only."""
    if content is None:
        if required:
            raise bad_request(f"'{param}' is required", param)
        return None
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{param}' must be a string or an array of content parts", param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"'{where}' must be an object with a 'type'", where)
        if part["type"] != "text":
            raise bad_request(f"'{where}.type' {part['type']!r} is not supported: this model reads text only",
                              f"{where}.type")
        texts.append(_get(part, "text", str, "", param=f"{where}.text"))
    return "".join(texts)


def _tool_call(call, param: str) -> dict:
    if not isinstance(call, dict):
        raise bad_request(f"'{param}' must be an object", param)
    function = _get(call, "function", dict, param=f"{param}.function")
    if function is None:
        raise bad_request(f"'{param}.function' is required", f"{param}.function")
    name = _get(function, "name", str, param=f"{param}.function.name")
    if not name:
        raise bad_request(f"'{param}.function.name' is required", f"{param}.function.name")
    arguments = _get(function, "arguments", (str, dict), "", param=f"{param}.function.arguments")
    return {"id": _get(call, "id", str, "", param=f"{param}.id"), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _message(message, i: int) -> dict:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{param}' must be an object", param)
    role = message.get("role")
    if role not in _ROLES:
        raise bad_request(f"'{param}.role' must be one of {', '.join(_ROLES)}; got {role!r}", f"{param}.role")
    out: dict = {"role": "system" if role == "developer" else role}
    name = _get(message, "name", str, param=f"{param}.name")
    if name:
        out["name"] = name
    content = _text_content(message.get("content"), f"{param}.content", required=role != "assistant")
    if role == "assistant":
        calls = _get(message, "tool_calls", list, [], param=f"{param}.tool_calls")
        if content is None and not calls:
            raise bad_request(f"'{param}' needs 'content' or 'tool_calls'", f"{param}.content")
        # None is dropped, never passed on: a template that prints it would write "None" (docs/k2-format.md §7.4.8).
        reasoning = _get(message, "reasoning_content", str, param=f"{param}.reasoning_content")
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if calls:
            out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
    elif role == "tool":
        call_id = _get(message, "tool_call_id", str, param=f"{param}.tool_call_id")
        if not call_id:
            raise bad_request(f"'{param}.tool_call_id' is required", f"{param}.tool_call_id")
        out["tool_call_id"] = call_id
    out["content"] = content if content is not None else ""
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = _get(body, "tools", list)
    if not tools:
        return None
    seen = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
        name = tool["function"].get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise bad_request(f"'{param}.function.name' must be 1-64 letters, digits, '_', '-' or '.'; got {name!r}",
                              f"{param}.function.name")
        if name in seen:
            raise bad_request(f"'{param}.function.name': function {name!r} is declared twice", f"{param}.function.name")
        seen.add(name)
        _get(tool["function"], "description", str, param=f"{param}.function.description")
        _get(tool["function"], "parameters", dict, param=f"{param}.function.parameters")
        _get(tool["function"], "strict", bool, param=f"{param}.function.strict")
    return tools


def _tool_choice(body: dict, tools: list[dict] | None) -> ToolChoice:
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in tools or ()]
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise bad_request("'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
        return ToolChoice(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise bad_request("'tool_choice' must be 'auto', 'none', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        declared = ", ".join(names) if names else "none are declared"
        raise bad_request(f"'tool_choice' names function {name!r}, which is not in 'tools' ({declared})",
                          "tool_choice")
    return ToolChoice("function", name)


def _response_format(body: dict) -> ResponseFormat:
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON valid under the schema)."""
    value = _get(body, "response_format", dict, {})
    kind = value.get("type", "text")
    if kind == "text":
        return ResponseFormat()
    if kind == "json_object":
        return ResponseFormat({"type": "object"})
    if kind != "json_schema":
        raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema'; got {kind!r}",
                          "response_format.type")
    spec = _get(value, "json_schema", dict, param="response_format.json_schema")
    if spec is None:
        raise bad_request("'response_format.json_schema' is required for type 'json_schema'",
                          "response_format.json_schema")
    name = _get(spec, "name", str, param="response_format.json_schema.name")
    if name is None or not _SCHEMA_NAME.fullmatch(name):
        raise bad_request(f"'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'; got {name!r}",
                          "response_format.json_schema.name")
    _get(spec, "description", str, param="response_format.json_schema.description")
    _get(spec, "strict", bool, param="response_format.json_schema.strict")  # enforced either way
    schema = _get(spec, "schema", dict, {}, param="response_format.json_schema.schema")
    return ResponseFormat(schema, "response_format.json_schema.schema")


def parse_chat(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = _get(body, "messages", list)
    if not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    tools = _tools(body)
    return ChatRequest(
        model=_get(body, "model", str),
        messages=[_message(m, i) for i, m in enumerate(messages)],
        tools=tools,
        tool_choice=_tool_choice(body, tools),
        parallel_tool_calls=_get(body, "parallel_tool_calls", bool, True),
        response_format=_response_format(body),
        sampling=parse_sampling(body),
    )


# ---- completions ---------------------------------------------------------------------------------

def parse_completion(body) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise bad_request("'prompt' must be a non-empty string or array of token ids (one prompt per request)",
                          "prompt")
    _unsupported(body, "suffix", ("",), "is not supported")
    # OpenAI's default for /v1/completions is 16 tokens.
    return CompletionRequest(model=_get(body, "model", str), prompt=prompt, echo=_get(body, "echo", bool, False),
                             sampling=parse_sampling(body, max_tokens_default=16))
