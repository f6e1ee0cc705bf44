"""Constrained decoding of one output: the token mask an engine applies before it samples.

An `OutputConstraint` follows one generated output token by token. The engine sees it through three
members (the engine imports nothing from here; any object with them will do):

    breaks    token ids after which the engine must ask `mask()` again before the next token,
              even while the output is free (the control tokens that end the reasoning)
    mask()    None while the next token is free (inside the reasoning); otherwise int32
              [ceil(vocab_size / 32)], bit i % 32 of word i // 32 set = token i allowed
    accept(t) every generated token, in order, before the next `mask()`

Phases of an output (docs/k2-format.md §7.1):

    start    the first token: `<think>` (reasoning follows) or the grammar's first token
    free     the reasoning, unconstrained; `kimi_jax.chat.parser` decides where it ends (at
             `</think>`, or at a tool-call section opened inside it), fed the same text
    grammar  the rest, held to the grammar of kimi_jax.chat.grammar by llguidance
    done     a stop token was accepted
    failed   the output cannot go on under the grammar (a section opened inside the reasoning when
             no call is allowed, a token the mask did not allow): only stop tokens are allowed, so
             the output ends at once; `failure` says why

The output parser reads decoded text, so a control token's name written out in plain text
(`<|tool_call_end|>` as five ordinary tokens) acts as that marker. While the grammar runs, tokens
that would complete such a spelling are masked out. In the reasoning nothing is masked: if the
model ends it with a spelled-out `</think>`, the grammar takes over from that point (accept() sees
every token), and the next token of `breaks` it writes (every call opens with one) brings the mask
back; what it wrote in between must fit the grammar, or the output fails.

Stop tokens (`stop_ids`) are allowed exactly where the grammar may end. Ids the model has beyond the
tokenizer's vocabulary are never allowed. Given the output's token budget (`max_tokens`), the end
of it narrows the mask to what ends the output soonest (kimi_jax.chat.closing), so a model looping
inside a string still closes its call before the engine cuts the output.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import numpy as np

from kimi_jax.chat import bitmask
from kimi_jax.chat.closing import Closer, ClosingTokens
from kimi_jax.chat.grammar import (
    CALL_BEGIN,
    SECTION_BEGIN,
    GrammarError,
    ToolChoice,
    check_schemas,
    output_grammar,
)
from kimi_jax.chat.parser import MARKER_RE, REASONING_END_MARKERS, StreamParser, marker_prefix_start
from kimi_jax.chat.tokenizer import PAT_STR, THINK_END
from kimi_jax.errors import KimiError

_START, _FREE, _GRAMMAR, _DONE, _FAILED = "start", "free", "grammar", "done", "failed"
_WINDOW = 96  # chars of reasoning text kept to find the marker that ended it: longer than any marker
_TAIL = 32  # chars of text kept under the grammar: a marker prefix never is longer
_MAX_TAILS = 4096  # marker prefixes whose completing tokens a vocabulary remembers


class _Vocabulary:
    """What constraining needs of one tokenizer, built once per tokenizer: llguidance's view of it,
    the tokens that could spell a marker out in text, and those that close JSON."""

    def __init__(self, tokenizer):
        n_base = tokenizer.num_base_tokens
        raw = [tokenizer.token_bytes(i) for i in range(n_base)]
        self.llg = llguidance.LLTokenizer.from_tiktoken(
            encoder={b: i for i, b in enumerate(raw)}, special_tokens=tokenizer.special_tokens, pattern=PAT_STR,
            eos_token=list(tokenizer.stop_ids), n_vocab=tokenizer.n_vocab)
        self.words = bitmask.words_for(tokenizer.n_vocab)
        # Text as the marker patterns see it: one char per byte (markers are ASCII).
        self.texts = [b.decode("latin-1") for b in raw]
        # Every marker ends in '>' or ']': only tokens holding one of them can complete a spelling.
        self.closers = np.array([i for i, b in enumerate(raw) if b">" in b or b"]" in b], np.int64)
        spelled = [i for i in self.closers if MARKER_RE.search(self.texts[i])]
        self.keep = None  # AND-mask that clears the tokens holding a whole marker, if any do
        if spelled:
            self.keep = np.full(self.words, -1, np.int32)
            bitmask.put(self.keep, spelled, False)
        specials = tokenizer.special_tokens
        self.breaks = frozenset(specials[m] for m in REASONING_END_MARKERS if m in specials)
        self.closing = ClosingTokens(tokenizer, raw, self.words)
        self._completing: dict[str, np.ndarray] = {}

    def completing(self, tail: str) -> np.ndarray:
        """The tokens that would complete a marker after `tail` (the start of one). Worked out once
        per tail: the tails text holds are few (`<`, `[`, `<|`, ...), the candidates many."""
        found = self._completing.get(tail)
        if found is None:
            found = np.array([t for t in self.closers if MARKER_RE.search(tail + self.texts[t])], np.int64)
            if len(self._completing) < _MAX_TAILS:
                self._completing[tail] = found
        return found


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer) -> _Vocabulary:
    """The tokenizer's llguidance vocabulary, built on first use and kept while the tokenizer lives."""
    with _vocabularies_lock:
        found = _vocabularies.get(tokenizer)
        if found is None:
            found = _vocabularies[tokenizer] = _Vocabulary(tokenizer)
        return found


