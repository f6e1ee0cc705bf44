"""The paged MLA latent cache: per token and layer only the normalized latent c_kv and the rotated
shared rope key k_pe, one row of kv_lora_rank + qk_rope_head_dim values (576 for K2, 35x less than
per-head K/V; docs/performance-targets.md), kept in fixed-size pages.

    pages      per layer [n_pages, page_size, r + p]   the pool ("rows" order; page 0 is never handed out)
               or [n_pages, r + p, page_size]          ("lanes": TPU, where a minor dimension of 576
                                                        would make XLA relayout the whole pool)
    page_table [slots, max_pages] int32                 the pages of each slot's sequence, in order
    lengths    [slots] int32                            tokens each slot holds

Position t of a slot's sequence is row t % page_size of page page_table[slot, t // page_size]. A
sequence's pages need not be contiguous or private: full pages with the same token prefix are
shared between slots (the host-side `PagePool` in pages.py decides who owns what; this file only
computes indices). Writes of padding tokens go to page 0, which nothing ever reads as a key.

Each layer's pool is its own array: a decode step updates every layer's pool in place (the cache is
donated) and no layer's pool is ever sliced out of a bigger one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import rope
from kimi_jax.config import Config
from kimi_jax.distributed import global_array
from kimi_jax.mla import AttnBatch
from kimi_jax.pages import DISCARD_PAGE, pages_for
from kimi_jax.sharding import sharding_for

POOL_AXES = ("cache_pages", None, None)  # pages split over the mesh's data axis with their slots
SLOT_AXES = ("batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedCache:
    pages: tuple[jax.Array, ...]  # per layer, see above
    page_table: jax.Array  # [slots, max_pages] int32
    lengths: jax.Array  # [slots] int32
    page_order: str = dataclasses.field(default="rows", metadata=dict(static=True))

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1 if self.page_order == "rows" else 2]

    @property
    def n_pages(self) -> int:
        return self.pages[0].shape[0]

    @property
    def slots(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @classmethod
    def create(cls, cfg: Config, *, slots: int, max_len: int, page_size: int, n_pages: int, dtype,
               mesh=None, page_order: str = "rows", words: bool = False) -> "PagedCache":
        """An empty cache placed (committed) where the compiled steps leave their outputs, so the
        first call and every later one hit the same compiled program."""
        spec = cls.abstract(cfg, slots=slots, max_len=max_len, page_size=page_size, n_pages=n_pages, dtype=dtype,
                            mesh=mesh, page_order=page_order, words=words)
        return jax.tree.map(lambda s: _zeros(s.shape, s.dtype, s.sharding)(), spec)

    @classmethod
    def abstract(cls, cfg: Config, *, slots: int, max_len: int, page_size: int, n_pages: int, dtype,
                 mesh=None, page_order: str = "rows", words: bool = False) -> "PagedCache":
        """The cache as ShapeDtypeStructs carrying their shardings (the planner compiles with it).
        `words`: a bf16 pool is stored as its raw 16-bit words (kernels_pallas/backends.py)."""
        if page_order not in ("rows", "lanes"):
            raise ValueError(f"unknown page_order {page_order!r}")
        pool_shape = (n_pages, page_size, cfg.cache_dim) if page_order == "rows" else \
            (n_pages, cfg.cache_dim, page_size)
        pool_dtype = jnp.dtype(jnp.uint16) if words and jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)
        pool = jax.ShapeDtypeStruct(pool_shape, pool_dtype,
                                    sharding=sharding_for(POOL_AXES, pool_shape, mesh, name="cache pages"))
        table_shape = (slots, pages_for(max_len, page_size))
        return cls(
            pages=(pool,) * cfg.num_hidden_layers,
            page_table=jax.ShapeDtypeStruct(table_shape, jnp.int32,
                                            sharding=sharding_for(SLOT_AXES + (None,), table_shape, mesh)),
            lengths=jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=sharding_for(SLOT_AXES, (slots,), mesh)),
            page_order=page_order,
        )

    def with_table(self, table: np.ndarray) -> "PagedCache":
        """The same pools with a new page table (host numpy, identical on every process)."""
        return dataclasses.replace(self, page_table=global_array(np.asarray(table, np.int32),
                                                                 self.page_table.sharding))

    # ---- batches (traced inside the compiled steps) -------------------------------------------
    def chunk_batch(self, cfg: Config, slots, q_start, n_valid, chunk: int) -> AttnBatch:
        """Rows b = 0..R-1 each continue slot slots[b] with `chunk` tokens from position q_start[b],
        of which the first n_valid[b] are real. Rows with n_valid 0 are padding."""
        positions = q_start[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        valid = jnp.arange(chunk)[None, :] < n_valid[:, None]
        table = jnp.take(self.page_table, slots, axis=0, mode="clip")
        return self._batch(cfg, table, positions, valid, q_start, q_start + n_valid)

    def rows_batch(self, cfg: Config, table, lengths, n_valid, width: int = 1) -> AttnBatch:
        """`width` tokens per row from its length `lengths[b]` on, over the pages `table[b]` (rows
        packed from slots by the caller), of which the first n_valid[b] are real: a decode step
        feeds one (n_valid 0 or 1), a verify step the last token and its drafts. Tokens past
        n_valid write to the discard page."""
        n_valid = n_valid.astype(jnp.int32)
        positions = lengths[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
        valid = jnp.arange(width)[None, :] < n_valid[:, None]
        return self._batch(cfg, table, positions, valid, lengths, lengths + n_valid)

    def _batch(self, cfg, table, positions, valid, q_start, kv_len) -> AttnBatch:
        ps = self.page_size
        col = jnp.clip(positions // ps, 0, table.shape[1] - 1)
        page = jnp.take_along_axis(table, col, axis=1)
        cos, sin = rope.rope_angles(cfg, positions)
        return AttnBatch(cos=cos, sin=sin, page_table=table, q_start=q_start, kv_len=kv_len,
                         write_page=jnp.where(valid, page, DISCARD_PAGE), write_slot=positions % ps,
                         valid=valid, page_order=self.page_order)

    def nbytes_per_token(self) -> int:
        return sum(p.size // (p.shape[0] * self.page_size) * p.dtype.itemsize for p in self.pages)


# Sequences of max_len the default pool holds per slot: the slot's own, and as much again for
# cached prefixes of finished requests.
POOL_SEQUENCES_PER_SLOT = 2


def default_pool_pages(max_batch: int, max_len: int, page_size: int, shards: int = 1) -> int:
    """The page pool an engine allocates unless told otherwise, and what the planner sizes (one
    rule for both): POOL_SEQUENCES_PER_SLOT full-length sequences per slot, split evenly over the
    data shards, each shard with one page that is never handed out (pages.py)."""
    pages = POOL_SEQUENCES_PER_SLOT * max_batch * pages_for(max_len, page_size)
    return shards * (1 + -(-pages // shards))


@functools.lru_cache(maxsize=32)
def _zeros(shape, dtype, sharding):
    """A compiled zeros for `sharding`: creates each device's block in place, on every process of
    a multi-host run (a host array could not be placed on devices of other processes)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def cache_bytes_per_token(cfg: Config, dtype) -> int:
    return cfg.num_hidden_layers * cfg.cache_dim * jnp.dtype(dtype).itemsize
