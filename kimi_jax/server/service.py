"""What the server does with a checked request: a prompt, engine requests, and the output events.

The HTTP layer (app.py) knows nothing of tokens; this module knows nothing of HTTP beyond raising
`APIError`s. One `ChatRun` / `TextRun` is one client request; its tokens arrive from the engine's
thread through an asyncio queue, and `cancel()` frees its engine slot (client gone, stop string).

tool_choice, on a model that cannot be constrained token by token:
  auto      tools declared; the model decides.
  none      tools still declared (the prompt, and so its cached prefix, is the one `auto` uses), but
            generation ends where a tool call would begin: the answer is the text before it.
  function  the model reasons and writes as it likes until it would end its turn or start a tool
            call; there the server writes the call header `functions.NAME:IDX` itself and the model
            continues with the arguments of exactly that one call.
  required  the model runs as with auto; if its turn ends without a call to a declared function,
            the server opens a call section and the model continues, choosing the function. If it
            still names no declared function, its text comes back as content (finish_reason stop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import AsyncIterator

from kimi_jax.chat.parser import name_from_id
from kimi_jax.chat.prompt import encode_chat
from kimi_jax.chat.tool_calls import k2_call_id, normalize_history
from kimi_jax.engine import QueueFull
from kimi_jax.errors import KimiError
from kimi_jax.sampling import SamplingParams
from kimi_jax.server.errors import APIError, bad_request
from kimi_jax.server.output import ChatOutput, TextOutput
from kimi_jax.server.requests import ChatRequest, CompletionRequest, Sampling

log = logging.getLogger("kimi_jax.serve")

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGS_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
# A function name the model picks for tool_choice 'required' ends within this many tokens, or never.
_MAX_NAME_TOKENS = 64


@dataclasses.dataclass
class Settings:
    model_name: str
    max_tokens: int  # the most tokens one request may ask for
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    defaults: dict = dataclasses.field(default_factory=dict)  # sampling defaults of the checkpoint


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One engine request of a chat completion: the tokens that end it, and what comes next."""

    stops: frozenset[int]  # besides the model's end-of-turn tokens
    header: str | None = None  # text the server writes before the next phase; None: no next phase
    only_without_calls: bool = False  # the next phase runs only if no call was made yet
    picks_name: bool = False  # generates a function name only, shown to the client only if declared
    max_new: int | None = None
    next: _Phase | None = None


class EngineCall:
    """One engine request whose token batches arrive in the event loop."""

    def __init__(self, engine, prompt_ids: list[int], sampling: SamplingParams):
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue = asyncio.Queue()

        def on_event(request, new_tokens, finished):  # the engine's thread
            loop.call_soon_threadsafe(self._inbox.put_nowait, (list(new_tokens), finished))

        try:
            self.request = engine.submit(prompt_ids, sampling, on_event)
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
        """Submit the first engine request now, so that a full queue is a 429, not a broken stream."""
        self._call = self.submit(self.prompt_ids, self._first_stops())

    def _first_stops(self) -> frozenset:
        return frozenset()

    def submit(self, prompt_ids: list[int], stops=frozenset(), max_new: int | None = None) -> EngineCall:
        sampling = dataclasses.replace(self.sampling, max_new_tokens=max_new or self.max_tokens,
                                       stop_ids=tuple(sorted(set(self.service.stop_ids) | stops)))
        self._call = EngineCall(self.service.engine, prompt_ids, sampling)
        return self._call

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
        call = self._call or self.submit(self.prompt_ids)
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
        self._phase = self._plan(choice, req.parallel_tool_calls)

    def _first_stops(self) -> frozenset:
        return self._phase.stops

    def _plan(self, choice, parallel: bool) -> _Phase:
        tid = self.service.tokenizer.token_id
        one_call = frozenset() if parallel else frozenset({tid(CALL_END)})
        call_starts = frozenset({tid(SECTION_BEGIN), tid(CALL_BEGIN)})
        if choice.mode == "none":
            return _Phase(call_starts)
        if choice.mode == "function":
            call_id = k2_call_id(choice.name, self.output.resolver.first_index)
            return _Phase(call_starts, f"{SECTION_BEGIN}{CALL_BEGIN}{call_id}{ARGS_BEGIN}",
                          next=_Phase(frozenset({tid(CALL_END)})))
        if choice.mode == "required":
            pick = _Phase(frozenset({tid(ARGS_BEGIN)}), ARGS_BEGIN, picks_name=True, max_new=_MAX_NAME_TOKENS,
                          next=_Phase(one_call))
            return _Phase(one_call, f"{SECTION_BEGIN}{CALL_BEGIN}functions.", only_without_calls=True, next=pick)
        return _Phase(one_call)

    async def events(self) -> AsyncIterator[list]:
        """Lists of parser events (kimi_jax.chat) as they come; afterwards finish_reason and usage are set."""
        tok = self.service.tokenizer
        call_end = tok.token_id(CALL_END)
        prompt, phase, unshown = self.prompt_ids, self._phase, ""
        call = self._call or self.submit(prompt, phase.stops)
        while True:
            generated, stop_token, fed_before = [], None, self.output.n_tokens
            async for tokens in call.batches():
                if prompt is self.prompt_ids:
                    self.cached_tokens = call.request.cached_tokens
                for i, t in enumerate(tokens):
                    if t in call.request.sampling.stop_ids:
                        stop_token, tokens = t, tokens[:i]
                        break
                generated += tokens
                if phase.picks_name:
                    continue
                events = self.output.feed(tokens)
                if self.output.stopped:
                    self.cancel()
                if events:
                    yield events
            reason = call.request.finish_reason
            if self.output.stopped:  # count up to the token that completed the stop string
                self.completion_tokens += self.output.n_tokens - fed_before
                reason = "stop"
            elif reason == "cancelled":
                return  # the client left
            else:
                self.completion_tokens += len(generated) + (stop_token is not None)
            ended_by_model = reason == "stop" and not self.output.stopped
            if phase.picks_name:
                name = name_from_id("functions." + "".join(tok.decode(generated).split()))[0]
                ended_by_model = stop_token == tok.token_id(ARGS_BEGIN) and name in self.output.resolver.declared
                unshown += tok.decode(generated)
                if not ended_by_model:
                    self.warnings.append("tool_choice 'required': the model named no declared function")
                    reason = "length" if self.completion_tokens >= self.max_tokens else "stop"
            elif ended_by_model and stop_token == call_end:
                # One call was asked for: close it and its section as the model would have.
                yield self.output.feed([call_end]) + self.output.feed_text(SECTION_END)
                ended_by_model = False
            if ended_by_model and self._continues(phase, prompt, generated):
                prompt = prompt + generated + tok.encode(phase.header, allow_special=True)
                unshown += phase.header
                if not phase.next.picks_name:
                    yield self.output.feed_text(unshown)
                    unshown = ""
                phase = phase.next
                call = self.submit(prompt, phase.stops, min(self.max_tokens - self.completion_tokens,
                                                             phase.max_new or self.max_tokens))
                continue
            events = self.output.finish()
            if events:
                yield events
            self.finish_reason = "tool_calls" if self.output.n_calls and reason == "stop" else reason
            self.warnings += self.output.message().warnings
            return

    def _continues(self, phase: _Phase, prompt: list[int], generated: list[int]) -> bool:
        if phase.header is None or (phase.only_without_calls and self.output.n_calls):
            return False
        header_len = len(self.service.tokenizer.encode(phase.header, allow_special=True))
        return (self.completion_tokens < self.max_tokens
                and len(prompt) + len(generated) + header_len < self.service.max_len)


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
