"""Absorbed-MLA attention over the paged latent cache on TPU (Mosaic); same call and semantics as
`paged_attention.paged_attention_ref`, both page orders:

    paged_attention_tpu(q_lat [R, C, H, r], q_pe [R, C, H, p], kv_pages [P, S, r + p] ("rows") or
                        [P, r + p, S] ("lanes"), page_table [R, T], q_start [R], kv_len [R], scale,
                        page_order) -> o_lat [R, C, H, r] float32

Use "lanes" with S a multiple of 128: XLA:TPU then stores the pool exactly as the kernel reads it.
"rows" pages with K2's width of 576 make XLA copy the whole pool on every call (it keeps arrays
whose minor dimension is not a multiple of 128 in another tiling); see paged_attention.py.

Grid = (rows, query blocks, key blocks), a key block being `pages_per_block` pages and a query
block at most MAX_QUERIES of the row's C*H queries (all of them for decode; a 128-token prefill
chunk with 8 heads per device is two blocks of 512). The page table and the
per-row lengths are scalar-prefetched; each of the block's pages is its own input whose index map
reads the table, so the pipeline DMAs page after page of the block (and the next step's, while this
one computes) straight from the pool, with no gather. The block axis of the grid is dynamic: the
longest row's block count, so a step costs its keys and nothing more. For a (row, query block) that
sees fewer keys (a shorter row; an earlier block of a causal chunk), and for the pages of a last
block that lie past them, the index maps repeat the page that input fetched in the step before,
which costs no DMA, and `pl.when` skips the compute.

Each step scores its pages' keys for the query block's queries at once (q . c_kv + q_pe . k_pe,
two dots, no concatenation), masks keys past each query's position and past the row's length,
and folds them into a running softmax (max, sum, output) kept in VMEM across the block's steps.
The values are the keys' latent part, so every cache byte a query block sees is read once for it.

Page size: "lanes" needs a multiple of 128 (a lane-dense minor dimension); "rows" a multiple of 16
(bf16 rows pack two to a sublane).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.paged_attention import page_size

__all__ = ["paged_attention_tpu", "default_pages_per_block", "query_block", "unsupported_reason"]

# Keys per grid step, ~1.2 MB of K2 cache. libtpu's schedule (v5p, 8 heads, 128-token pages) takes
# 207, 185 and 174 bundles per page at 4, 8 and 16 pages a step, against ~93 cycles of HBM time.
BLOCK_TOKENS = 1024
# Queries per grid step: with K2's latent of 512 the float32 output block [512, 512] is 1 MiB of
# VMEM, and a step's scores [512, BLOCK_TOKENS] float32 2 MiB more; 1024 queries would not fit
# v5p's default scoped VMEM beside the double-buffered pages.
MAX_QUERIES = 512
DOT_NT = (((1,), (1,)), ((), ()))  # a [m, k] . b [n, k] -> [m, n]


def default_pages_per_block(page: int, table_pages: int) -> int:
    return max(1, min(table_pages, BLOCK_TOKENS // page))


def query_block(queries: int) -> int | None:
    """Queries per grid step for a row of `queries` (C * heads): all of them when they fit, else
    the largest divisor within MAX_QUERIES that fills whole 8-row sublane tiles; None if none does."""
    if queries <= MAX_QUERIES:
        return queries
    return next((b for b in range(MAX_QUERIES, 7, -8) if queries % b == 0), None)


def unsupported_reason(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale, page_order="rows",
                       **config) -> str | None:
    """Why the kernel cannot take these arguments (page sizes it cannot tile, more queries per row
    than its VMEM holds), or None."""
    page = page_size(kv_pages, page_order)
    queries = q_lat.shape[1] * q_lat.shape[2]
    if query_block(queries) is None:
        return (f"the TPU attention kernel splits a row's C * heads = {queries} queries into blocks of at most "
                f"{MAX_QUERIES}, a multiple of 8 dividing them; there is none")
    need = 128 if page_order == "lanes" else 16
    if page % need:
        return f"the TPU attention kernel needs {page_order!r} pages of a multiple of {need} tokens; got {page}"
    if config.keys() - {"pages_per_block"}:
        return f"the TPU attention kernel takes no {sorted(config.keys() - {'pages_per_block'})}"
    return None


def _kernel(table_ref, last_ref, blocks_ref, q_start_ref, kv_len_ref, q_lat_ref, q_pe_ref, *refs, scale,
            heads, page, r, lanes, n_qb):
    *kv_refs, o_ref, m_ref, l_ref = refs
    b, qb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = q_lat_ref.shape[0]  # this block's queries: flat query i of the row is chunk position i // H

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    @pl.when(j < blocks_ref[b * n_qb + qb])
    def _():
        q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]
        # Last visible key of each query: its own position, within the row's cache.
        c = (qb * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) // heads
        limit = jnp.minimum(q_start_ref[b] + c, kv_len_ref[b] - 1)
        scores, values = [], []
        for i, kv_ref in enumerate(kv_refs):
            if lanes:  # [r + p, S]: keys are columns, the scores a plain product
                c_kv = kv_ref[:r, :].astype(q_lat.dtype)
                s = jnp.dot(q_lat, c_kv, preferred_element_type=jnp.float32)
                s = s + jnp.dot(q_pe, kv_ref[r:, :].astype(q_pe.dtype), preferred_element_type=jnp.float32)
            else:  # [S, r + p]: keys are rows
                c_kv = kv_ref[:, :r].astype(q_lat.dtype)
                s = lax.dot_general(q_lat, c_kv, DOT_NT, preferred_element_type=jnp.float32)
                s = s + lax.dot_general(q_pe, kv_ref[:, r:].astype(q_pe.dtype), DOT_NT,
                                        preferred_element_type=jnp.float32)
            pos = (j * len(kv_refs) + i) * page + lax.broadcasted_iota(jnp.int32, (1, page), 1)
            scores.append(jnp.where(pos <= limit, s * scale, -jnp.inf))
            values.append(c_kv)
        m_old = m_ref[...]
        m_new = functools.reduce(jnp.maximum, [s.max(axis=1, keepdims=True) for s in scores], m_old)
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # nothing visible yet: keep exp() finite
        probs = [jnp.exp(s - m_safe) for s in scores]
        corr = jnp.exp(m_old - m_safe)
        l_ref[...] = l_ref[...] * corr + sum(p.sum(axis=1, keepdims=True) for p in probs)
        weigh = functools.partial(lax.dot_general, dimension_numbers=DOT_NT if lanes else (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        pv = sum(weigh(p.astype(v.dtype), v) for p, v in zip(probs, values))
        o_ref[...] = o_ref[...] * corr + pv
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        l = l_ref[...]
        o_ref[...] = o_ref[...] / jnp.where(l > 0, l, 1.0)


def paged_attention_tpu(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale: float,
                        page_order: str = "rows", pages_per_block: int | None = None, interpret=False):
    """See the module docstring. `pages_per_block`: pages per grid step (default ~512 tokens)."""
    from jax.experimental.pallas import tpu as pltpu

    rows, c, h, r = q_lat.shape
    p = q_pe.shape[-1]
    page = page_size(kv_pages, page_order)
    lanes = page_order == "lanes"
    width = kv_pages.shape[1 if lanes else 2]
    t = page_table.shape[1]
    if width != r + p or q_pe.shape[:3] != q_lat.shape[:3]:
        raise ValueError(f"{page_order!r} kv_pages {list(kv_pages.shape)} do not match q_lat {list(q_lat.shape)} "
                         f"and q_pe {list(q_pe.shape)}")
    if page_table.shape[0] != rows or q_start.shape != (rows,) or kv_len.shape != (rows,):
        raise ValueError(f"page_table {list(page_table.shape)}, q_start {list(q_start.shape)} and kv_len "
                         f"{list(kv_len.shape)} must have the {rows} rows of q_lat")
    reason = unsupported_reason(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, scale=scale,
                                page_order=page_order)
    if reason:
        raise ValueError(reason)
    bp = pages_per_block or default_pages_per_block(page, t)
    bq = query_block(c * h)
    n_qb = c * h // bq
    q_start, kv_len = q_start.astype(jnp.int32), kv_len.astype(jnp.int32)
    # Keys any query of a (row, query block) can see, and the pages and key blocks holding them.
    last_c = jnp.minimum(c, (jnp.arange(1, n_qb + 1, dtype=jnp.int32) * bq + h - 1) // h)  # [n_qb]
    seen = jnp.clip(jnp.minimum(q_start[:, None] + last_c[None, :], kv_len[:, None]), 0, t * page)
    n_row_pages = (seen + page - 1) // page
    last = jnp.maximum(n_row_pages - 1, 0).astype(jnp.int32).reshape(-1)
    blocks = ((n_row_pages + bp - 1) // bp).astype(jnp.int32).reshape(-1)
    n_blocks = jnp.maximum(jnp.max(blocks), 1)
    table = page_table.astype(jnp.int32).reshape(-1)

    def page_map(i):
        def index(bi, qi, j, table, last, blocks, q_start, kv_len):
            k = bi * n_qb + qi
            blk = jnp.minimum(j, jnp.maximum(blocks[k] - 1, 0))
            slot = blk * bp + i
            # Past the block's last page, keep the page this input held a block earlier: no DMA.
            slot = jnp.where(slot <= last[k], slot, jnp.maximum(blk - 1, 0) * bp + i)
            return table[bi * t + jnp.minimum(slot, last[k])], 0, 0
        return index

    q_map = lambda bi, qi, j, *_: (bi, qi, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(rows, n_qb, n_blocks),
        in_specs=[pl.BlockSpec((None, bq, r), q_map), pl.BlockSpec((None, bq, p), q_map),
                  *[pl.BlockSpec((None, *kv_pages.shape[1:]), page_map(i)) for i in range(bp)]],
        out_specs=pl.BlockSpec((None, bq, r), q_map),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, heads=h, page=page, r=r, lanes=lanes, n_qb=n_qb),
        out_shape=jax.ShapeDtypeStruct((rows, c * h, r), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_mla_attention_tpu",
    )(table, last, blocks, q_start, kv_len, q_lat.reshape(rows, c * h, r), q_pe.reshape(rows, c * h, p),
      *([kv_pages] * bp))
    return out.reshape(rows, c, h, r)
