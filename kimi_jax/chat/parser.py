"""Split K2 Thinking output into reasoning, content and tool calls (docs/k2-format.md §7).

Input is the generated text after the generation prompt, decoded with special tokens kept:

    <think> REASONING </think> CONTENT [<|tool_calls_section_begin|>
        (<|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> ARGS <|tool_call_end|>)+
    <|tool_calls_section_end|>] CONTENT <|im_end|>

Rules (one state machine serves `parse_output` and `StreamParser`, so both agree on any chunking):

* Leading whitespace of the output is dropped. With thinking=True, an output whose first thing is
  `<think>` starts in reasoning. An output that starts with anything else is reasoning if a
  `</think>` follows (templates that prefill `<think>`, models that skip it), and content if the
  output ends or a tool-call section begins first. Until one of those decides it, that text is held
  back: a label given early could not agree with the whole-output parse.
* Reasoning ends at `</think>`; at a tool-call section (or a bare `<|tool_call_begin|>`) met inside
  unfinished thinking, which is then parsed as tool calls (bug §7.4.4); or at the end of the output.
  Any other `<think>`/`</think>` is dropped with a warning. With thinking=False the think tags are
  ordinary content text, and there is no reasoning.
* Reasoning and content are otherwise verbatim. Text after `<|tool_calls_section_end|>` is content.
* Section markers may be plural or singular (`<|tool_call_section_begin|>`). In a section, whitespace
  between calls is ignored; arguments are stripped of surrounding whitespace and the id loses all
  whitespace (ids never contain any; models sometimes write `functions. f :0`). The id is
  `functions.NAME:IDX` or `NAME:IDX`; NAME is the id without a leading `functions.` and the trailing
  `:IDX` (dots inside NAME stay). An id with no name (`:0`) still makes a call, with name "", for the
  caller to resolve against its declared tools (kimi_jax.chat.tool_calls). Arguments end at the first `<|tool_call_end|>`, so consecutive calls
  never merge (bug §7.4.6).
* Every other special-token string of K2's vocabulary (`<|im_end|>`, `[EOS]`, `<|reserved_token_N|>`, ...)
  is removed wherever it appears.
* Malformed input never raises. A call missing its end marker is closed by the next marker (or the end
  of the output) and kept; a call without `<|tool_call_argument_begin|>` is kept with empty arguments if
  `<|tool_call_end|>` closes it, otherwise its text becomes content, as does an id over 256 chars or
  an empty one. Text in a section that belongs to no call becomes content. Each repair adds a warning.
* `ParsedMessage.reasoning_content` is None when there is no reasoning text (also for `<think></think>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS, THINK_END, THINK_START


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text exactly as the model wrote it, stripped


@dataclass
class ParsedMessage:
    reasoning_content: str | None  # None when the output has no reasoning text
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_events(cls, events) -> ParsedMessage:
        """Assemble a message from a complete StreamParser event sequence."""
        reasoning, content, warnings = [], [], []
        calls: dict[int, ToolCall] = {}
        for event in events:
            if isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, ToolCallStart):
                calls[event.index] = ToolCall(event.id, event.name, "")
            elif isinstance(event, ToolCallArgumentsDelta):
                calls[event.index].arguments += event.text
            elif isinstance(event, ParseWarning):
                warnings.append(event.message)
        return cls("".join(reasoning) or None, "".join(content), [calls[i] for i in sorted(calls)], warnings)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int  # position of the call in this output, from 0
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int


@dataclass(frozen=True)
class ParseWarning:
    message: str


# Marker kinds.
_OPEN, _CLOSE, _SECTION_BEGIN, _SECTION_END, _CALL_BEGIN, _ARGS_BEGIN, _CALL_END, _DROP = range(8)

_MARKERS = {
    THINK_START: _OPEN,
    THINK_END: _CLOSE,
    "<|tool_calls_section_begin|>": _SECTION_BEGIN,
    "<|tool_call_section_begin|>": _SECTION_BEGIN,
    "<|tool_calls_section_end|>": _SECTION_END,
    "<|tool_call_section_end|>": _SECTION_END,
    "<|tool_call_begin|>": _CALL_BEGIN,
    "<|tool_call_argument_begin|>": _ARGS_BEGIN,
    "<|tool_call_end|>": _CALL_END,
}
for _token in K2_SPECIAL_TOKENS:
    _MARKERS.setdefault(_token.name, _DROP)

# What ends reasoning: `</think>`, or a tool-call section (or a bare call) opened inside unfinished
# thinking (docs/k2-format.md §7.4.4). The grammar layer (kimi_jax.chat.constraint) ends its free
# phase at the same markers, so the two never disagree about where the reasoning stops.
_ENDS_REASONING = (_CLOSE, _SECTION_BEGIN, _CALL_BEGIN)
REASONING_END_MARKERS = tuple(m for m, kind in _MARKERS.items() if kind in _ENDS_REASONING)

_RESERVED = r"<\|reserved_token_\d{1,6}\|>"
MARKER_RE = re.compile("|".join([re.escape(m) for m in _MARKERS] + [_RESERVED]))
_RESERVED_PREFIX_RE = re.compile(r"<\|reserved_token_\d{1,6}\|?")
_PREFIXES = (*_MARKERS, "<|reserved_token_")
_MAX_MARKER = max(len("<|reserved_token_999999|>"), *map(len, _MARKERS))

# An id longer than this is not an id; holding it back would stall streaming for nothing.
_MAX_ID_CHARS = 256

# Parser states. _UNOPENED: output text seen before any <think>, not yet known to be reasoning.
_START, _UNOPENED, _REASONING, _CONTENT, _SECTION, _STRAY, _CALL_ID, _CALL_ARGS = range(8)


def marker_prefix_start(buf: str, pos: int = 0) -> int:
    """Index of the earliest suffix of buf[pos:] that may still grow into a marker, else len(buf)."""
    for i in range(max(pos, len(buf) - _MAX_MARKER + 1), len(buf)):
        if buf[i] in "<[":
            tail = buf[i:]
            if any(m.startswith(tail) for m in _PREFIXES) or _RESERVED_PREFIX_RE.fullmatch(tail):
                return i
    return len(buf)


def name_from_id(call_id: str) -> tuple[str, bool]:
    """(function name, whether the id ends in :IDX)."""
    name = call_id.removeprefix("functions.")
    head, colon, index = name.rpartition(":")
    if colon and index.isdigit():
        return head, True
    return name, False


class StreamParser:
    """Incremental parser: `feed` text deltas, then `finish` once; both return events."""

    def __init__(self, thinking: bool = True):
        self.thinking = thinking
        self._buf = ""
        self._state = _START
        self._events: list = []
        self._n_calls = 0
        self._id = ""
        self._held = ""  # text of the _UNOPENED state
        self._args_started = False
        self._args_ws = ""
        self._finished = False

    def feed(self, text: str) -> list:
        if self._finished:
            raise ValueError("StreamParser.feed after finish")
        self._buf += text
        self._scan(final=False)
        return self._take()

    def finish(self) -> list:
        if not self._finished:
            self._scan(final=True)
            self._end_of_output()
            self._finished = True
        return self._take()

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far leaves the output inside reasoning that `<think>` opened
        (a marker prefix held back at the end is not yet counted)."""
        return self._state == _REASONING

    def _take(self) -> list:
        events, self._events = self._events, []
        return events

    def _scan(self, final: bool):
        buf, pos = self._buf, 0
        for m in MARKER_RE.finditer(buf):
            self._text(buf[pos : m.start()])
            self._marker(_MARKERS.get(m.group(), _DROP), m.group())
            pos = m.end()
        keep = len(buf) if final else marker_prefix_start(buf, pos)
        self._text(buf[pos:keep])
        self._buf = buf[keep:]

    # Every handler below sees text in order and decides per character position, never per
    # chunk, which is what makes streamed and whole-text parsing agree.

    def _emit(self, event):
        last = self._events[-1] if self._events else None
        if isinstance(event, (ReasoningDelta, ContentDelta)) and type(last) is type(event):
            self._events[-1] = type(event)(last.text + event.text)
        elif isinstance(event, ToolCallArgumentsDelta) and isinstance(last, ToolCallArgumentsDelta):
            self._events[-1] = ToolCallArgumentsDelta(event.index, last.text + event.text)
        else:
            self._events.append(event)

    def _content(self, text: str):
        if text:
            self._emit(ContentDelta(text))

    def _warn(self, message: str):
        self._emit(ParseWarning(message))

    def _text(self, text: str):
        if not text:
            return
        state = self._state
        if state == _START:
            text = text.lstrip()
            if text and self.thinking:
                self._state = _UNOPENED
                self._held = text
            elif text:
                self._state = _CONTENT
                self._content(text)
        elif state == _UNOPENED:
            self._held += text
        elif state == _REASONING:
            self._emit(ReasoningDelta(text))
        elif state in (_CONTENT, _STRAY):
            self._content(text)
        elif state == _SECTION:
            text = text.lstrip()
            if text:
                # The warning must not quote the text: how much of it is known depends on chunking.
                self._warn("text outside any tool call in a tool-call section kept as content")
                self._state = _STRAY
                self._content(text)
        elif state == _CALL_ID:
            self._id += text
            if len(self._id) > _MAX_ID_CHARS:
                self._abandon_call(f"tool call id longer than {_MAX_ID_CHARS} chars", complete=False)
        else:
            self._args_text(text)

    def _args_text(self, text: str):
        # Trailing whitespace is held until more argument text shows it was not trailing.
        if not self._args_started:
            text = text.lstrip()
            if not text:
                return
            self._args_started = True
        text = self._args_ws + text
        body = text.rstrip()
        self._args_ws = text[len(body) :]
        if body:
            self._emit(ToolCallArgumentsDelta(self._n_calls - 1, body))

    def _marker(self, kind: int, marker: str):
        state = self._state
        if kind == _DROP:
            return
        if kind in (_OPEN, _CLOSE):
            if not self.thinking:
                self._text(marker)
            elif kind == _OPEN and state == _START:
                self._state = _REASONING
            elif kind == _CLOSE and state in (_START, _REASONING, _UNOPENED):
                self._settle_unopened(ReasoningDelta)
                self._state = _CONTENT
            else:
                self._warn(f"stray {marker} dropped")
            return
        if state == _UNOPENED and kind in (_SECTION_BEGIN, _CALL_BEGIN):
            self._settle_unopened(ContentDelta)
            state = self._state = _CONTENT
        if state in (_START, _UNOPENED, _REASONING, _CONTENT):
            if kind == _SECTION_BEGIN or kind == _CALL_BEGIN:
                if state == _REASONING:
                    self._warn("tool calls inside <think> without </think>: reasoning ends there")
                if kind == _CALL_BEGIN:
                    self._warn("<|tool_call_begin|> outside a tool-call section: section opened")
                self._state = _SECTION if kind == _SECTION_BEGIN else _CALL_ID
                self._id = ""
            else:
                self._warn(f"stray {marker} outside a tool-call section dropped")
        elif state in (_SECTION, _STRAY):
            if kind == _CALL_BEGIN:
                self._state, self._id = _CALL_ID, ""
            elif kind == _SECTION_END:
                self._state = _CONTENT
            elif state == _STRAY:
                # Markers of a call already given up on: its text keeps flowing to content.
                self._state = _SECTION if kind == _CALL_END else _STRAY
            else:
                self._warn(f"stray {marker} between tool calls dropped")
        elif state == _CALL_ID:
            call_id = "".join(self._id.split())
            if kind == _ARGS_BEGIN:
                self._start_call(call_id)
            elif kind == _CALL_END and name_from_id(call_id)[0]:
                self._warn("tool call without <|tool_call_argument_begin|>: empty arguments")
                self._start_call(call_id)
                self._end_call()
            else:
                self._abandon_call(f"tool call id not followed by <|tool_call_argument_begin|> but {marker}")
                self._after_call(kind)
        else:  # _CALL_ARGS
            if kind == _CALL_END:
                self._end_call()
            elif kind == _ARGS_BEGIN:
                self._warn("repeated <|tool_call_argument_begin|> dropped")
            else:
                self._warn(f"tool call closed by {marker} instead of <|tool_call_end|>")
                self._end_call()
                self._after_call(kind)

    def _settle_unopened(self, kind):
        """The held text of an output without <think> turns out to be `kind` (reasoning or content)."""
        if self._held:
            self._emit(kind(self._held))
            self._held = ""

    def _after_call(self, kind: int):
        """Apply the marker that cut a call short, now that the call is closed."""
        if kind == _CALL_BEGIN:
            self._state, self._id = _CALL_ID, ""
        elif kind == _SECTION_END:
            self._state = _CONTENT
        else:
            self._state = _SECTION

    def _start_call(self, call_id: str):
        name, indexed = name_from_id(call_id)
        if not call_id:
            self._abandon_call("tool call without an id")
            return
        if not name:
            self._warn(f"tool call id {call_id!r} names no function")
        elif not indexed:
            self._warn(f"tool call id {call_id!r} lacks the :IDX suffix")
        self._emit(ToolCallStart(self._n_calls, call_id, name))
        self._n_calls += 1
        self._state = _CALL_ARGS
        self._args_started, self._args_ws = False, ""

    def _end_call(self):
        self._emit(ToolCallEnd(self._n_calls - 1))
        self._state = _SECTION

    def _abandon_call(self, reason: str, *, complete: bool = True):
        self._warn(f"{reason}; its text is kept as content")
        # An id cut off by the length limit goes on as content, so its end is not trailing.
        self._content(self._id.strip() if complete else self._id.lstrip())
        self._id = ""
        self._state = _STRAY

    def _end_of_output(self):
        state = self._state
        if state == _UNOPENED:
            self._settle_unopened(ContentDelta)
        elif state == _REASONING:
            self._warn("output ended inside <think>: all of it is reasoning")
        elif state in (_SECTION, _STRAY):
            self._warn("output ended inside a tool-call section")
        elif state == _CALL_ID:
            self._abandon_call("output ended inside a tool call id")
        elif state == _CALL_ARGS:
            self._warn("output ended inside tool call arguments")
            self._end_call()


def parse_output(text: str, *, thinking: bool = True) -> ParsedMessage:
    """Parse a whole generated output (see the module docstring for the rules)."""
    parser = StreamParser(thinking=thinking)
    return ParsedMessage.from_events(parser.feed(text) + parser.finish())


def format_output(message: dict) -> str:
    """The text a model emits for an OpenAI-style assistant message — the inverse of
    `parse_output`, ending with `<|im_end|>`. It is the grammar of docs/k2-format.md §7.1 and equals the
    template's rendering of an assistant turn inside a running tool loop (a test holds the two
    together); training targets and tests build model outputs with it."""
    parts = [THINK_START, message.get("reasoning_content") or "", THINK_END, message.get("content") or ""]
    calls = message.get("tool_calls") or []
    if calls:
        parts.append("<|tool_calls_section_begin|>")
        for call in calls:
            args = call["function"]["arguments"]
            parts += ["<|tool_call_begin|>", call["id"], "<|tool_call_argument_begin|>",
                      args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), "<|tool_call_end|>"]
        parts.append("<|tool_calls_section_end|>")
    parts.append("<|im_end|>")
    return "".join(parts)
