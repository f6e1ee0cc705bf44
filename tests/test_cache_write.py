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
