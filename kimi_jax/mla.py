"""Multi-head latent attention (docs/k2-format.md §4.2, §4.5), always in the weight-absorbed form.

Per token the layer keeps only c_kv (the kv_a_layernorm'ed latent, r = kv_lora_rank) and the
rotated shared rope key k_pe (p = qk_rope_head_dim), side by side in one cache row of r + p values.
Instead of expanding per-head keys and values from the latent over the whole context (kv_b_proj:
r -> h·(n+v)), we fold kv_b_proj's two halves into the query and the output:

    score_h(s) = (q_nope_h · W_UK[h]) · c_kv(s) + q_pe_h · k_pe(s)         (W_UK: [h, n, r])
    out_h      = W_UV[h] · Σ_s p_h(s) c_kv(s)                               (W_UV: [h, v, r])

which is attention with one shared key/value head of width r + p. Prefill chunks and decode steps
use the same code; only the number of query tokens differs. The cache is paged (cache.py): this
layer writes its chunk's rows where `AttnBatch` says and reads its keys through the page table with
`kernels_pallas.ops.paged_attention`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.paged_attention import paged_attention_ref
from kimi_jax import rope
from kimi_jax.config import Config
from kimi_jax.layers import ones, param, rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttnBatch:
    """Where a forward call's tokens sit: what every layer's attention shares.

    Row b's query c is at position q_start[b] + c; its cache row goes to slot write_slot[b, c] of
    page write_page[b, c] (page 0 for padding: the cache's discard page). After the write, row b's
    sequence holds kv_len[b] tokens, laid out over the pages page_table[b]."""

    cos: jax.Array  # [b, c, p/2] rope angles of each query token
    sin: jax.Array  # [b, c, p/2]
    page_table: jax.Array  # [b, T] int32
    q_start: jax.Array  # [b] int32
    kv_len: jax.Array  # [b] int32
    write_page: jax.Array  # [b, c] int32
    write_slot: jax.Array  # [b, c] int32
    valid: jax.Array | None = None  # [b, c] bool: real tokens (None: all); padding takes no expert
    page_order: str = dataclasses.field(default="rows", metadata=dict(static=True))  # the pool's (cache.py)


class MLA(nnx.Module):
    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        n, p, v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = param(rngs, (h, n + p, d), ("heads", "head_dim", "embed"), dtype)
        else:
            q = cfg.q_lora_rank
            self.q_a_proj = param(rngs, (q, d), ("q_lora", "embed"), dtype)
            self.q_a_norm = ones((q,), ("q_lora",), dtype)
            self.q_b_proj = param(rngs, (h, n + p, q), ("heads", "head_dim", "q_lora"), dtype)
        self.kv_a_proj = param(rngs, (r + p, d), ("kv_lora", "embed"), dtype)
        self.kv_a_norm = ones((r,), ("kv_lora",), dtype)
        # kv_b_proj split at load time into its key and value halves, so neither step slices it.
        self.k_b_proj = param(rngs, (h, n, r), ("heads", "head_dim", "kv_lora"), dtype)
        self.v_b_proj = param(rngs, (h, v, r), ("heads", "head_dim", "kv_lora"), dtype)
        self.o_proj = param(rngs, (d, h, v), ("embed", "heads", "head_dim"), dtype)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [b,c,d] -> absorbed query (q_lat [b,c,h,r], q_pe [b,c,h,p]) and this chunk's cache rows
        [b,c,r+p] (normalized latent, then rotated rope key)."""
        cfg = self.cfg
        n, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = jnp.einsum("bcd,hkd->bchk", x, self.q_proj[...])
        else:
            cq = rms_norm(jnp.einsum("bcd,qd->bcq", x, self.q_a_proj[...]), self.q_a_norm[...], cfg.latent_norm_eps)
            q = jnp.einsum("bcq,hkq->bchk", cq, self.q_b_proj[...])
        q_nope, q_pe = q[..., :n], q[..., n:]
        q_pe = rope.apply_rope(q_pe, cos[:, :, None, :], sin[:, :, None, :])
        q_lat = jnp.einsum("bchn,hnr->bchr", q_nope, self.k_b_proj[...])

        kv = jnp.einsum("bcd,kd->bck", x, self.kv_a_proj[...])
        c_kv = rms_norm(kv[..., :r], self.kv_a_norm[...], cfg.latent_norm_eps)
        k_pe = rope.apply_rope(kv[..., r:], cos, sin)
        return q_lat, q_pe, jnp.concatenate([c_kv, k_pe], axis=-1)

    def output(self, o_lat: jax.Array) -> jax.Array:
        """Attention-weighted latents [b,c,h,r] -> hidden [b,c,d] through W_UV and o_proj."""
        o = jnp.einsum("bchr,hvr->bchv", o_lat.astype(self.v_b_proj.dtype), self.v_b_proj[...])
        return jnp.einsum("bchv,dhv->bcd", o, self.o_proj[...])

    def __call__(self, x: jax.Array, batch: AttnBatch, pages: jax.Array | None, impl: str):
        """x [b,c,d] normalized -> (attention output [b,c,d], this layer's page pool updated).

        With `pages` None the chunk attends causally to itself only (training, scoring): its own
        cache rows serve as its pages, through the reference (`_attend_within`). `impl` picks the
        attention kernel (kernels_pallas.ops)."""
        q_lat, q_pe, rows = self.project(x, batch.cos, batch.sin)
        scale = rope.softmax_scale(self.cfg)
        if pages is None:
            o_lat = _attend_within(q_lat, q_pe, rows, scale)
        else:
            pages = _write(pages, batch, rows, impl)
            o_lat = _paged_attention(q_lat, q_pe, pages, batch, scale, impl)
        return self.output(o_lat), pages


# Keys per block when a chunk attends to itself: up to this length one block (the [c, c] scores at
# once); longer sequences go block by block, so a 32K-token forward holds [c, 2048] scores, not [c, c].
SELF_ATTENTION_BLOCK = 2048


def _attend_within(q_lat, q_pe, rows, scale: float):
    """Causal attention of a chunk to its own cache rows [b,c,r+p], through the reference kernel with
    the rows cut into pages of SELF_ATTENTION_BLOCK keys. A static block count makes the loop a scan,
    so this stays differentiable (training)."""
    b, c = rows.shape[:2]
    block = min(c, SELF_ATTENTION_BLOCK)
    n = -(-c // block)
    kv_pages = jnp.pad(rows, ((0, 0), (0, n * block - c), (0, 0))).reshape(b * n, block, rows.shape[-1])
    table = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
    return paged_attention_ref(q_lat, q_pe, kv_pages, table, jnp.zeros((b,), jnp.int32), jnp.full((b,), c, jnp.int32),
                               scale=scale, block_pages=1, n_blocks=n)


def _write(pages, batch: AttnBatch, rows, impl: str):
    """This chunk's cache rows [b,c,r+p] into the pool (`ops.write_pages`)."""
    from kernels_pallas import ops

    args = (pages, batch.write_page.reshape(-1), batch.write_slot.reshape(-1), rows.reshape(-1, rows.shape[-1]))
    mesh = jax.sharding.get_abstract_mesh()
    if impl == "xla" or mesh.empty:
        return ops.write_pages(*args, page_order=batch.page_order, impl=impl)
    # A kernel writes on each device the tokens of its rows into its part of the pool (all of it
    # unless pages are split over `data`; tokens are row-major, so they split like the rows).
    data = "data" if rows.shape[0] % mesh.shape["data"] == 0 else None

    def local(pages, page, slot, rows):
        page = _local_pages(page, pages, data)  # padding -> this shard's reserved page
        return ops.write_pages(pages, page, slot, rows, page_order=batch.page_order, impl=impl)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(data),) * 4, out_specs=P(data), check_vma=False)(*args)


