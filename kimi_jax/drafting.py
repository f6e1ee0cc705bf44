"""Draft tokens without a draft model: where did the last few tokens of a request occur before, and
what followed them there? Pure Python over token ids (no JAX); the scheduler's speculation policy
(speculation.py) asks it for drafts and tells it how many were accepted.

Two places to look:
  - the request's own prompt and output (`RequestDrafter.own`): agents quote tool results, edit
    files in place, echo JSON and repeat their earlier turns, all of which is in the prompt;
  - a bounded index of the recent outputs of other requests (`SuffixIndex` with a token capacity,
    shared by the scheduler): what one agent wrote, the next often writes again.

`SuffixIndex` keeps its tokens in one list (documents separated by a marker that matches nothing)
and, for each anchor length a in ANCHORS, the positions following every a-gram. A lookup takes the
most recent occurrences of the query's last a tokens for each anchor length, extends each match
backwards, and proposes what followed the longest (the most recent among equals). Long anchors find
an old long match that short ones, crowded by recent coincidences, would miss: the original line of
a file being copied, rather than the same indentation a few lines up. Its capacity is enforced by
dropping the oldest documents and re-indexing the rest (amortized O(1) per token).

`RequestDrafter` adapts to how its drafts fare: the draft length grows while drafts are accepted
whole and shrinks to what was accepted when they are not; its per-token acceptance is estimated
from recent verify steps; and a request whose drafts keep failing stops drafting for a while (16
tokens, doubling up to 512 while it keeps failing).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

ANCHORS = (2, 4, 8)  # n-gram lengths the index is keyed by
CANDIDATES = 4  # most recent occurrences examined per anchor length
MAX_MATCH = 32  # matches longer than this are all equally good
_SEP = -1  # between documents: equal to no token


class SuffixIndex:
    """Token sequences indexed by n-gram, to find the longest earlier match of a query's suffix and
    what followed it. `capacity` (tokens) bounds it: the oldest documents go first."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.tokens: list[int] = []
        self._where: dict[int, dict[tuple, list[int]]] = {a: {} for a in ANCHORS}
        self._docs: list[int] = []  # start of each document in `tokens`, oldest first

    def __len__(self) -> int:
        return len(self.tokens) - len(self._docs)  # real tokens, separators not counted

    def add(self, tokens: Sequence[int]) -> None:
        """A new document (e.g. a finished request's output)."""
        if self.capacity is not None and len(tokens) > self.capacity:
            tokens = tokens[-self.capacity:]
        if self.tokens:
            self.extend([_SEP])
        self._docs.append(len(self.tokens))
        self.extend(tokens)
        if self.capacity is not None and len(self) > self.capacity:
            self._evict()

    def extend(self, tokens: Sequence[int]) -> None:
        """Append to the newest document (a running request's own tokens grow this way)."""
        seq = self.tokens
        for t in tokens:
            seq.append(int(t))
            end = len(seq)
            for a, where in self._where.items():
                if end >= a:
                    key = tuple(seq[end - a:end])
                    if _SEP not in key:
                        where.setdefault(key, []).append(end)

    def _evict(self) -> None:
        """Keep the newest documents that fit in three quarters of the capacity (at least the
        newest), and index them afresh."""
        ends = [*self._docs[1:], len(self.tokens) + 1]  # a separator precedes every later document
        docs = [self.tokens[start:end - 1] for start, end in zip(self._docs, ends)]
        kept, total = [], 0
        for doc in reversed(docs):
            if kept and total + len(doc) > 3 * self.capacity // 4:
                break
            kept.append(doc)
            total += len(doc)
        self.tokens, self._docs = [], []
        self._where = {a: {} for a in ANCHORS}
        for doc in reversed(kept):
            if self.tokens:
                self.extend([_SEP])
            self._docs.append(len(self.tokens))
            self.extend(doc)

    def match(self, query: Sequence[int], *, own: bool = False) -> tuple[int, int]:
        """(match length, position after the match) of the longest match of the end of `query`
        found in the index; (0, -1) if none. `own`: the query is this index's own token list, so
        the match must end before its end."""
        best = (0, -1)
        seq, n = self.tokens, len(query)
        for a, where in self._where.items():
            if n < a:
                break
            ends = where.get(tuple(query[n - a:]))
            if not ends:
                continue
            for end in ends[-CANDIDATES - 1:][::-1]:
                if own and end >= n:
                    continue
                length = a
                while length < MAX_MATCH and length < n and end - length > 0 and \
                        seq[end - length - 1] == query[n - length - 1] != _SEP:
                    length += 1
                if (length, end) > best:
                    best = (length, end)
        return best

    def continuation(self, end: int, k: int, *, own: bool = False) -> list[int]:
        """Up to k tokens from position `end` on, stopping at a document's end. `own` (the match was
        of this index's own end): past the end it repeats the continuation itself, since a match
        that overlaps the sequence's end means the text is periodic there."""
        seq = self.tokens
        out = seq[end:end + k]
        if _SEP in out:
            return out[:out.index(_SEP)]
        while own and out and len(out) < k:
            out.append(out[len(out) - (len(seq) - end)])
        return out


