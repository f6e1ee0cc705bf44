"""From generated token ids to what a client sees: text, stop strings, reasoning, content, tool calls.

Streaming and non-streaming responses run the same pipeline (the non-streamed message is the
streamed events assembled), so the two cannot disagree:

    token ids -> StreamDecoder -> StopMatcher -> StreamParser -> ToolCallResolver -> events

Stop strings are matched on the decoded output text, as generated (vLLM does the same): the text
ends just before the first match, and generation ends with the token that completed it.
"""

from __future__ import annotations

from kimi_jax.chat import ParsedMessage, StreamParser
from kimi_jax.chat.tool_calls import ToolCallResolver


class StopMatcher:
    """Finds the first stop string to complete in text that arrives in pieces. `feed` returns the
    text that is safe to pass on; a tail that could still grow into a stop string is held back."""

    def __init__(self, stops=()):
        self.stops = tuple(s for s in stops if s)
        self.matched = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        # The match that completes first wins (then the longer one): that is what a stream sees
        # first, so the cut cannot depend on how the text was split.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.matched, self._held = True, ""
            return buf[:min(hits)[1]]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), max(map(len, self.stops)) - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


class _Decoded:
    """Token ids to text, cut at the first stop string; counts the tokens the text is made of."""

    def __init__(self, decoder, stops):
        self._decoder = decoder
        self._stop = StopMatcher(stops)
        self.n_tokens = 0  # tokens that made up the output, up to and including a stop string's end

    @property
    def stopped(self) -> bool:
        return self._stop.matched

    def _text(self, token_ids) -> str:
        out = []
        for tok in token_ids:
            if self._stop.matched:
                break
            self.n_tokens += 1
            out.append(self._stop.feed(self._decoder.add(tok)))
        return "".join(out)

    def _held(self) -> str:
        """Whatever the decoder and the stop matcher still hold."""
        return self._stop.feed(self._decoder.flush()) + self._stop.flush()


class TextOutput(_Decoded):
    """Output of a raw completion: detokenized text (control tokens dropped) cut at stop strings."""

    def __init__(self, tokenizer, stops=()):
        super().__init__(tokenizer.stream_decoder(skip_special=True), stops)

    def feed(self, token_ids) -> str:
        return self._text(token_ids)

    def finish(self) -> str:
        return self._held()


class ChatOutput(_Decoded):
    """Output of a chat completion, as parser events with tool calls resolved against the request's
    tools and numbered from `first_index`. `feed_text` adds text the server wrote into the
    assistant turn itself (a forced tool-call header), parsed as if the model had written it."""

    def __init__(self, tokenizer, *, tools=None, first_index: int = 0, stops=()):
        super().__init__(tokenizer.stream_decoder(), stops)
        self._parser = StreamParser()
        self.resolver = ToolCallResolver(tools, first_index)
        self.events: list = []  # every event so far, for the non-streamed message

    @property
    def n_calls(self) -> int:
        return len(self.resolver.calls)

    def feed(self, token_ids) -> list:
        return self._parse(self._parser.feed(self._text(token_ids)))

    def feed_text(self, text: str) -> list:
        """Server-written text: what the decoder and the stop matcher hold goes first."""
        return self._parse(self._parser.feed(self._held() + text))

    def finish(self) -> list:
        return self._parse(self._parser.feed(self._held()) + self._parser.finish())

    def _parse(self, events: list) -> list:
        events = self.resolver.process(events)
        self.events += events
        return events

    def message(self) -> ParsedMessage:
        return ParsedMessage.from_events(self.events)