def _local_pages(page_ids, pages, data: str | None):
    """Global page numbers -> indices into this device's part of the pool, inside a shard_map where
    the pool is split over `data` (or not: `data` None). This device holds pages [first, first + n);
    numbers outside that range are clipped into it (padding rows and other shards' pages)."""
    first = jax.lax.axis_index("data") * pages.shape[0] if data else 0
    return jnp.clip(page_ids - first, 0, pages.shape[0] - 1)


def _paged_attention(q_lat, q_pe, pages, batch: AttnBatch, scale: float, impl: str):
    """`ops.paged_attention` over the cache; under a mesh, kernels run per device in a shard_map:
    rows (and their part of the pool) over `data`, heads over `tensor`."""
    from kernels_pallas import ops

    args = (q_lat, q_pe, pages, batch.page_table, batch.q_start, batch.kv_len)
    mesh = jax.sharding.get_abstract_mesh()
    kw = dict(scale=scale, impl=impl, page_order=batch.page_order)
    if impl == "xla" or mesh.empty:
        return ops.paged_attention(*args, **kw)
    data = "data" if q_lat.shape[0] % mesh.shape["data"] == 0 else None
    heads = "tensor" if q_lat.shape[2] % mesh.shape["tensor"] == 0 else None
    q_spec = P(data, None, heads, None)

    def local(q_lat, q_pe, pages, table, q_start, kv_len):
        table = _local_pages(table, pages, data)
        return ops.paged_attention(q_lat, q_pe, pages, table, q_start, kv_len, **kw)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, q_spec, P(data), P(data), P(data), P(data)),
                         out_specs=q_spec, check_vma=False)(*args)