@dataclasses.dataclass
class RequestDrafter:
    """One request's drafting state: its own token index and how well its drafts have done."""

    own: SuffixIndex
    max_draft: int
    length: int = 2  # draft length now (grows on success, see `observe`)
    accepted: float = 1.0  # decayed counts for the per-token acceptance estimate (a prior of 1 in 2)
    trials: float = 2.0
    paused_until: int = 0  # no drafting until the request holds this many tokens
    backoff: int = 16
    match_len: int = 0  # length of the match the latest lookup found (0: none)

    @classmethod
    def for_prompt(cls, prompt_ids: Sequence[int], max_draft: int) -> "RequestDrafter":
        own = SuffixIndex()
        own.add(prompt_ids)
        return cls(own, max_draft)

    @property
    def acceptance(self) -> float:
        """Estimated probability that a draft token is accepted, given those before it were."""
        return self.accepted / self.trials

    def paused(self) -> bool:
        return len(self.own.tokens) < self.paused_until

    def extend(self, tokens: Sequence[int]) -> None:
        self.own.extend(tokens)

    def draft(self, shared: SuffixIndex | None, k: int) -> list[int]:
        """Up to k tokens likely to follow the request's tokens, from its own tokens or `shared`
        (whichever matches longer; its own among equals). The draft is no longer than the match
        that proposed it: a two-token coincidence earns two draft tokens."""
        query = self.own.tokens
        length, end = self.own.match(query, own=True)
        source = self.own
        if shared is not None and length < MAX_MATCH:
            other = shared.match(query)
            if other[0] > length:
                (length, end), source = other, shared
        self.match_len = length
        if not length:
            return []
        return source.continuation(end, min(k, self.length, length), own=source is self.own)

    def expected_gain(self, width: int) -> float:
        """Draft tokens a verify step of `width` may expect this request to have accepted: the sum
        of a^i over the draft it would propose now (0 while paused or without a match)."""
        if self.paused() or not self.match_len:
            return 0.0
        a = self.acceptance
        n = min(width, self.length, self.match_len)
        return a * (1 - a ** n) / (1 - a) if a < 1 else float(n)

    def observe(self, drafted: int, accepted: int) -> None:
        """A verify step's outcome for this request: `accepted` of its `drafted` tokens survived."""
        if not drafted:
            return
        rejected = accepted < drafted
        self.accepted = 0.8 * self.accepted + accepted
        self.trials = 0.8 * self.trials + accepted + rejected
        self.length = max(1, min(self.max_draft, 2 * self.length if not rejected else accepted + 1))
        if self.trials >= 4 and self.acceptance < 0.2:
            # Keeps failing: decode plainly for a while, longer each time it happens again.
            self.paused_until = len(self.own.tokens) + self.backoff
            self.backoff = min(2 * self.backoff, 512)
            self.accepted, self.trials, self.length = 1.0, 2.0, 2
        elif self.acceptance > 0.5:
            self.backoff = 16
