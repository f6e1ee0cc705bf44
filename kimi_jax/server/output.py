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
    """Finds the first of several stop strings in text that arrives in pieces. `feed` returns the
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
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self._held = True, ""
            return buf[:min(hits)]
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


class TextOutput:
    """Output of a raw completion: detokenized text (control tokens dropped) cut at stop strings."""

    def __init__(self, tokenizer, stops=()):
        self._decoder = tokenizer.stream_decoder(skip_special=True)
        self._stop = StopMatcher(stops)
        self.n_tokens = 0  # tokens that made up the output, up to and including a stop string's end

    @property
    def stopped(self) -> bool:
        return self._stop.matched

    def feed(self, token_ids) -> str:
        out = []
        for tok in token_ids:
            if self._stop.matched:
                break
            self.n_tokens += 1
            out.append(self._stop.feed(self._decoder.add(tok)))
        return "".join(out)

    def finish(self) -> str:
        return self._stop.feed(self._decoder.flush()) + self._stop.flush()


class ChatOutput:
    """Output of a chat completion, as parser events with tool calls resolved against the request's
    tools and numbered from `first_index`. `feed_text` adds text the server wrote into the
    assistant turn itself (a forced tool-call header), parsed as if the model had written it."""

    def __init__(self, tokenizer, *, tools=None, first_index: int = 0, stops=()):
        self._tokenizer = tokenizer
        self._decoder = tokenizer.stream_decoder()
        self._stop = StopMatcher(stops)
        self._parser = StreamParser()
        self.resolver = ToolCallResolver(tools, first_index)
        self.events: list = []  # every event so far, for the non-streamed message
        self.n_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stop.matched

    @property
    def n_calls(self) -> int:
        return len(self.resolver.calls)

    def feed(self, token_ids) -> list:
        text = []
        for tok in token_ids:
            if self._stop.matched:
                break
            self.n_tokens += 1
            text.append(self._stop.feed(self._decoder.add(tok)))
        return self._parse(self._parser.feed("".join(text)))

    def feed_text(self, text: str) -> list:
        """Server-written text: the decoder's held bytes and the stop matcher's held text go first."""
        before = self._stop.feed(self._decoder.flush()) + self._stop.flush()
        return self._parse(self._parser.feed(before + text))

    def finish(self) -> list:
        tail = self._stop.feed(self._decoder.flush()) + self._stop.flush()
        return self._parse(self._parser.feed(tail) + self._parser.finish())

    def _parse(self, events: list) -> list:
        events = self.resolver.process(events)
        self.events += events
        return events

    def message(self) -> ParsedMessage:
        return ParsedMessage.from_events(self.events)
