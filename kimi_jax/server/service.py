"""What the server does with a checked request: a prompt, an engine request, and the output events.

The HTTP layer (app.py) knows nothing of tokens; this module knows nothing of HTTP beyond raising
`APIError`s. One `ChatRun` / `TextRun` is one client request; its tokens arrive from the engine's
thread through an asyncio queue, and `cancel()` frees its engine slot (client gone, stop string).

tools, tool_choice and response_format become the grammar of what the model writes after its
reasoning (kimi_jax.chat.grammar), which the engine enforces token by token through an
`OutputConstraint`: every call names a declared function and, unless strict tool calls are off
(`Settings.strict_tools`, or `"strict": false` on a function), its arguments fit the function's
`parameters`. auto: the model decides whether to call; none: it cannot; required: it calls at
least once; a named function: it calls exactly that one, once. The reasoning itself stays free.
A schema that cannot be enforced is a 400 naming the function and the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import AsyncIterator

from kimi_jax.chat.constraint import output_constraint, vocabulary
from kimi_jax.chat.grammar import GrammarError
from kimi_jax.chat.prompt import encode_chat
from kimi_jax.chat.tool_calls import normalize_history
from kimi_jax.engine import QueueFull
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams
from kimi_jax.server.errors import APIError, bad_request
from kimi_jax.server.output import ChatOutput, TextOutput
from kimi_jax.server.requests import ChatRequest, CompletionRequest, Sampling

log = logging.getLogger("kimi_jax.serve")


@dataclasses.dataclass
class Settings:
    model_name: str
    max_tokens: int  # the most tokens one request may ask for
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    defaults: dict = dataclasses.field(default_factory=dict)  # sampling defaults of the checkpoint
    strict_tools: bool = True  # tool-call arguments must fit their schemas (the grammar enforces it)


class EngineCall:
    """One engine request whose token batches arrive in the event loop."""

    def __init__(self, engine, prompt_ids: list[int], sampling: SamplingParams, constraint=None):
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue = asyncio.Queue()

        def on_event(request, new_tokens, finished):  # the engine's thread
            loop.call_soon_threadsafe(self._inbox.put_nowait, (list(new_tokens), finished))

        try:
            self.request = engine.submit(prompt_ids, sampling, on_event, constraint=constraint)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="rate_limit_exceeded") from None
        except KimiError as e:
            raise bad_request(str(e)) from None

    async def batches(self) -> AsyncIterator[list[int]]:
        while True:
            tokens, finished = await self._inbox.get()
            if tokens:
                yield tokens
            if finished:
                return


class _Run:
    """Common to chat and text runs: sampling, the engine call in flight, usage."""

    def __init__(self, service: "Service", prompt_ids: list[int], sampling: Sampling):
        self.service = service
        self.prompt_ids = prompt_ids
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.constraint = None  # what the engine must hold the output to (kimi_jax.chat.constraint)
        self._call: EngineCall | None = None
        room = service.max_len - len(prompt_ids)
        if room < 1:
            raise bad_request(f"this model's context holds {service.max_len} tokens (prompt and completion), "
                              f"but the prompt alone takes {len(prompt_ids)}", code="context_length_exceeded")
        cap = service.settings.max_tokens
        if sampling.max_tokens is not None and sampling.max_tokens > cap:
            raise bad_request(f"max_tokens is {sampling.max_tokens}, more than this server allows ({cap})",
                              "max_tokens")
        self.max_tokens = min(sampling.max_tokens or cap, room)  # a larger ask ends as 'length'
        defaults = service.settings.defaults
        pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
        self.sampling = SamplingParams(
            temperature=float(pick(sampling.temperature, "temperature", 0.0)),
            top_p=float(pick(sampling.top_p, "top_p", 1.0)),
            top_k=int(pick(sampling.top_k, "top_k", 0)),
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(31),
            max_new_tokens=self.max_tokens,
            stop_ids=service.stop_ids,
        )

    def start(self) -> None:
        """Submit the engine request now, so that a full queue is a 429, not a broken stream."""
        self._call = EngineCall(self.service.engine, self.prompt_ids, self.sampling, self.constraint)

    def cancel(self) -> None:
        """Free the engine slot; a finished run ignores it. Safe to call more than once."""
        if self._call is not None and self._call.request.finish_reason is None:
            self._call.request.cancel()

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class TextRun(_Run):
    """A raw completion: the prompt continued as text."""

    def __init__(self, service: "Service", req: CompletionRequest):
        tok = service.tokenizer
        if isinstance(req.prompt, str):
            # The caller owns the whole prompt here (no template to protect), so control tokens
            # written as text are control tokens, as in vLLM.
            ids = tok.encode(req.prompt, allow_special=True)
        else:
            bad = next((t for t in req.prompt if not 0 <= t < service.vocab_size), None)
            if bad is not None:
                raise bad_request(f"'prompt' token id {bad} is outside the vocabulary (0..{service.vocab_size - 1})",
                                  "prompt")
            ids = list(req.prompt)
        super().__init__(service, ids, req.sampling)
        self.output = TextOutput(tok, req.sampling.stop)
        self.echo = tok.decode(ids) if req.echo else ""

    async def texts(self) -> AsyncIterator[str]:
        """Pieces of the completion text; afterwards finish_reason and usage are set."""
        if self._call is None:
            self.start()
        call = self._call
        yield self.echo
        async for tokens in call.batches():
            self.cached_tokens = call.request.cached_tokens
            text = self.output.feed(tokens)
            if self.output.stopped:
                self.cancel()
            yield text
        yield self.output.finish()
        self.completion_tokens = self.output.n_tokens
        reason = call.request.finish_reason
        self.finish_reason = "stop" if self.output.stopped else reason if reason != "cancelled" else None


class ChatRun(_Run):
    """A chat completion: the conversation rendered by the template, the output parsed."""

    def __init__(self, service: "Service", req: ChatRequest):
        messages, n_history_calls = normalize_history(req.messages)
        tok, choice = service.tokenizer, req.tool_choice
        try:
            ids = encode_chat(tok, service.template, messages, req.tools)
        except KimiError as e:
            raise bad_request(str(e), "messages") from None
        super().__init__(service, ids, req.sampling)
        self.output = ChatOutput(tok, tools=None if choice.mode == "none" else req.tools,
                                 first_index=n_history_calls, stops=req.sampling.stop)
        self.warnings: list[str] = []
        try:  # built now: a schema that cannot be enforced is a 400 before anything runs
            self.constraint = output_constraint(
                tok, vocab_size=service.vocab_size, stop_ids=service.stop_ids, max_tokens=self.max_tokens,
                tools=req.tools, tool_choice=choice,
                first_index=n_history_calls, parallel=req.parallel_tool_calls, strict=service.settings.strict_tools,
                content_schema=req.response_format.schema, content_param=req.response_format.param)
        except GrammarError as e:
            raise bad_request(str(e), e.param, code="invalid_schema") from None

    async def events(self) -> AsyncIterator[list]:
        """Lists of parser events (kimi_jax.chat) as they come; afterwards finish_reason and usage are set."""
        if self._call is None:
            self.start()
        call, stopped_by_token = self._call, False
        async for tokens in call.batches():
            self.cached_tokens = call.request.cached_tokens
            stop = next((i for i, t in enumerate(tokens) if t in self.sampling.stop_ids), None)
            if stop is not None:
                tokens, stopped_by_token = tokens[:stop], True
            events = self.output.feed(tokens)
            if self.output.stopped:
                self.cancel()
            if events:
                yield events
        reason = call.request.finish_reason
        if reason == "cancelled" and not self.output.stopped:
            return  # the client left
        events = self.output.finish()
        if events:
            yield events
        # The stop token is generated too; a stop string counts up to the token that completed it.
        self.completion_tokens = self.output.n_tokens + (stopped_by_token and not self.output.stopped)
        reason = "stop" if self.output.stopped else reason
        self.finish_reason = "tool_calls" if self.output.n_calls and reason == "stop" else reason
        self.warnings += self.output.message().warnings
        if self.constraint is not None and self.constraint.failure:
            self.warnings.append(f"the output left its grammar: {self.constraint.failure}")


class Service:
    """The loaded model and engine behind the HTTP routes."""

    def __init__(self, runtime, engine, settings: Settings):
        runtime.require_chat()
        self.runtime = runtime
        self.engine = engine
        self.settings = settings
        self.tokenizer = runtime.tokenizer
        self.template = runtime.template
        self.stop_ids = tuple(runtime.stop_ids())
        self.max_len = engine.max_len
        self.vocab_size = runtime.cfg.vocab_size
        vocabulary(self.tokenizer)  # llguidance's view of it, built now rather than on the first request

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           param="model", code="model_not_found")

    def chat(self, req: ChatRequest) -> ChatRun:
        self.check_model(req.model)
        return ChatRun(self, req)

    def completion(self, req: CompletionRequest) -> TextRun:
        self.check_model(req.model)
        return TextRun(self, req)
