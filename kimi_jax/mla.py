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

    def __call__(self, x: jax.Array, batch: AttnBatch, pages: jax.Array | None):
        """x [b,c,d] normalized -> (attention output [b,c,d], this layer's page pool updated).

        With `pages` None the chunk attends causally to itself only (training, scoring): its own
        cache rows serve as one page per row."""
        from kernels_pallas import ops

        q_lat, q_pe, rows = self.project(x, batch.cos, batch.sin)
        scale = rope.softmax_scale(self.cfg)
        if pages is None:
            b, c = x.shape[:2]
            o_lat = ops.paged_attention(q_lat, q_pe, rows, jnp.arange(b, dtype=jnp.int32)[:, None],
                                        jnp.zeros((b,), jnp.int32), jnp.full((b,), c, jnp.int32), scale=scale,
                                        block_pages=1, n_blocks=1)
        else:
            pages = pages.at[batch.write_page, batch.write_slot].set(rows.astype(pages.dtype))
            o_lat = ops.paged_attention(q_lat, q_pe, pages, batch.page_table, batch.q_start, batch.kv_len,
                                        scale=scale)
        return self.output(o_lat), pages
