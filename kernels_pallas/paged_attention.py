"""Absorbed-MLA attention over a paged latent cache: the pure-jnp reference.

The cache of one layer is a pool of pages, `kv_pages [P, S, r + p]`: each token keeps its normalized
latent c_kv (r values) followed by its rotated shared rope key k_pe (p values), 576 values for K2. A
sequence's tokens live in the pages its `page_table` row lists, in order: position t is slot t % S of
page page_table[t // S]. Page 0 is reserved by the cache as a sink for writes of padding tokens, so a
table entry of 0 past a row's length is harmless: nothing there is ever visible.

    paged_attention(q_lat [R, C, H, r], q_pe [R, C, H, p], kv_pages, page_table [R, T], q_start [R],
                    kv_len [R], scale) -> o_lat [R, C, H, r] float32

Two page orders (`page_order`): "rows", the above, a token per row of its page; "lanes",
`kv_pages [P, r + p, S]`, a token per lane column. XLA:TPU stores any array whose minor dimension
is not a multiple of 128 in a transposed tiling that a Pallas kernel cannot read, so the TPU kernel
(paged_attention_tpu.py) takes "lanes" pages of S = 128 or 256 tokens: for those XLA's own choice
of layout is the kernel's, and nothing is copied. (With "rows", width 576 for K2, XLA copies the
whole pool on every call.)

A pool may hold bfloat16 values as raw 16-bit words (dtype uint16; backends.Backend.cache_words):
XLA:CPU converts a whole bf16 array to float32 for every gather, scatter or update-slice on it, so
a bf16 pool costs two whole-pool conversions per layer and step there; on words the same gathers
and writes touch only the rows they move. The reference reads and writes either kind.

Query c of row b sits at position q_start[b] + c and sees the keys at positions s with
s <= q_start[b] + c and s < kv_len[b]:

    o_lat = sum_s softmax_s(scale * (q_lat . c_kv(s) + q_pe . k_pe(s))) * c_kv(s)

i.e. attention with one shared key head of width r + p and one shared value head of width r (the
value is the key's latent part). A decode step is C = 1 with q_start = kv_len - 1; a prefill chunk
is C tokens starting where the row's cache ends. A query that sees no key gets zeros.

The reference visits keys in blocks of `block_pages` pages with an online softmax. Its trip count
is the longest row's length in blocks, a traced value, so its cost follows the context in use; on
GPU such a data-dependent loop syncs with the host every iteration, which is what the kernels
beside this file avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["paged_attention_ref", "gather_pages", "PAGE_ORDERS", "page_size", "pool_values", "pool_words"]

PAGE_ORDERS = ("rows", "lanes")


def page_size(kv_pages, page_order: str = "rows") -> int:
    """Tokens per page of a pool in `page_order`."""
    if page_order not in PAGE_ORDERS:
        raise ValueError(f"unknown page_order {page_order!r}; expected one of {PAGE_ORDERS}")
    return kv_pages.shape[1] if page_order == "rows" else kv_pages.shape[2]


def pool_values(x: jax.Array) -> jax.Array:
    """Values read from a pool: words of a uint16 pool are bfloat16 values."""
    return lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def pool_words(rows: jax.Array, pool_dtype) -> jax.Array:
    """`rows` as a pool of `pool_dtype` stores them (bfloat16 words in a uint16 pool)."""
    if pool_dtype == jnp.uint16:
        return lax.bitcast_convert_type(rows.astype(jnp.bfloat16), jnp.uint16)
    return rows.astype(pool_dtype)


def gather_pages(kv_pages, page_table, first: int | jax.Array, n: int, page_order: str = "rows"):
    """Tokens of pages page_table[:, first:first + n] for every row: [R, n * S, r + p]."""
    rows = page_table.shape[0]
    page = page_size(kv_pages, page_order)
    pages = lax.dynamic_slice_in_dim(page_table, first, n, axis=1)  # [R, n]
    tokens = pool_values(jnp.take(kv_pages, pages.reshape(-1), axis=0))  # [R * n, S, w] (rows) or [R * n, w, S]
    if page_order == "lanes":
        tokens = jnp.swapaxes(tokens, 1, 2)
    return tokens.reshape(rows, n * page, tokens.shape[2])


def paged_attention_ref(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale: float,
                        block_pages: int | None = None, n_blocks: int | None = None, page_order: str = "rows"):
    """See the module docstring. `block_pages`: pages per key block (default: ~256 tokens).
    `n_blocks`: visit exactly this many key blocks (a static count makes the loop a scan, which is
    differentiable); by default the longest row's blocks, a traced count."""
    rows, c, h, r = q_lat.shape
    page = page_size(kv_pages, page_order)
    bp = block_pages or max(1, 256 // page)
    # A block may run past the table's last column; pad it so every block's slice stays in bounds.
    n_blocks_max = -(-page_table.shape[1] // bp)
    table = jnp.pad(page_table, ((0, 0), (0, n_blocks_max * bp - page_table.shape[1])))
    q_pos = q_start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]  # [R, C]
    limit = jnp.minimum(q_pos, kv_len[:, None] - 1)  # last visible key position per query
    block = bp * page

    def body(j, carry):
        m, l, acc = carry
        kv = gather_pages(kv_pages, table, j * bp, bp, page_order)  # [R, block, r + p]
        c_kv, k_pe = kv[..., :r], kv[..., r:]
        s = jnp.einsum("bchr,bsr->bchs", q_lat, c_kv.astype(q_lat.dtype), preferred_element_type=jnp.float32)
        s += jnp.einsum("bchp,bsp->bchs", q_pe, k_pe.astype(q_pe.dtype), preferred_element_type=jnp.float32)
        s *= scale
        pos = j * block + jnp.arange(block, dtype=jnp.int32)
        visible = pos[None, None, :] <= limit[:, :, None]  # [R, C, block]
        s = jnp.where(visible[:, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: keep exp() finite
        pr = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + pr.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bchs,bsr->bchr", pr.astype(q_lat.dtype),
                                                 c_kv.astype(q_lat.dtype), preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((rows, c, h), -jnp.inf, jnp.float32), jnp.zeros((rows, c, h), jnp.float32),
            jnp.zeros((rows, c, h, r), jnp.float32))
    if n_blocks is None:
        n_blocks = jnp.clip((jnp.max(jnp.minimum(q_pos[:, -1] + 1, kv_len)) + block - 1) // block, 0, n_blocks_max)
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]
