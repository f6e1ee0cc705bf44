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
dropping the oldest documents, each from the front of its n-grams' position lists (O(1) per token).

`RequestDrafter` adapts to how its drafts fare: the draft length grows while drafts are accepted
whole and shrinks to what was accepted when they are not; its per-token acceptance is estimated
from recent verify steps; and a request whose drafts keep failing stops drafting for a while (16
tokens, doubling up to 512 while it keeps failing).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

ANCHORS = (2, 4, 8)  # n-gram lengths the index is keyed by
INDEX_STEP = 8192  # tokens of a request's own sequence indexed per lookup, at most (a long prompt is
#                    indexed over a few engine iterations instead of stalling one)
CANDIDATES = 4  # most recent occurrences examined per anchor length
MAX_MATCH = 32  # matches longer than this are all equally good
_SEP = -1  # between documents: equal to no token


class SuffixIndex:
    """Token sequences indexed by n-gram, to find the longest earlier match of a query's suffix and
    what followed it. `capacity` (tokens) bounds it: the oldest documents go first.

    Positions are global and only grow: `tokens[0]` is position `offset`, and a document dropped
    from the front takes its entries from the front of each of its n-grams' position lists."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.tokens: list[int] = []
        self.offset = 0  # global position of tokens[0]
        self.indexed = 0  # global positions indexed so far
        self._where: dict[int, dict[tuple, list[int]]] = {a: {} for a in ANCHORS}
        self._docs: list[int] = []  # global start of each document, oldest first
        self._size = 0  # real tokens held (separators not counted)

    def __len__(self) -> int:
        return self._size

    def add(self, tokens: Sequence[int]) -> None:
        """A new document (e.g. a finished request's output)."""
        if self.capacity is not None:
            tokens = tokens[-self.capacity:]
        if self._docs:
            self.extend([_SEP])
            self._size -= 1
        self._docs.append(self.offset + len(self.tokens))
        self.extend(tokens)
        while self.capacity is not None and self._size > self.capacity:
            self._drop_oldest()

    def extend(self, tokens: Sequence[int]) -> None:
        """Append to the newest document and index it all."""
        self.append(tokens)
        self.index(len(self.tokens))

    def append(self, tokens: Sequence[int]) -> None:
        """Append to the newest document without indexing (`index` catches up)."""
        self.tokens.extend(int(t) for t in tokens)
        self._size += len(tokens)

    def _keys(self, first_end: int, last_end: int):
        """(anchor, n-gram) ending at each global position in [first_end, last_end]."""
        seq, off = self.tokens, self.offset
        for end in range(first_end, last_end + 1):
            for a in ANCHORS:
                if end - a >= off:
                    key = tuple(seq[end - a - off:end - off])
                    if _SEP not in key:
                        yield end, a, key

    def index(self, limit: int) -> None:
        """Index up to `limit` more positions, oldest first."""
        stop = min(self.offset + len(self.tokens), self.indexed + limit)
        for end, a, key in self._keys(self.indexed + 1, stop):
            self._where[a].setdefault(key, []).append(end)
        self.indexed = max(self.indexed, stop)

    def _drop_oldest(self) -> None:
        """Forget the oldest document (there are at least two when this is called)."""
        start, stop = self._docs[0], self._docs[1] - 1  # the next document follows its separator
        for _, a, key in self._keys(start + 1, stop):
            ends = self._where[a].get(key)
            if ends and ends[0] <= stop:
                del ends[:bisect.bisect_right(ends, stop)]
                if not ends:
                    del self._where[a][key]
        self._docs.pop(0)
        self._size -= stop - start
        if self._docs[0] - self.offset > len(self.tokens) // 2:  # drop the dead front now and then
            self.tokens = self.tokens[self._docs[0] - self.offset:]
            self.offset = self._docs[0]

    def match(self, query: Sequence[int], *, own: bool = False) -> tuple[int, int]:
        """(match length, global position after the match) of the longest match of the end of
        `query` in the index; (0, -1) if none. `own`: the query is this index's own token list,
        so the match must end before its end."""
        best = (0, -1)
        seq, off, n = self.tokens, self.offset, len(query)
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
                while length < MAX_MATCH and length < n and end - length - 1 >= off and \
                        seq[end - length - 1 - off] == query[n - length - 1] != _SEP:
                    length += 1
                if (length, end) > best:
                    best = (length, end)
        return best

    def continuation(self, end: int, k: int, *, own: bool = False) -> list[int]:
        """Up to k tokens from global position `end` on, stopping at a document's end. `own` (the
        match was of this index's own end): past the end it repeats the continuation itself,
        since a match that overlaps the sequence's end means the text is periodic there."""
        seq = self.tokens
        out = seq[end - self.offset:end - self.offset + k]
        if _SEP in out:
            return out[:out.index(_SEP)]
        while own and out and len(out) < k:
            out.append(out[len(out) - (len(seq) + self.offset - end)])
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
    draft_len: int = 0  # length of the draft it found (shorter where the matched text ends)

    @classmethod
    def for_prompt(cls, prompt_ids: Sequence[int], max_draft: int, prior: float = 0.5) -> "RequestDrafter":
        """A drafter for a new request. `prior`: the acceptance it starts from (the engine passes
        what recent requests' drafts achieved), worth two draft tokens of evidence; the first draft
        length follows from it: about the run a draft token of that acceptance survives."""
        own = SuffixIndex()
        own.append(prompt_ids)  # indexed by the lookups, INDEX_STEP tokens at a time
        length = max(2, min(max_draft, int(1 / max(1 - prior, 1e-3))))
        return cls(own, max_draft, length=length, accepted=2 * prior, trials=2.0)

    @property
    def acceptance(self) -> float:
        """Estimated probability that a draft token is accepted, given those before it were."""
        return self.accepted / self.trials

    def paused(self) -> bool:
        return len(self.own.tokens) < self.paused_until

    def extend(self, tokens: Sequence[int]) -> None:
        self.own.append(tokens)

    def draft(self, shared: SuffixIndex | None, k: int) -> list[int]:
        """Up to k tokens likely to follow the request's tokens, from its own tokens or `shared`
        (whichever matches longer; its own among equals). The draft is no longer than the match
        that proposed it: a two-token coincidence earns two draft tokens."""
        self.own.index(INDEX_STEP)
        query = self.own.tokens
        length, end = self.own.match(query, own=True)
        source = self.own
        if shared is not None and length < MAX_MATCH:
            other = shared.match(query)
            if other[0] > length:
                (length, end), source = other, shared
        self.match_len = length
        draft = source.continuation(end, min(k, self.length, length), own=source is self.own) if length else []
        self.draft_len = len(draft)
        return draft

    def expected_gain(self, width: int) -> float:
        """Draft tokens a verify step of `width` may expect this request to have accepted: the sum
        of a^i over the draft it would propose now (0 while paused or without a match)."""
        if self.paused() or not self.draft_len:
            return 0.0
        a = self.acceptance
        n = min(width, self.draft_len)
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
