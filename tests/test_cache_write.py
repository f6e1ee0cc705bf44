"""Tokens into the paged cache: the TPU kernel writes exactly what the reference scatter writes."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ops
from kernels_pallas.cache_write import write_pages_ref


def _case(rng, layout, n_pages=6, width=24, size=128, n=7):
    shape = (n_pages, size, width) if layout == "rows" else (n_pages, width, size)
    pool = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    # Unsorted pages, two tokens on one page, padding tokens on page 0, distinct slots per page.
    page = np.asarray([3, 1, 3, 0, 5, 0, 2], np.int32)[:n]
    slot = np.asarray([7, 0, 127, 4, 64, 5, 1], np.int32)[:n]
    rows = jnp.asarray(rng.standard_normal((n, width)), jnp.float32)
    return pool, jnp.asarray(page), jnp.asarray(slot), rows


@pytest.mark.parametrize("layout", ["rows", "lanes"])
def test_the_reference_puts_each_token_at_its_page_and_slot(layout):
    pool, page, slot, rows = _case(np.random.default_rng(0), layout)
    out = np.asarray(write_pages_ref(pool, page, slot, rows, page_order=layout))
    for i in range(len(page)):
        got = out[page[i], slot[i]] if layout == "rows" else out[page[i], :, slot[i]]
        np.testing.assert_array_equal(got, np.asarray(rows[i]))
    untouched = np.ones(out.shape, bool)
    for i in range(len(page)):
        if layout == "rows":
            untouched[page[i], slot[i]] = False
        else:
            untouched[page[i], :, slot[i]] = False
    np.testing.assert_array_equal(out[untouched], np.asarray(pool)[untouched])


def test_the_tpu_kernel_writes_lanes_pages_like_the_reference():
    pool, page, slot, rows = _case(np.random.default_rng(1), "lanes")
    want = write_pages_ref(pool, page, slot, rows, page_order="lanes")
    got = ops.write_pages(pool, page, slot, rows, page_order="lanes", impl="interpret_tpu")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("layout", ["rows", "lanes"])
def test_a_pool_of_bf16_words_holds_and_returns_the_same_values(layout):
    from jax import lax

    from kernels_pallas.paged_attention import gather_pages, paged_attention_ref

    pool, page, slot, rows = _case(np.random.default_rng(2), layout)
    values = pool.astype(jnp.bfloat16)
    words = lax.bitcast_convert_type(values, jnp.uint16)
    out_values = write_pages_ref(values, page, slot, rows, page_order=layout)
    out_words = write_pages_ref(words, page, slot, rows, page_order=layout)
    assert out_words.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(lax.bitcast_convert_type(out_words, jnp.bfloat16), np.float32),
                                  np.asarray(out_values, np.float32))
    table = jnp.asarray([[3, 1, 2], [5, 4, 0]], jnp.int32)
    got = gather_pages(out_words, table, 0, 3, layout)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(gather_pages(out_values, table, 0, 3, layout), np.float32))
    # Attention over either pool, and the kernels leave a pool of words to the reference.
    width = pool.shape[2] if layout == "rows" else pool.shape[1]
    q = jnp.asarray(np.random.default_rng(3).standard_normal((2, 1, 2, width)), jnp.bfloat16)
    args = (q[..., :16], q[..., 16:], None, table, jnp.asarray([200, 5]), jnp.asarray([201, 6]))
    attend = lambda p: paged_attention_ref(*args[:2], p, *args[3:], scale=0.1, page_order=layout)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(attend(out_words)), np.asarray(attend(out_values)))
    assert ops.paged_attention.choose("pallas_tpu", *args[:2], out_words, *args[3:], scale=0.1,
                                      page_order=layout)[0] == "xla"
    assert ops.write_pages.choose("pallas_tpu", out_words, page, slot, rows, page_order=layout)[0] == "xla"