class OutputConstraint:
    """The mask of one output under `grammar` (see the module docstring). `thinking`: the output
    may open with `<think>` and reason freely first; otherwise the grammar starts at once."""

    def __init__(self, tokenizer, grammar: str, *, vocab_size: int, stop_ids, thinking: bool = True,
                 max_tokens: int | None = None):
        self._vocab = vocabulary(tokenizer)
        if vocab_size < tokenizer.n_vocab:
            raise KimiError(f"the model's vocabulary ({vocab_size}) is smaller than the tokenizer's "
                            f"({tokenizer.n_vocab})")
        self._matcher = llguidance.LLMatcher(self._vocab.llg, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self._matcher.get_error()}")
        self._tok = tokenizer
        self._words = bitmask.words_for(vocab_size)
        self._llg_mask = np.zeros(self._vocab.words, np.int32)  # llguidance writes here, through a raw pointer
        self._llg_ptr = self._llg_mask.ctypes.data
        self._stops = sorted(set(stop_ids))
        self._think = tokenizer.think_start_id if thinking else None
        self.breaks = self._vocab.breaks if self._think is not None else frozenset()
        self._phase = _START if self._think is not None else _GRAMMAR
        self._parser = StreamParser()
        self._decoder = tokenizer.stream_decoder()
        self._recent = ""  # free phase: the last raw text; grammar phase: text since the last control token
        self.failure: str | None = None
        # Near the end of the budget, only what ends the output soonest (kimi_jax.chat.closing).
        self._closer = Closer(self._vocab.closing, self._words, max_tokens) \
            if max_tokens is not None else None

    @property
    def phase(self) -> str:
        return self._phase

    # ---- the engine's side ----------------------------------------------------------------------
    def mask(self) -> np.ndarray | None:
        if self._phase == _FREE:
            return None
        out = np.zeros(self._words, np.int32)
        if self._phase in (_START, _GRAMMAR):
            self._grammar_mask(out)
            if self._closer is not None and self._closer.active and self._phase == _GRAMMAR:
                out = self._closer.narrow(out, self._matcher)
        if self._phase in (_DONE, _FAILED):
            bitmask.put(out, self._stops, True)
        return out

    def accept(self, token: int) -> None:
        token = int(token)
        if self._closer is not None:
            self._closer.count(token)
        if self._phase in (_DONE, _FAILED):
            return
        if token in self._stops:
            self._phase = _DONE
            return
        if self._phase == _START:
            if token == self._think:
                self._phase = _FREE
                self._parser.feed(self._decoder.add(token))
                return
            self._phase = _GRAMMAR
        if self._phase == _FREE:
            self._free(token)
        else:
            self._consume([token], "")

    # ---- phases ---------------------------------------------------------------------------------
    def _grammar_mask(self, out: np.ndarray) -> None:
        vocab = self._vocab
        self._matcher.unsafe_compute_mask_ptr(self._llg_ptr, self._llg_mask.nbytes)
        own = out[:vocab.words]
        own[:] = self._llg_mask
        if self._matcher.is_error():
            self._fail(f"llguidance: {self._matcher.get_error()}")
            return
        if vocab.keep is not None:
            own &= vocab.keep
        recent = self._recent
        tail = recent[marker_prefix_start(recent):] if "<" in recent or "[" in recent else ""
        if tail:
            bitmask.put(own, bitmask.select(own, vocab.completing(tail)), False)
        bitmask.put(out, self._stops, self._matcher.is_accepting())
        if self._phase == _START:
            bitmask.put(out, [self._think], True)
        if not out.any():
            self._fail("no token can continue the output under the grammar")

    def _free(self, token: int) -> None:
        self._parser.feed(self._decoder.add(token))
        piece = self._tok.token_bytes(token).decode("latin-1")
        self._recent = self._recent[-_WINDOW:] + piece
        if self._parser.in_reasoning:
            return
        # The reasoning ended at a marker this token completed; the grammar takes over from there.
        self._phase = _GRAMMAR
        last_start = len(self._recent) - len(piece)
        end = next((m for m in MARKER_RE.finditer(self._recent)
                    if m.end() > last_start and m.group() in REASONING_END_MARKERS), None)
        if end is None:  # the parser and the marker pattern disagree: a bug, but not the model's
            self._fail("the reasoning ended at a marker this constraint cannot place")
            return
        tid = self._tok.token_id
        seen = {THINK_END: [], CALL_BEGIN: [tid(SECTION_BEGIN), tid(CALL_BEGIN)]}.get(end.group(),
                                                                                  [tid(SECTION_BEGIN)])
        rest = self._recent[end.end():]
        self._recent = ""
        self._consume(seen, f"reasoning ended at {end.group()}")
        if rest and self._phase == _GRAMMAR:
            self._consume(self._vocab.llg.tokenize_bytes(rest.encode("latin-1")), "")

    def _consume(self, tokens: list[int], why: str) -> None:
        for token in tokens:
            if not self._matcher.consume_token(token):
                what = why or f"token {token} ({self._tok.id_to_token(token)!r})"
                self._fail(f"{what} does not fit the grammar: {self._matcher.get_error() or 'not allowed here'}")
                return
            if token >= self._tok.num_base_tokens:  # a control token: its name is a whole marker
                self._recent = ""
                if self._closer is not None:
                    self._closer.control()
            else:
                self._recent = (self._recent + self._vocab.texts[token])[-_TAIL:]
                if self._closer is not None:
                    self._closer.text(self._vocab.texts[token])

    def _fail(self, reason: str) -> None:
        self._phase = _FAILED
        self.failure = reason


def output_constraint(tokenizer, *, vocab_size: int, stop_ids, thinking: bool = True, max_tokens: int | None = None,
                      tools=None, tool_choice: ToolChoice = ToolChoice(), first_index: int = 0, parallel: bool = True,
                      strict: bool = True, content_schema: dict | None = None,
                      content_param: str = "response_format") -> OutputConstraint | None:
    """The constraint for one output of at most `max_tokens` tokens (arguments as in
    `grammar.output_grammar`), or None when nothing constrains it. Raises GrammarError naming the
    schema that cannot be enforced."""
    grammar = output_grammar(tokenizer, tools=tools, tool_choice=tool_choice, first_index=first_index,
                             parallel=parallel, strict=strict, content_schema=content_schema,
                             content_param=content_param)
    if grammar is None:
        return None
    try:
        return OutputConstraint(tokenizer, grammar, vocab_size=vocab_size, stop_ids=stop_ids, thinking=thinking,
                                max_tokens=max_tokens)
    except GrammarError:
        check_schemas(tools if tool_choice.mode != "none" else None, strict=strict, content_schema=content_schema,
                      content_param=content_param)
        raise
