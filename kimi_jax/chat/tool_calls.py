"""Tool calls as API clients need them: ids in K2's own form, and only calls to declared functions.

K2 was trained on ids `functions.NAME:IDX` where IDX counts every tool call of the conversation from
0 (docs/k2-format.md §6.1); ids of any other form in the history make it write malformed ids of its own (spec
§7.4.3). So the history a client sends back is renumbered into that form (`normalize_history`), and
the calls of a new output are numbered on from there (`ToolCallResolver`).

A call whose id names no declared function (a bare counter `:0`, a client-style `call_59adf`, a
misspelt name) takes its name from the request's tools when exactly one of them accepts its
arguments; otherwise its text stays content, with a warning. A client never receives a call to a
function it did not declare.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from kimi_jax.chat.parser import (
    ContentDelta,
    ParseWarning,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)


def k2_call_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def normalize_history(messages: list[dict]) -> tuple[list[dict], int]:
    """(messages with every assistant tool call renumbered `functions.NAME:IDX` and the tool results
    pointing at the new ids, number of tool calls in the history). A tool result without `name` gets
    the name of the call it answers, as K2's template labels the turn with it. Input is not mutated."""
    out = copy.deepcopy(messages)
    renamed: dict[str, tuple[str, str]] = {}  # client id -> (K2 id, function name), latest call wins
    count = 0
    for message in out:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or []:
                name = call["function"]["name"]
                new_id = k2_call_id(name, count)
                renamed[call.get("id") or new_id] = (new_id, name)
                call["id"] = new_id
                count += 1
        elif message.get("role") == "tool" and message.get("tool_call_id") in renamed:
            new_id, name = renamed[message["tool_call_id"]]
            message["tool_call_id"] = new_id
            if not message.get("name"):
                message["name"] = name
    return out, count


def arguments_fit(parameters, arguments: str) -> bool:
    """Whether `arguments` (JSON text) could be a call of a function with this parameters schema:
    an object with every required key and, when the schema lists properties, no other key."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return False
    if not isinstance(args, dict):
        return False
    if not isinstance(parameters, dict):
        return True
    if any(key not in args for key in parameters.get("required") or ()):
        return False
    properties = parameters.get("properties")
    return not isinstance(properties, dict) or all(key in properties for key in args)


@dataclass
class _Pending:
    """A call whose id named no declared function: held until its arguments are complete."""

    id: str
    arguments: str = ""


class ToolCallResolver:
    """Filters StreamParser events: tool calls come out renumbered from `first_index` with K2 ids and
    declared names; the calls that cannot be resolved come out as content. Events of one output
    pass through one resolver, so a streamed response and a whole one resolve identically.

    Calls to a declared name stream at once; a call that must be resolved by its arguments is held
    until its end, which costs that (rare) call its argument streaming and nothing else."""

    def __init__(self, tools: list[dict] | None, first_index: int = 0):
        self._parameters = {t["function"]["name"]: t["function"].get("parameters") for t in tools or ()}
        self.declared = frozenset(self._parameters)
        self.first_index = first_index
        self.calls: list[str] = []  # names of the calls passed on, in order
        self._index: dict[int, int | None] = {}  # parser's call index -> ours (None: pending)
        self._pending: _Pending | None = None

    def process(self, events: list) -> list:
        out = []
        for event in events:
            if isinstance(event, ToolCallStart):
                if event.name in self._parameters:
                    self._index[event.index] = self._open(event.name, out)
                else:
                    self._index[event.index] = None
                    self._pending = _Pending(event.id)
            elif isinstance(event, ToolCallArgumentsDelta):
                ours = self._index[event.index]
                if ours is None:
                    self._pending.arguments += event.text
                else:
                    out.append(ToolCallArgumentsDelta(ours, event.text))
            elif isinstance(event, ToolCallEnd):
                ours = self._index[event.index]
                if ours is None:
                    self._resolve(out)
                else:
                    out.append(ToolCallEnd(ours))
            else:
                out.append(event)
        return out

    def _open(self, name: str, out: list) -> int:
        ours = len(self.calls)
        self.calls.append(name)
        out.append(ToolCallStart(ours, k2_call_id(name, self.first_index + ours), name))
        return ours

    def _resolve(self, out: list):
        call, self._pending = self._pending, None
        fits = [name for name, params in self._parameters.items() if arguments_fit(params, call.arguments)]
        if len(fits) == 1:
            ours = self._open(fits[0], out)
            if call.arguments:
                out.append(ToolCallArgumentsDelta(ours, call.arguments))
            out.append(ToolCallEnd(ours))
            return
        declared = "no function is declared" if not self._parameters else f"its arguments fit {len(fits)} of them"
        out.append(ParseWarning(f"tool call id {call.id!r} names no declared function and {declared}: "
                                "its text is kept as content"))
        out.append(ContentDelta(call.id + call.arguments))
