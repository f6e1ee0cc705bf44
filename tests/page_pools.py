"""Paged-cache test data shared by the attention tests: rows' tokens on random, distinct pages."""

import numpy as np


def scattered_pool(rng, lengths, page: int, width: int, n_pages: int, max_pages: int):
    """(pool float32 [n_pages, page, width], page table int32 [rows, max_pages]).

    Row b's tokens fill ceil(lengths[b] / page) pages drawn at random without repeats, so no row's
    pages are contiguous; page 0 holds junk and is never listed (the cache's write sink), and the
    table is 0 past each row's pages."""
    pool = rng.standard_normal((n_pages, page, width)).astype(np.float32)
    order = rng.permutation(np.arange(1, n_pages))
    table = np.zeros((len(lengths), max_pages), np.int32)
    used = 0
    for b, n in enumerate(lengths):
        k = -(-n // page)
        table[b, :k] = order[used:used + k]
        used += k
    return pool, table
