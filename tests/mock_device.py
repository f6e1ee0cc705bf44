"""A device for the scheduler made of numpy: the contract of steps.py without a model.

It keeps a token-id "cache" in pages, reads each row's whole context back through its page table
and picks the next token as a function of that context: where the last COPY tokens occurred before,
the token that followed them (so text that repeats keeps repeating, and drafts get accepted),
otherwise a hash of the whole context. So a wrong page in the table, a page shared from the prefix
cache with the wrong tokens, a position written twice or a rejected draft left in a row's context
changes the tokens, and `expected(prompt, n)` (the same rule over the true sequence) tells what they
should be. Masks, halt ids, budgets, packed rows, blocks of steps and verify steps follow the
compiled steps' rules; every dispatch is recorded for tests to inspect.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kimi_jax.pages import DISCARD_PAGE

VOCAB = 100


COPY = 3  # the 'model' continues an earlier occurrence of its last COPY tokens


def next_token(context, allowed=None) -> int:
    """The 'model': what followed the latest earlier occurrence of the context's last COPY tokens,
    if allowed; else a hash of the whole context, mapped into the allowed ids."""
    context = [int(t) for t in context]
    tail = context[-COPY:]
    for end in range(len(context) - 1, COPY - 1, -1):
        if context[end - COPY:end] == tail and len(tail) == COPY:
            if allowed is None or allowed[context[end]]:
                return context[end]
            break
    h = int.from_bytes(hashlib.blake2b(np.asarray(context, np.int64).tobytes(), digest_size=8).digest(), "little")
    ids = np.arange(VOCAB) if allowed is None else np.flatnonzero(allowed)
    return int(ids[h % len(ids)])


def expected(prompt, n: int, stop_ids=()) -> list[int]:
    """What a request should generate: up to n tokens, through its first stop id."""
    seq, out = list(prompt), []
    while len(out) < n:
        out.append(next_token(seq))
        seq.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


def bits(mask_words) -> np.ndarray:
    """Bitmask words -> allowed [VOCAB] bool (bit i % 32 of word i // 32)."""
    words = np.asarray(mask_words).view(np.uint32)
    return ((words[np.arange(VOCAB) // 32] >> (np.arange(VOCAB) % 32).astype(np.uint32)) & 1).astype(bool)


class MockDevice:
    vocab_size = VOCAB

    def __init__(self, slots: int, n_pages: int, page_size: int):
        self.slots, self.page_size = slots, page_size
        self.pages = np.full((n_pages, page_size), -1, np.int64)
        self.table = None
        self.knobs = None
        self.tokens = np.zeros(slots, np.int64)
        self.alive = np.zeros(slots, bool)
        self.budget = np.zeros(slots, np.int64)
        self.lengths = np.zeros(slots, np.int64)
        self.log = []  # ("prefill" | "decode" | "resume", work or slots)

    def set_table(self, table):
        self.table = table.copy()

    def set_knobs(self, knobs):
        self.knobs = {k: v.copy() for k, v in knobs.items()}

    def _write(self, slot, position, token):
        page = self.table[slot, position // self.page_size]
        assert page != DISCARD_PAGE, f"slot {slot} writes position {position} with no page in its table"
        self.pages[page, position % self.page_size] = token

    def _context(self, slot):
        n = self.lengths[slot]
        pos = np.arange(n)
        return self.pages[self.table[slot, pos // self.page_size], pos % self.page_size]

    def _draw(self, slot, mask_row):
        return next_token(self._context(slot), None if mask_row is None else bits(mask_row))

    def _halts(self, slot, token):
        return token in self.knobs["halt"][slot]

    def prefill(self, work):
        self.log.append(("prefill", work))
        out = np.zeros(len(work.slots), np.int64)
        for i, slot in enumerate(work.slots):
            if slot >= self.slots:
                continue
            for c in range(work.n_valid[i]):
                self._write(slot, work.q_start[i] + c, work.tokens[i, c])
            self.lengths[slot] = work.q_start[i] + work.n_valid[i]
            out[i] = self._draw(slot, None if work.mask is None else work.mask[i])
            if work.finish_budget[i] >= 0:
                self.tokens[slot], self.budget[slot] = out[i], work.finish_budget[i]
                self.alive[slot] = work.finish_budget[i] > 0 and not self._halts(slot, out[i])
        return out

    def decode(self, work):
        self.log.append(("decode", work))
        out = np.full((work.steps, len(work.rows)), -1, np.int64)
        for step in range(work.steps):
            for b, slot in enumerate(work.rows):
                if slot >= self.slots or not self.alive[slot]:
                    continue
                self._write(slot, self.lengths[slot], self.tokens[slot])
                self.lengths[slot] += 1
                t = self._draw(slot, None if work.mask is None else work.mask[b])
                out[step, b] = self.tokens[slot] = t
                self.budget[slot] -= 1
                self.alive[slot] = self.budget[slot] > 0 and not self._halts(slot, t)
        return out

    def verify(self, work):
        self.log.append(("verify", work))
        width = work.drafts.shape[1] + 1
        out = np.full((width, len(work.rows)), -1, np.int64)
        for b, slot in enumerate(work.rows):
            if slot >= self.slots or not self.alive[slot]:
                continue
            n_draft = min(int(work.n_draft[b]), self.budget[slot] - 1)
            fed = [self.tokens[slot], *work.drafts[b, :n_draft]]
            start = self.lengths[slot]
            for j, t in enumerate(fed):  # every fed token is written, accepted or not
                self._write(slot, start + j, t)
            n_out = 0
            for j in range(len(fed)):
                self.lengths[slot] = start + j + 1
                t = self._draw(slot, None)
                out[n_out, b] = t
                n_out += 1
                self.budget[slot] -= 1
                if self._halts(slot, t) or not self.budget[slot] or j == n_draft or t != work.drafts[b, j]:
                    break
            self.tokens[slot] = t
            self.alive[slot] = self.budget[slot] > 0 and not self._halts(slot, t)
        return out

    def resume(self, slots):
        self.log.append(("resume", list(slots)))
        for s in slots:
            self.alive[s] = self.budget[s] > 0

    def read(self, handle):
        return handle

    def decodes(self):
        return [w for kind, w in self.log if kind == "decode"]

    def verifies(self):
        return [w for kind, w in self.log if kind == "verify"]
