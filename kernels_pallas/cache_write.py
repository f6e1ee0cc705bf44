"""Writing tokens' rows into a paged latent cache: the reference (a scatter) and a TPU kernel.

    write_pages(kv_pages, page [N], slot [N], rows [N, r + p], *, page_order) -> kv_pages

Token i goes to slot slot[i] of page page[i]: row slot[i] of the page in "rows" order
[P, S, r + p], column slot[i] in "lanes" order [P, r + p, S] (see paged_attention.py).

Why a kernel: in "lanes" pages one token is a column, and XLA:TPU lays out the target of a column
scatter (or of a column update) with the written dimension minor, so it relayouts the whole pool
before the write and back after it, on every layer of every step. The kernel instead visits each
written page once, as the block [r + p, S] the pool already is in memory, and sets the token
columns in it with a lane mask; the pool is aliased in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.paged_attention import pool_words

__all__ = ["write_pages_ref", "write_pages_tpu"]


def write_pages_ref(kv_pages, page, slot, rows, *, page_order: str = "rows"):
    rows = pool_words(rows, kv_pages.dtype)
    if page_order == "rows":
        return kv_pages.at[page, slot].set(rows)
    return kv_pages.at[page, :, slot].set(rows)


def write_pages_tpu(kv_pages, page, slot, rows, *, page_order: str = "lanes", interpret=False):
    """The "lanes" write as a Mosaic kernel (see the module docstring); "rows" pages are written by
    the reference, whose row scatter XLA:TPU does in place."""
    from jax.experimental.pallas import tpu as pltpu

    if page_order != "lanes":
        return write_pages_ref(kv_pages, page, slot, rows, page_order=page_order)
    n_pages, width, size = kv_pages.shape
    n = rows.shape[0]
    # Tokens of one page in one run: each page is then fetched, updated and written back once, and
    # no page is fetched again while an earlier write of it may still be in flight.
    order = jnp.argsort(page, stable=True)
    page, slot = page[order].astype(jnp.int32), slot[order].astype(jnp.int32)
    first = jnp.concatenate([jnp.ones((1,), jnp.int32), (page[1:] != page[:-1]).astype(jnp.int32)])
    rows = rows[order].astype(kv_pages.dtype)[:, :, None]  # [N, w, 1]: a column to broadcast over lanes
    block = pl.BlockSpec((1, width, size), lambda i, pg, sl, fi: (pg[i], 0, 0))
    return pl.pallas_call(
        _lanes_kernel,
        out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(n,),
            in_specs=[pl.BlockSpec((1, width, 1), lambda i, pg, sl, fi: (i, 0, 0)), block],
            out_specs=block),
        input_output_aliases={4: 0},  # operands: page, slot, first, rows, kv_pages
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
        name="paged_cache_write_tpu",
    )(page, slot, first, rows, kv_pages)


def _lanes_kernel(page_ref, slot_ref, first_ref, rows_ref, pool_ref, out_ref):
    del page_ref  # it picks the blocks (index maps)
    i = pl.program_id(0)

    @pl.when(first_ref[i] == 1)
    def _():  # the first token of this page: start from the page as it is
        out_ref[...] = pool_ref[...]

    lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 2)
    out_ref[...] = jnp.where(lane == slot_ref[i], rows_ref[...], out_ref[...])
