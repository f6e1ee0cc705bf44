"""Multi-head latent attention (spec §4.2, §4.5), always in the weight-absorbed form.

Per token the layer keeps only c_kv (the kv_a_layernorm'ed latent, r = kv_lora_rank) and the
rotated shared rope key k_pe (p = qk_rope_head_dim). Instead of expanding per-head keys and values
from the latent over the whole context (kv_b_proj: r -> h·(n+v)), we fold kv_b_proj's two halves
into the query and the output:

    score_h(s) = (q_nope_h · W_UK[h]) · c_kv(s) + q_pe_h · k_pe(s)         (W_UK: [h, n, r])
    out_h      = W_UV[h] · Σ_s p_h(s) c_kv(s)                               (W_UV: [h, v, r])

which is attention with one shared key/value head of width r + p. Prefill chunks and decode steps
use the same code; only the number of query tokens differs.

Keys are visited in blocks of `block` slots with an online softmax, and only the blocks between the
first real token of any row and the last query are read — the trip count is a traced value, so a
decode step's cost follows the context actually used, not the buffer size, without recompiling.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import rope
from kimi_jax.config import Config
from kimi_jax.layers import ones, param, rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttnContext:
    """What every layer of one forward call shares: rope angles, the row layout and the key range."""

    cos: jax.Array  # [b, c, p/2]
    sin: jax.Array  # [b, c, p/2]
    starts: jax.Array  # [b] first real slot of each row
    q_slots: jax.Array  # [c] cache slot of each query token (same for every row)
    write_at: jax.Array  # [] slot where this chunk's keys are written
    block_lo: jax.Array | int  # first key block to visit
    block_hi: jax.Array | int  # one past the last key block to visit


KeyReader = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # block index -> (c_kv, k_pe) blocks


class MLA(nnx.Module):
    def __init__(self, cfg: Config, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        n, p, v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = param(rngs, (d, h, n + p), ("embed", "heads", "head_dim"), dtype)
        else:
            q = cfg.q_lora_rank
            self.q_a_proj = param(rngs, (d, q), ("embed", "q_lora"), dtype)
            self.q_a_norm = ones((q,), ("q_lora",), dtype)
            self.q_b_proj = param(rngs, (q, h, n + p), ("q_lora", "heads", "head_dim"), dtype)
        self.kv_a_proj = param(rngs, (d, r + p), ("embed", "kv_lora"), dtype)
        self.kv_a_norm = ones((r,), ("kv_lora",), dtype)
        # kv_b_proj split at load time into its key and value halves, so neither step slices it.
        self.k_b_proj = param(rngs, (h, n, r), ("heads", "head_dim", "kv_lora"), dtype)
        self.v_b_proj = param(rngs, (h, v, r), ("heads", "head_dim", "kv_lora"), dtype)
        self.o_proj = param(rngs, (h, v, d), ("heads", "head_dim", "embed"), dtype)

    def project(self, x: jax.Array, ctx: AttnContext):
        """x [b,c,d] -> absorbed query (q_lat [b,c,h,r], q_pe [b,c,h,p]) and this chunk's cache
        entries (c_kv [b,c,r], k_pe [b,c,p])."""
        cfg = self.cfg
        n, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = jnp.einsum("bcd,dhk->bchk", x, self.q_proj[...])
        else:
            cq = rms_norm(jnp.einsum("bcd,dq->bcq", x, self.q_a_proj[...]), self.q_a_norm[...], cfg.latent_norm_eps)
            q = jnp.einsum("bcq,qhk->bchk", cq, self.q_b_proj[...])
        q_nope, q_pe = q[..., :n], q[..., n:]
        q_pe = rope.apply_rope(q_pe, ctx.cos[:, :, None, :], ctx.sin[:, :, None, :])
        q_lat = jnp.einsum("bchn,hnr->bchr", q_nope, self.k_b_proj[...])

        kv = jnp.einsum("bcd,dk->bck", x, self.kv_a_proj[...])
        c_kv = rms_norm(kv[..., :r], self.kv_a_norm[...], cfg.latent_norm_eps)
        k_pe = rope.apply_rope(kv[..., r:], ctx.cos, ctx.sin)
        return q_lat, q_pe, c_kv, k_pe

    def output(self, o_lat: jax.Array) -> jax.Array:
        """Attention-weighted latents [b,c,h,r] -> hidden [b,c,d] through W_UV and o_proj."""
        o = jnp.einsum("bchr,hvr->bchv", o_lat.astype(self.v_b_proj.dtype), self.v_b_proj[...])
        return jnp.einsum("bchv,hvd->bcd", o, self.o_proj[...])


def attend(q_lat, q_pe, read_block: KeyReader, ctx: AttnContext, *, scale: float, block: int) -> jax.Array:
    """Causal absorbed attention of the chunk's queries over key blocks [block_lo, block_hi).

    Returns the attention-weighted latents o_lat [b,c,h,r] in float32. A key slot s is visible to
    query slot t of row b when starts[b] <= s <= t. Rows that see no key (padding queries) get 0.
    """
    b, c, h, r = q_lat.shape
    dt = q_lat.dtype

    def body(j, carry):
        m, l, acc = carry
        kv, kp = read_block(j)  # [b, block, r], [b, block, p]
        s = jnp.einsum("bchr,bsr->bchs", q_lat, kv, preferred_element_type=jnp.float32)
        s += jnp.einsum("bchp,bsp->bchs", q_pe, kp, preferred_element_type=jnp.float32)
        s *= scale
        slot = j * block + jnp.arange(block)
        visible = (slot[None, None, :] >= ctx.starts[:, None, None]) & (slot[None, None, :] <= ctx.q_slots[None, :, None])
        s = jnp.where(visible[:, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: keep exp() finite
        pr = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + pr.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bchs,bsr->bchr", pr.astype(dt), kv, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (
        jnp.full((b, c, h), -jnp.inf, jnp.float32),
        jnp.zeros((b, c, h), jnp.float32),
        jnp.zeros((b, c, h, r), jnp.float32),
    )
    # With Python-int bounds this lowers to a scan (differentiable, used in training); with traced
    # bounds to a while loop whose trip count follows the context in use.
    _, l, acc = jax.lax.fori_loop(ctx.block_lo, ctx.block_hi, body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]
