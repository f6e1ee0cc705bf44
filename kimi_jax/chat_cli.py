"""Chat mode of `python -m kimi_jax.generate`: one-shot or interactive, streaming thinking, tool
calls and answers as they are generated."""

from __future__ import annotations

import sys

from kimi_jax.agent import Conversation, StepStartEvent, ToolResultEvent, result_json
from kimi_jax.chat import (
    ContentDelta,
    ParseWarning,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from kimi_jax.errors import KimiError

DIM, CYAN, YELLOW, RESET = "\033[2m", "\033[36m", "\033[33m", "\033[0m"


class EventPrinter:
    """Writes a turn's events to a stream: reasoning dimmed (or hidden), tool calls and results
    marked, the answer plain."""

    def __init__(self, out=None, *, err=None, show_thinking=True, color=None, enabled=True):
        self.out = out if out is not None else sys.stdout  # looked up now: tests and pagers swap it
        self.err = err if err is not None else sys.stderr
        self.show_thinking = show_thinking
        self.color = self.out.isatty() if color is None else color
        self.enabled = enabled
        self.mode = None

    def _style(self, code):
        return code if self.color else ""

    def _switch(self, mode, header=""):
        if self.mode != mode:
            if self.mode is not None:
                self.out.write(self._style(RESET) + "\n")
            self.mode = mode
            self.out.write(header)

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if isinstance(event, ReasoningDelta):
            if self.show_thinking:
                self._switch("think", self._style(DIM) + "thinking: ")
                self.out.write(event.text)
        elif isinstance(event, ContentDelta):
            if self.mode is None and not event.text.strip():
                return
            self._switch("content")
            self.out.write(event.text)
        elif isinstance(event, ToolCallStart):
            self._switch(("call", event.index), self._style(CYAN) + f"-> {event.name}(")
        elif isinstance(event, ToolCallArgumentsDelta):
            self.out.write(event.text)
        elif isinstance(event, ToolCallEnd):
            self.out.write(")")
        elif isinstance(event, ToolResultEvent):
            self._switch(("result", event.call_id), self._style(YELLOW) + ("<- error: " if event.is_error else "<- "))
            self.out.write(event.content.removeprefix("error: ") if event.is_error else event.content)
        elif isinstance(event, ParseWarning):
            self._switch(None)  # end the streamed line first: on a terminal both streams share it
            self.out.flush()
            print(f"[parse warning: {event.message}]", file=self.err)
        elif isinstance(event, StepStartEvent):
            return
        self.out.flush()

    def end_turn(self, result) -> None:
        if not self.enabled:
            return
        self._switch(None)
        u = result.usage
        rate = u["completion_tokens"] / u["seconds"] if u["seconds"] else float("nan")
        note = "" if result.stop_reason == "answer" else f", stopped: {result.stop_reason}"
        print(f"[{len(result.steps)} step(s): {u['prompt_tokens']} tokens prefilled, {u['cached_tokens']} reused from "
              f"the cache, {u['completion_tokens']} generated; {u['seconds']:.1f}s, {rate:.1f} tok/s{note}]",
              file=self.err)


def run_chat(rt, args, sampling) -> int:
    tools = None
    if args.tools == "builtin":
        from kimi_jax.tools import builtin_tools

        tools = builtin_tools()
    conv = Conversation(rt, tools=tools, system=args.system, sampling=sampling, max_steps=args.max_steps,
                        strict_tools=not args.no_strict_tools)
    printer = EventPrinter(show_thinking=not args.hide_thinking, enabled=not args.json)
    if args.prompt is not None:
        result = conv.send(args.prompt, printer)
        if args.json:
            print(result_json(result))
        printer.end_turn(result)
        return 130 if result.stop_reason == "cancelled" else 0
    print("interactive chat: empty line or Ctrl-D to quit, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        printer.mode = None
        try:
            result = conv.send(line, printer)
        except KimiError as e:  # e.g. a message longer than the context: say so and keep chatting
            print(f"error: {e}", file=sys.stderr)
            continue
        printer.end_turn(result)
        if result.stop_reason == "cancelled":
            print("[stopped: this exchange is left out of the conversation]", file=sys.stderr)
