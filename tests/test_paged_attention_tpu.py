"""The Mosaic paged MLA attention kernel (paged_attention_tpu.py) against the reference, in TPU
interpret mode, for both page layouts: rows of lengths 0, 1, mid-page and several blocks, pages in
random order, decode and chunked (causal) queries."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from page_pools import scattered_pool

from kernels_pallas import ops
from kernels_pallas.paged_attention import paged_attention_ref
from kernels_pallas.paged_attention_tpu import default_pages_per_block, paged_attention_tpu

INTERPRET = pltpu.InterpretParams()
H, LAT, ROPE, SCALE = 4, 128, 64, 0.1


def paged_pool(rng, lengths, page, page_order, n_pages=24, table_pages=6):
    """A scattered pool (page_pools.py) in `page_order`, as jax arrays."""
    pool, table = scattered_pool(rng, lengths, page, LAT + ROPE, n_pages, table_pages)
    if page_order == "lanes":
        pool = pool.swapaxes(1, 2)
    return jnp.asarray(pool), jnp.asarray(table)


def queries(rng, rows, c):
    return (jnp.asarray(rng.standard_normal((rows, c, H, LAT)), jnp.float32),
            jnp.asarray(rng.standard_normal((rows, c, H, ROPE)), jnp.float32))


@pytest.mark.parametrize("page_order,page,lengths,pages_per_block", [
    ("rows", 16, [0, 1, 37, 70], 2),  # empty row, one token, mid-page ends, 3 blocks
    ("rows", 16, [0, 1, 37, 70], 1),
    ("lanes", 128, [0, 200, 300], 2),  # K2's copy-free layout: 128-token pages as lane columns
])
def test_decode_matches_the_reference(page_order, page, lengths, pages_per_block):
    rng = np.random.default_rng(page + pages_per_block)
    pool, table = paged_pool(rng, lengths, page, page_order)
    q_lat, q_pe = queries(rng, len(lengths), 1)
    kv_len = jnp.asarray(lengths, jnp.int32)
    q_start = jnp.maximum(kv_len - 1, 0)
    got = paged_attention_tpu(q_lat, q_pe, pool, table, q_start, kv_len, scale=SCALE, page_order=page_order,
                              pages_per_block=pages_per_block, interpret=INTERPRET)
    want = paged_attention_ref(q_lat, q_pe, pool, table, q_start, kv_len, scale=SCALE, page_order=page_order)
    assert got.shape == q_lat.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert np.all(np.asarray(got[0]) == 0)  # a row with nothing cached gets zeros, not NaNs


def test_chunk_queries_are_causal_and_stop_at_the_rows_length():
    rng = np.random.default_rng(1)
    lengths = [3, 40, 66]  # row 0: two of its five queries lie past its length
    pool, table = paged_pool(rng, lengths, 16, "rows")
    q_lat, q_pe = queries(rng, 3, 5)
    q_start = jnp.asarray([0, 35, 61], jnp.int32)
    kv_len = jnp.asarray(lengths, jnp.int32)
    got = paged_attention_tpu(q_lat, q_pe, pool, table, q_start, kv_len, scale=SCALE, interpret=INTERPRET)
    want = paged_attention_ref(q_lat, q_pe, pool, table, q_start, kv_len, scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_bfloat16_cache_and_queries():
    rng = np.random.default_rng(2)
    pool, table = paged_pool(rng, [5, 90], 16, "rows")
    q_lat, q_pe = (a.astype(jnp.bfloat16) for a in queries(rng, 2, 1))
    pool = pool.astype(jnp.bfloat16)
    kv_len = jnp.asarray([5, 90], jnp.int32)
    args = (q_lat, q_pe, pool, table, kv_len - 1, kv_len)
    got = paged_attention_tpu(*args, scale=SCALE, interpret=INTERPRET)
    want = paged_attention_ref(*args, scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_page_sizes_the_kernel_cannot_tile_are_refused():
    rng = np.random.default_rng(3)
    q_lat, q_pe = queries(rng, 1, 1)
    kv_len = jnp.asarray([3], jnp.int32)
    table = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="multiple of 16"):
        paged_attention_tpu(q_lat, q_pe, jnp.zeros((4, 8, LAT + ROPE)), table, kv_len - 1, kv_len, scale=SCALE)
    with pytest.raises(ValueError, match="multiple of 128"):
        paged_attention_tpu(q_lat, q_pe, jnp.zeros((4, LAT + ROPE, 64)), table, kv_len - 1, kv_len, scale=SCALE,
                            page_order="lanes")
    with pytest.raises(ValueError, match="do not match"):
        paged_attention_tpu(q_lat, q_pe, jnp.zeros((4, 16, LAT)), table, kv_len - 1, kv_len, scale=SCALE)
    assert default_pages_per_block(128, 2048) == 8 and default_pages_per_block(64, 3) == 3


def test_ops_run_the_tpu_kernel_for_either_page_layout_and_the_gpu_one_for_rows_only():
    rng = np.random.default_rng(4)
    pool, table = paged_pool(rng, [0, 200, 300], 128, "lanes")
    q_lat, q_pe = queries(rng, 3, 1)
    kv_len = jnp.asarray([0, 200, 300], jnp.int32)
    args = (q_lat, q_pe, pool, table, jnp.maximum(kv_len - 1, 0), kv_len)
    assert ops.paged_attention.choose("pallas_tpu", *args, scale=SCALE, page_order="lanes")[0] == "pallas_tpu"
    assert ops.paged_attention.choose("pallas_gpu", *args, scale=SCALE, page_order="lanes")[0] == "xla"
    rows = jnp.swapaxes(pool, 1, 2)
    assert ops.paged_attention.choose("pallas_tpu", q_lat, q_pe, rows, *args[3:], scale=SCALE)[0] == "pallas_tpu"
    got = ops.paged_attention(*args, scale=SCALE, page_order="lanes", impl="interpret_tpu")
    want = paged_attention_ref(q_lat, q_pe, rows, *args[3:], scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("c,lengths,q_start", [
    (144, [200, 144, 300], [56, 0, 156]),  # 576 queries (4 heads): two blocks of 288
    (260, [260, 300], [0, 40]),  # 1040 queries: five blocks of 208, causal within the chunk
])
def test_a_prefill_chunk_of_more_queries_than_vmem_holds_runs_in_query_blocks(c, lengths, q_start):
    rng = np.random.default_rng(c)
    pool, table = paged_pool(rng, lengths, 128, "lanes", n_pages=8, table_pages=3)
    q_lat, q_pe = queries(rng, len(lengths), c)
    kv_len, q_start = jnp.asarray(lengths, jnp.int32), jnp.asarray(q_start, jnp.int32)
    args = (q_lat, q_pe, pool, table, q_start, kv_len)
    assert c * H > 512
    assert ops.paged_attention.choose("pallas_tpu", *args, scale=SCALE, page_order="lanes")[0] == "pallas_tpu"
    got = paged_attention_tpu(*args, scale=SCALE, page_order="lanes", pages_per_block=1, interpret=INTERPRET)
    want = paged_attention_ref(*args, scale=SCALE, page_order="lanes")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_query_blocks_fill_whole_sublane_tiles_and_the_runtimes_chunk_needs_two():
    from kernels_pallas.paged_attention_tpu import MAX_QUERIES, query_block

    assert query_block(8) == 8 and query_block(MAX_QUERIES) == MAX_QUERIES
    assert query_block(128 * 8) == 512  # the runtime's prefill chunk, K2's 8 heads per device at tensor=8
    assert query_block(128 * 64) == 512  # ... and all 64 heads on one device
    assert query_block(513) is None  # odd: no block of whole 8-row tiles divides it
    q = jnp.zeros((1, 513, 1, 32), jnp.float32)
    pool = jnp.zeros((4, 40, 128), jnp.float32)
    args = (q, q[..., :8], pool, jnp.ones((1, 2), jnp.int32), jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))
    chosen, _ = ops.paged_attention.choose("pallas_tpu", *args, scale=1.0, page_order="lanes")
    assert chosen == "xla"
