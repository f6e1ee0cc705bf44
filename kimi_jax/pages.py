"""Who owns which page of the latent cache: the host-side allocator and the prefix cache.

Pure Python, no JAX: the engine asks it for pages, writes the page numbers into the page table
(cache.py) and tells it when a sequence is done.

Prefix caching. A full page is identified by a hash chained over the token ids of every page up to
and including it, so two sequences share a page exactly when they share every token before its end.
When a sequence finishes, its full pages stay in the pool, indexed by that hash, with no owner; a new
sequence whose prompt starts with the same tokens takes them over instead of recomputing them. Pages
without owners are evicted least recently used first, only when a free page is needed.

Reservations. A sequence admitted with room for n tokens is guaranteed the pages for them: admission
fails (and the request waits) unless that many pages can be had by taking free or evictable pages,
counting what earlier admissions reserved. So a running sequence never finds the pool empty and
nobody's pages are ever taken from under them.

With a data-parallel mesh the pool is split into `shards` equal ranges, one per data shard, and a
slot only gets pages from its own shard's range (its rows of the cache live on those devices). The
first page of each range is never handed out: page 0 is where the cache writes padding tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from kimi_jax.errors import KimiError

DISCARD_PAGE = 0  # where the cache writes padding tokens; nothing reads it as a key


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def page_hashes(tokens, page_size: int, n_pages: int) -> list[bytes]:
    """Chained hashes of the first `n_pages` full pages of `tokens`."""
    out, h = [], b""
    arr = np.asarray(tokens, np.int64)
    for i in range(n_pages):
        h = hashlib.blake2b(h + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


@dataclasses.dataclass
class _Page:
    refs: int = 0
    key: bytes | None = None  # prefix hash, once the page is full and registered


class PagePool:
    def __init__(self, n_pages: int, page_size: int, *, shards: int = 1):
        if page_size < 1:
            raise KimiError(f"page size must be >= 1, got {page_size}")
        if n_pages % shards or n_pages // shards < 2:
            raise KimiError(f"a cache of {n_pages} pages cannot be split into {shards} data shard(s) of at least "
                            "2 pages each")
        usable = n_pages // shards - 1
        self.page_size = page_size
        self.shards = shards
        self.n_pages = n_pages
        self._pages = [_Page() for _ in range(n_pages)]
        lo = [s * (usable + 1) + 1 for s in range(shards)]
        self._free = [list(range(lo[s] + usable - 1, lo[s] - 1, -1)) for s in range(shards)]  # pop() = lowest
        self._cached = [dict() for _ in range(shards)]  # prefix hash -> page
        self._lru = [collections.OrderedDict() for _ in range(shards)]  # unowned cached pages, oldest first
        self._reserved = [0] * shards
        self.capacity = usable  # pages per shard

    # ---- accounting -----------------------------------------------------------------------------
    def available(self, shard: int = 0) -> int:
        """Pages that could be handed out now (free or evictable) and are not promised to anyone."""
        return len(self._free[shard]) + len(self._lru[shard]) - self._reserved[shard]

    def used(self) -> int:
        """Pages owned by running sequences."""
        return sum(1 for p in self._pages if p.refs > 0)

    def cached(self) -> int:
        """Unowned pages kept for their prefix."""
        return sum(len(lru) for lru in self._lru)

    # ---- a sequence's life ------------------------------------------------------------------------
    def match(self, tokens, shard: int = 0, *, limit: int | None = None) -> list[int]:
        """Pages holding the longest cached prefix of `tokens` (whole pages, at most `limit`). The
        caller must `admit` them (or give up) before anything else touches the pool."""
        n = len(tokens) // self.page_size if limit is None else min(limit, len(tokens) // self.page_size)
        found = []
        for key in page_hashes(tokens, self.page_size, n):
            page = self._cached[shard].get(key)
            if page is None:
                break
            found.append(page)
        return found

    def admit(self, shared: list[int], new_pages: int, reserve: int, shard: int = 0) -> list[int] | None:
        """Take ownership of the matched `shared` pages, allocate `new_pages` fresh ones now and
        reserve `reserve` more for later `grow` calls. None (and no change) if the pool cannot."""
        # Matched pages that sit unowned in the LRU are counted as available; taking them over
        # removes them from there, so they must not also be counted as room for the new pages.
        revived = sum(1 for p in shared if self._pages[p].refs == 0)
        if new_pages + reserve > self.available(shard) - revived:
            return None
        for p in shared:
            if self._pages[p].refs == 0:
                del self._lru[shard][p]
            self._pages[p].refs += 1
        self._reserved[shard] += reserve
        return shared + [self._take(shard) for _ in range(new_pages)]

    def grow(self, shard: int = 0) -> int:
        """One more page for a running sequence, out of its reservation."""
        if self._reserved[shard] < 1:
            raise RuntimeError("grow() beyond the sequence's reservation")
        self._reserved[shard] -= 1
        return self._take(shard)

    def release(self, pages: list[int], tokens, written: int, unused_reserve: int, shard: int = 0) -> None:
        """A sequence is done. `tokens[:written]` are the tokens whose latents its pages hold: its
        full pages are kept under their prefix hash (unless an identical page is cached already),
        the rest are freed, and what was left of its reservation is returned."""
        self._reserved[shard] -= unused_reserve
        full = min(min(written, len(tokens)) // self.page_size, len(pages))
        keys = page_hashes(tokens, self.page_size, full)
        for i, page in enumerate(pages):
            info = self._pages[page]
            info.refs -= 1
            if i < full and info.key is None and keys[i] not in self._cached[shard]:
                info.key = keys[i]
                self._cached[shard][keys[i]] = page
            if info.refs == 0:
                if info.key is not None:
                    self._lru[shard][page] = None
                    self._lru[shard].move_to_end(page)
                else:
                    self._free[shard].append(page)

    # ---- internals ------------------------------------------------------------------------------
    def _take(self, shard: int) -> int:
        if self._free[shard]:
            page = self._free[shard].pop()
        else:  # evict the least recently used cached page
            page, _ = self._lru[shard].popitem(last=False)
            del self._cached[shard][self._pages[page].key]
            self._pages[page].key = None
        self._pages[page].refs = 1
        return page
