"""Exact per-device bytes of the weights and of the engine's latent cache on a mesh, and the
longest context that fits a device's memory once the programs' temporaries are known.

Nothing is compiled or allocated: the model is built from abstract arrays (INT4 experts packed, in
the layout the target's kernels read) and placed on the mesh by the runtime's own sharding rules,
so the bytes are those the loader would put on each device. The cache is the pool the engine
allocates (cache.default_pool_pages), in the target's page layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math


def backend(cfg, platform: str):
    """The runtime's record for `platform` (kernels_pallas/backends.py) with the expert packing
    this model gets there (dense experts keep the checkpoint's)."""
    from kernels_pallas.backends import backend_for
    from kimi_jax.model import expert_packing_for

    be = backend_for(platform)
    return dataclasses.replace(be, expert_packing=expert_packing_for(cfg, be))


@dataclasses.dataclass
class MeshMemory:
    """Per-device bytes on one mesh, for `batch` slots of `max_len` tokens."""

    mesh: str
    weight_bytes: int
    expert_weight_bytes: int  # the routed experts' share of weight_bytes
    cache_bytes: int  # the engine's page pool, page table and lengths
    pages: int
    page_size: int
    # per token of one sequence's context, per device (sequences are split over `data`)
    cache_bytes_per_token_per_row: float


def gb(x) -> str:
    """Bytes as the planner prints them."""
    return f"{x / 1e9:,.2f} GB"


def shard_bytes(x) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


@functools.lru_cache(maxsize=4)
def abstract_state(cfg, dtype: str, expert_packing: str):
    """(graphdef, state) of the whole model as shapes: built once per layout (8 s for K2 here)."""
    import jax.numpy as jnp

    from kimi_jax.model import abstract_model

    return abstract_model(cfg, jnp.dtype(dtype), expert_packing=expert_packing)


def placed(cfg, mesh, *, dtype: str, expert_packing: str):
    """The abstract model's state placed on `mesh` (a KimiError names a dimension it cannot split)."""
    from kimi_jax.sharding import placed_abstract

    graphdef, state = abstract_state(cfg, dtype, expert_packing)
    return graphdef, placed_abstract(state, mesh)


def abstract_cache(cfg, mesh, spec, *, batch: int, max_len: int, dtype: str, be):
    import jax.numpy as jnp

    from kimi_jax.cache import PagedCache, default_pool_pages

    n_pages = default_pool_pages(batch, max_len, be.page_size, spec.data)  # what the engine allocates
    return PagedCache.abstract(cfg, slots=batch, max_len=max_len, page_size=be.page_size, n_pages=n_pages,
                               dtype=jnp.dtype(dtype), mesh=mesh, page_order=be.page_order, words=be.cache_words)


def mesh_memory(cfg, mesh, spec, *, batch: int, max_len: int, dtype: str, be) -> MeshMemory:
    import jax
    from flax import nnx

    from kimi_jax.quant import is_routed_expert

    _, state = placed(cfg, mesh, dtype=dtype, expert_packing=be.expert_packing)
    cache = abstract_cache(cfg, mesh, spec, batch=batch, max_len=max_len, dtype=dtype, be=be)
    experts = sum(shard_bytes(x) for p, v in nnx.to_flat_state(state) if is_routed_expert(p, v)
                  for x in jax.tree.leaves(v.get_value()))
    pool = sum(shard_bytes(x) for x in cache.pages)
    return MeshMemory(mesh=str(spec), weight_bytes=sum(shard_bytes(x) for x in jax.tree.leaves(state)),
                      expert_weight_bytes=experts, cache_bytes=sum(shard_bytes(x) for x in jax.tree.leaves(cache)),
                      pages=cache.n_pages, page_size=cache.page_size,
                      cache_bytes_per_token_per_row=pool / (cache.n_pages * cache.page_size))


def longest_context(m: MeshMemory, temp_bytes: float, memory: float, batch: int) -> int:
    """Largest max_len per sequence for `batch` slots that fits `memory` bytes per device with the
    engine's default pool (cache.default_pool_pages: room for cached prefixes too)."""
    from kimi_jax.cache import POOL_SEQUENCES_PER_SLOT

    free = memory - m.weight_bytes - temp_bytes
    if free <= 0:
        return 0
    tokens = free / (m.cache_bytes_per_token_per_row * POOL_SEQUENCES_PER_SLOT * batch)
    return int(tokens) if tokens >= 1 else 0


def fits(m: MeshMemory, temp_bytes: float, memory: float, batches) -> dict[int, int]:
    return {b: longest_context(m, temp_bytes, memory, b) for b in batches}
