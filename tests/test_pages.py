"""PagePool on its own: the free list, reservations, reference counts, the prefix cache's hash
chain and its least-recently-used eviction, and data shards."""

import pytest

from kimi_jax.errors import KimiError
from kimi_jax.pages import DISCARD_PAGE, PagePool, page_hashes


def test_hashes_chain_over_every_earlier_page():
    a = page_hashes([1, 2, 3, 4, 5, 6], 2, 3)
    b = page_hashes([9, 2, 3, 4, 5, 6], 2, 3)  # only the first page differs
    assert len(set(a)) == 3 and all(x != y for x, y in zip(a, b))
    assert page_hashes([1, 2, 3, 4, 7, 7], 2, 2) == a[:2]


def test_admission_takes_pages_and_reserves_growth_or_takes_nothing():
    pool = PagePool(9, 4)  # page 0 is the discard page: 8 usable
    assert pool.capacity == 8 and pool.available() == 8
    pages = pool.admit([], 3, 2)
    assert len(pages) == 3 and DISCARD_PAGE not in pages and pool.available() == 3
    assert pool.admit([], 2, 2) is None and pool.available() == 3  # refused whole: no partial grab
    grown = [pool.grow(), pool.grow()]
    with pytest.raises(RuntimeError, match="beyond the sequence's reservation"):
        pool.grow()
    assert len(set(pages + grown)) == 5 and pool.used() == 5


def test_released_full_pages_are_cached_and_matched_by_prefix():
    pool = PagePool(9, 4)
    tokens = list(range(10))
    pages = pool.admit([], 3, 0)
    pool.release(pages, tokens, written=10, unused_reserve=0)  # pages 1, 2 full; the third partial
    assert pool.used() == 0 and pool.cached() == 2 and pool.available() == 8
    assert pool.match(tokens + [99]) == pages[:2]
    assert pool.match(tokens, limit=1) == pages[:1]
    assert pool.match([0, 1, 2, 3, 9, 9, 9, 9]) == pages[:1]  # the chain breaks at the first difference
    assert pool.match([5] + tokens[1:]) == []


def test_shared_pages_are_counted_and_outlive_any_one_owner():
    pool = PagePool(9, 4)
    tokens = list(range(8))
    pool.release(pool.admit([], 2, 0), tokens, written=8, unused_reserve=0)
    shared = pool.match(tokens)
    a = pool.admit(shared, 1, 0)
    b = pool.admit(shared, 1, 0)
    assert a[:2] == b[:2] == shared and pool.used() == 4 and pool.cached() == 0
    pool.release(a, tokens + [1, 2], written=9, unused_reserve=0)
    assert pool.match(tokens) == shared and pool.used() == 3  # b still holds the shared pages
    pool.release(b, tokens + [3], written=9, unused_reserve=0)
    assert pool.used() == 0 and pool.cached() == 2


def test_unowned_cached_pages_are_evicted_least_recently_used_first():
    pool = PagePool(5, 2)  # 4 usable
    old, new = [1, 1, 2, 2], [3, 3, 4, 4]
    pool.release(pool.admit([], 2, 0), old, written=4, unused_reserve=0)
    pool.release(pool.admit([], 2, 0), new, written=4, unused_reserve=0)
    assert pool.cached() == 4 and pool.available() == 4
    pool.admit([], 1, 0)  # needs one page: the oldest cached one goes
    assert pool.match(old) == [] and len(pool.match(new)) == 2


def test_taking_over_a_cached_page_does_not_count_it_twice():
    pool = PagePool(4, 2)  # 3 usable
    tokens = [1, 2, 3, 4]
    pool.release(pool.admit([], 2, 0), tokens, written=4, unused_reserve=0)
    shared = pool.match(tokens)
    # 1 free page + 2 cached: reviving the 2 cached leaves room for exactly 1 new page.
    assert pool.admit(shared, 2, 0) is None
    assert pool.admit(shared, 1, 0) is not None and pool.available() == 0


def test_shards_hand_out_only_their_own_range():
    pool = PagePool(8, 4, shards=2)  # pages 0-3 and 4-7; 0 and 4 are never handed out
    assert pool.capacity == 3
    assert sorted(pool.admit([], 3, 0, shard=0)) == [1, 2, 3]
    assert sorted(pool.admit([], 3, 0, shard=1)) == [5, 6, 7]
    assert pool.admit([], 1, 0, shard=0) is None
    tokens = list(range(4))
    pool.release([1], tokens, written=4, unused_reserve=0, shard=0)
    assert pool.match(tokens, shard=0) == [1] and pool.match(tokens, shard=1) == []


def test_pools_that_cannot_be_split_are_refused():
    with pytest.raises(KimiError, match="cannot be split into 2 data shard"):
        PagePool(5, 4, shards=2)
    with pytest.raises(KimiError, match="page size must be >= 1"):
        PagePool(8, 0)
