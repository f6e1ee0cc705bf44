"""Ending a constrained output within its token budget.

A grammar says what may come next, not when to stop. A model that rambles inside a JSON string, or
writes digits for ever, is still inside its call when the engine cuts the output at `max_tokens`,
and a cut call is not valid JSON. So over the last quarter of an output's budget (16 to 256 tokens):

  - where the output could end as it is (the grammar accepts: an answer's text, a finished call
    section), it may go on, but not open a tool-call section it could not finish;
  - elsewhere the allowed tokens are narrowed to those that end things soonest, the first of these
    classes that has any:
      1. the end of the call or of the tool-call section
      2. inside a JSON string, a closing quote (alone or with closing brackets or a comma);
         outside one, closing brackets and braces
      3. outside a string, a separator (comma, colon, space, quote) toward the keys still required
      4. inside a string that may not close yet (a `format`, a `pattern`, `minLength`), the first
         character of a short way to a closing quote, found by a bounded depth-first search over
         single characters under the grammar (llguidance's validate_tokens)
    and with none of them, all allowed tokens stay.

This only ever narrows the grammar's mask: validity never depends on it, only whether a call or a
JSON answer ends before the engine cuts the output.
"""

from __future__ import annotations

import numpy as np

from kimi_jax.chat import bitmask
from kimi_jax.chat.grammar import CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

RESERVE_MIN, RESERVE_MAX = 16, 256
# Characters the search tries, in order: what separates the parts of the formats first (an email's
# '@', a date's '-', a time's ':' and 'T'), then filler that most patterns take.
_ALPHABET = "@.:-TZ/+_ 0123456789aAfz"
_SEARCH_DEPTH = 48
_SEARCH_NODES = 4000


class ClosingTokens:
    """The token classes of one vocabulary (`raw`: the bytes of each regular token)."""

    def __init__(self, tokenizer, raw: list[bytes], n_words: int):
        specials = tokenizer.special_tokens
        self.call_start = bitmask.of([specials[m] for m in (SECTION_BEGIN, CALL_BEGIN) if m in specials], n_words)
        self.call_end = bitmask.of([specials[m] for m in (CALL_END, SECTION_END) if m in specials], n_words)
        self.close_string = bitmask.of([i for i, b in enumerate(raw) if b[:1] == b'"' and not b[1:].strip(b",]}")],
                                       n_words)
        self.close_container = bitmask.of([i for i, b in enumerate(raw) if b and not b.strip(b"]}")], n_words)
        self.separator = bitmask.of([i for i, b in enumerate(raw) if b and not b.strip(b',: "')], n_words)
        single = {b: i for i, b in enumerate(raw) if len(b) == 1}
        self.alphabet = [single[c.encode()] for c in _ALPHABET if c.encode() in single]
        self.quote = single.get(b'"')


class Closer:
    """Counts one output's tokens against its budget and, near the end, narrows its masks."""

    def __init__(self, tokens: ClosingTokens, n_words: int, max_tokens: int):
        self._tokens = tokens
        self.left = max_tokens
        self.reserve = min(RESERVE_MAX, max(RESERVE_MIN, max_tokens // 4))
        self._no_new_call = ~bitmask.widened(tokens.call_start, n_words)
        end = bitmask.widened(tokens.call_end, n_words)
        self._classes = {True: [end, bitmask.widened(tokens.close_string, n_words)],
                         False: [end, bitmask.widened(tokens.close_container, n_words),
                                 bitmask.widened(tokens.separator, n_words)]}
        self.in_string = False  # where the JSON written under the grammar stands
        self._escaped = False
        self._path: list[int] = []  # the rest of a way out of a string that may not close yet

    @property
    def active(self) -> bool:
        return self.left <= self.reserve

    def count(self, token: int) -> None:
        """One more token of the output (reasoning included)."""
        self.left -= 1
        self._path = self._path[1:] if self._path[:1] == [token] else []

    def text(self, piece: str) -> None:
        """Text generated under the grammar (one char per byte)."""
        for ch in piece:
            if self._escaped:
                self._escaped = False
            elif ch == "\\" and self.in_string:
                self._escaped = True
            elif ch == '"':
                self.in_string = not self.in_string

    def control(self) -> None:
        """A control token: whatever JSON was open is over (or has not begun)."""
        self.in_string = self._escaped = False

    def narrow(self, out: np.ndarray, matcher) -> np.ndarray:
        if matcher.is_accepting():
            narrowed = out & self._no_new_call
            return narrowed if narrowed.any() else out
        for bits in self._classes[self.in_string]:
            narrowed = out & bits
            if narrowed.any():
                return narrowed
        if self.in_string:
            if not self._path:
                self._path = self._search(matcher) or []
            if self._path and (narrowed := out & bitmask.of(self._path[:1], len(out))).any():
                return narrowed
        return out

    def _search(self, matcher) -> list[int] | None:
        """Single-character tokens that lead to a state where a quote may close the string."""
        quote, alphabet = self._tokens.quote, self._tokens.alphabet
        if quote is None:
            return None
        nodes = 0

        def deeper(path):
            nonlocal nodes
            if matcher.validate_tokens(path + [quote]) == len(path) + 1:
                return path
            if len(path) >= _SEARCH_DEPTH:
                return None
            for t in alphabet:
                nodes += 1
                if nodes > _SEARCH_NODES:
                    return None
                if matcher.validate_tokens(path + [t]) == len(path) + 1 and (found := deeper(path + [t])):
                    return found
            return None

        return deeper([])
