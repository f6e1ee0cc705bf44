"""The agent loop: think -> call tools -> read results -> continue, until an answer.

A `Conversation` holds the OpenAI-style message list. Each model step renders the whole
conversation through the chat template and submits it to the engine, whose prefix cache
(kimi_jax/pages.py) recognizes the pages it already holds — appending a tool result costs the tool
result, not the history. (When a finished turn's reasoning is dropped from history, docs/k2-format.md §6.4, the
shared prefix ends where the rendering changed and the rest is recomputed: correctness first, reuse
where it is exact.)

Tool calls run through a `ToolRegistry`; an unknown tool, bad JSON arguments, a raising or hanging
tool all come back to the model as an error result, never as an exception here. With strict tool
calls (the default) the engine holds every call to the grammar of the declared tools
(kimi_jax.chat.constraint): a registered name, the conversation's next call index, and arguments
valid under the schema the registry derived from the function's signature.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Callable

from kimi_jax.chat import StreamParser, parse_output
from kimi_jax.chat.constraint import output_constraint
from kimi_jax.chat.prompt import encode_chat
from kimi_jax.chat.tool_calls import normalize_history
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams

if TYPE_CHECKING:
    from kimi_jax.runtime import Runtime
    from kimi_jax.tools import ToolRegistry


@dataclasses.dataclass
class ToolResultEvent:
    """Emitted after a tool ran (or failed); the CLI prints it, the model reads it next step."""

    call_id: str
    name: str
    content: str
    is_error: bool


@dataclasses.dataclass
class StepStartEvent:
    step: int


@dataclasses.dataclass
class TurnResult:
    """What one `Conversation.send` produced: the final reasoning and answer, every model step with
    the tool results it caused, the generated token ids, why the turn stopped, token usage and
    seconds, and any parser warnings."""

    reasoning_content: str | None
    content: str
    tool_calls: list[dict]  # of the final assistant message (non-empty only when stopped early)
    steps: list[dict]  # every assistant message of the turn, each with the tool results it caused
    token_ids: list[int]  # every generated token of the turn
    stop_reason: str  # 'answer' | 'max_steps' | 'length' | 'context' | 'cancelled'
    usage: dict
    warnings: list[str]

    def to_json(self) -> dict:
        """The result as plain JSON-ready data (what `generate --json` prints)."""
        return dataclasses.asdict(self)


class Conversation:
    """A chat with tools: `send(text)` runs model steps and the tool calls they make until the
    model answers; `messages` holds the OpenAI-style history the next turn continues."""

    def __init__(self, runtime: Runtime, *, tools: ToolRegistry | None = None, system: str | None = None,
                 sampling: SamplingParams | None = None, max_steps: int = 300, tool_timeout: float = 10.0,
                 tool_names: list[str] | None = None, strict_tools: bool = True):
        """`strict_tools`: hold every tool call to the declared tools and their argument schemas."""
        runtime.require_chat()
        if max_steps < 1:
            raise KimiError(f"max_steps must be >= 1, got {max_steps}")
        self.rt = runtime
        self.tools = tools
        self.tool_names = tool_names  # declare only these tools to the model (default: all registered)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        base = sampling or SamplingParams()
        self.sampling = dataclasses.replace(base, stop_ids=tuple(sorted(set(base.stop_ids) | set(runtime.stop_ids()))))
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.strict_tools = strict_tools
        self._constraint()  # a tool whose schema cannot be enforced is refused now, not mid-turn

    # ---- one model step -----------------------------------------------------------------------
    def _specs(self, closed: bool = False) -> list[dict] | None:
        return self.tools.specs(self.tool_names, closed=closed) if self.tools is not None else None

    def _prompt_ids(self) -> list[int]:
        return encode_chat(self.rt.tokenizer, self.rt.template, self.messages, self._specs())

    def _constraint(self, max_tokens: int | None = None):
        """The grammar of the next assistant message, numbering calls on from those in the history;
        argument objects are closed, as the registry refuses parameters a function does not take."""
        return output_constraint(self.rt.tokenizer, vocab_size=self.rt.cfg.vocab_size, stop_ids=self.sampling.stop_ids,
                                 max_tokens=max_tokens, tools=self._specs(closed=True),
                                 first_index=normalize_history(self.messages)[1], strict=self.strict_tools)

    def _generate(self, prompt: list[int], on_event, usage, warnings):
        """Generate one assistant message; returns (text, token ids, finish reason). A prompt the
        engine refuses raises its KimiError; `send` decides whether that ends the turn instead."""
        engine = self.rt.engine
        room = max(engine.max_len - len(prompt), 1)  # no room at all is the engine's error to report
        sampling = dataclasses.replace(self.sampling, max_new_tokens=min(self.sampling.max_new_tokens, room))
        decoder = self.rt.tokenizer.stream_decoder()
        parser = StreamParser()
        pieces = []

        def on_tokens(request, new_tokens, finished):
            for token in new_tokens:
                pieces.append(decoder.add(token))
                for event in parser.feed(pieces[-1]):
                    on_event(event)

        constraint = self._constraint(sampling.max_new_tokens)
        request = engine.submit(prompt, sampling, on_tokens, constraint=constraint)
        try:
            engine.wait([request])
        except KeyboardInterrupt:
            request.cancel()
            engine.wait([request])
        if constraint is not None and constraint.failure:
            warnings.append(f"the output left its grammar: {constraint.failure}")
        pieces.append(decoder.flush())
        for event in parser.feed(pieces[-1]) + parser.finish():
            on_event(event)
        usage["prompt_tokens"] += len(prompt) - request.cached_tokens
        usage["cached_tokens"] += request.cached_tokens
        usage["completion_tokens"] += len(request.tokens)
        reason = request.finish_reason
        if reason == "length" and len(request.tokens) >= room:
            reason = "context"
        return "".join(pieces), request.tokens, reason

    # ---- a user turn --------------------------------------------------------------------------
    def send(self, user_text: str, on_event: Callable = lambda event: None) -> TurnResult:
        """Add a user message and run model steps and tool calls until an answer (or a limit).

        A prompt that does not fit the engine's context raises KimiError and leaves the history as
        it was. A turn stopped by Ctrl-C (KeyboardInterrupt) returns with stop_reason 'cancelled'
        and is dropped from the history: the model was never trained on half-written turns, and a
        cut-off one derails the answers that follow."""
        if not user_text.strip():
            raise KimiError("empty prompt")
        turn_start = len(self.messages)
        self.messages.append({"role": "user", "content": user_text})
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        steps, token_ids, warnings = [], [], []
        t0 = time.perf_counter()
        reason = "max_steps"
        try:
            for step in range(self.max_steps):
                on_event(StepStartEvent(step))
                prompt = self._prompt_ids()
                if step and len(prompt) >= self.rt.engine.max_len:
                    reason = "context"  # the tool results filled the context; what was said stays
                    break
                text, ids, finish = self._generate(prompt, on_event, usage, warnings)
                token_ids += ids
                parsed = parse_output(text)
                warnings += parsed.warnings
                message = self._assistant_message(parsed)
                self.messages.append(message)
                steps.append({"reasoning_content": parsed.reasoning_content, "content": parsed.content,
                              "tool_calls": message.get("tool_calls", []), "tool_results": []})
                if finish in ("context", "cancelled"):
                    reason = finish
                    break
                if finish == "length" and not parsed.tool_calls:
                    reason = "length"
                    break
                if not parsed.tool_calls:
                    reason = "answer"
                    break
                if self.tools is None:
                    warnings.append("the model called a tool but no tools are enabled")
                for call in parsed.tool_calls:
                    result = self._run_tool(call)
                    on_event(result)
                    steps[-1]["tool_results"].append(dataclasses.asdict(result))
                    self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                                          "content": result.content})
        except KeyboardInterrupt:  # between engine requests: in a tool, the parser or the template
            reason = "cancelled"
        except KimiError:
            del self.messages[turn_start:]
            raise
        if reason == "cancelled":
            del self.messages[turn_start:]
        usage["seconds"] = round(time.perf_counter() - t0, 3)
        final = steps[-1] if steps else {"reasoning_content": None, "content": "", "tool_calls": []}
        return TurnResult(final["reasoning_content"], final["content"],
                          final["tool_calls"] if reason != "answer" else [], steps, token_ids, reason, usage,
                          warnings)

    @staticmethod
    def _assistant_message(parsed) -> dict:
        message = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning_content:  # never pass None back: the template would print it (docs/k2-format.md §7.4.8)
            message["reasoning_content"] = parsed.reasoning_content
        if parsed.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in parsed.tool_calls]
        return message

    def _run_tool(self, call) -> ToolResultEvent:
        if self.tools is None:
            return ToolResultEvent(call.id, call.name, "error: no tools are available in this conversation", True)
        result = self.tools.call(call.name, call.arguments, timeout=self.tool_timeout)
        return ToolResultEvent(call.id, call.name, result.content, result.is_error)


def result_json(result: TurnResult) -> str:
    return json.dumps(result.to_json(), ensure_ascii=False)
