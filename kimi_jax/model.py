"""The Kimi K2 / DeepSeek-V3 decoder as a Flax NNX module (spec §4.1).

    h = embed[tokens]
    for each layer: h += MLA(norm(h)); h += FFN(norm(h))   FFN = dense SwiGLU (first k) or MoE
    logits = lm_head(norm(h))

The layers live in two stacks — the dense ones and the MoE ones — whose parameters carry a leading
layer axis and run under `jax.lax.scan`, so compile time does not grow with K2's 61 layers. The
latent cache of all layers travels through the scan as carry and each layer writes its slice in
place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import rope
from kimi_jax.cache import LatentCache
from kimi_jax.config import Config
from kimi_jax.layers import MLP, ones, param, rms_norm
from kimi_jax.mla import MLA, AttnContext, attend
from kimi_jax.moe import MoE
from kimi_jax.quant import is_routed_expert

DEFAULT_KV_BLOCK = 256  # key slots per attention block; caches are allocated in whole blocks


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, moe: bool, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.input_norm = ones((d,), ("embed",), dtype)
        self.attn = MLA(cfg, dtype, rngs)
        self.post_attention_norm = ones((d,), ("embed",), dtype)
        self.mlp = MoE(cfg, dtype, rngs) if moe else MLP(d, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x, ctx: AttnContext, kv, *, block: int, stack_index=None):
        """x [b,c,d]. `kv` is (c_kv_all, k_pe_all, layer_index) to attend through the cache, or
        None to attend within the chunk only (training). `stack_index`: this layer's index in its
        stack when the routed experts hold the whole stack (see KimiK2._run)."""
        cfg = self.cfg
        q_lat, q_pe, c_kv, k_pe = self.attn.project(rms_norm(x, self.input_norm[...], cfg.rms_norm_eps), ctx)
        if kv is None:
            def read(j):
                return (jax.lax.dynamic_slice_in_dim(c_kv, j * block, block, axis=1),
                        jax.lax.dynamic_slice_in_dim(k_pe, j * block, block, axis=1))
        else:
            c_all, p_all, i = kv
            c_all = jax.lax.dynamic_update_slice(c_all, c_kv[None].astype(c_all.dtype), (i, 0, ctx.write_at, 0))
            p_all = jax.lax.dynamic_update_slice(p_all, k_pe[None].astype(p_all.dtype), (i, 0, ctx.write_at, 0))
            b = x.shape[0]

            def read(j):
                return (jax.lax.dynamic_slice(c_all, (i, 0, j * block, 0), (1, b, block, c_all.shape[-1]))[0],
                        jax.lax.dynamic_slice(p_all, (i, 0, j * block, 0), (1, b, block, p_all.shape[-1]))[0])

            kv = (c_all, p_all)
        o_lat = attend(q_lat, q_pe, read, ctx, scale=rope.softmax_scale(cfg), block=block)
        x = x + self.attn.output(o_lat)
        h = rms_norm(x, self.post_attention_norm[...], cfg.rms_norm_eps)
        x = x + (self.mlp(h, stack_index) if isinstance(self.mlp, MoE) else self.mlp(h))
        return x, kv


def _stack(n: int, make, rngs: nnx.Rngs):
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(r):
        return make(r)

    return build(rngs)


class KimiK2(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(params=0)
        d, v = cfg.hidden_size, cfg.vocab_size
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = param(rngs, (v, d), ("vocab", "embed"), dtype)
        self.dense_layers = _stack(cfg.n_dense_layers, lambda r: DecoderLayer(cfg, False, dtype, r), rngs)
        self.moe_layers = _stack(cfg.n_moe_layers, lambda r: DecoderLayer(cfg, True, dtype, r), rngs)
        self.norm = ones((d,), ("embed",), dtype)
        self.lm_head = param(rngs, (d, v), ("embed", "vocab"), dtype)

    # ---- forward ------------------------------------------------------------------------------
    def _stacks(self):
        """(stack, index of its first layer) for the stacks that exist, in layer order."""
        out = []
        if self.dense_layers is not None:
            out.append((self.dense_layers, 0))
        if self.moe_layers is not None:
            out.append((self.moe_layers, self.cfg.n_dense_layers))
        return out

    def _run(self, x, ctx, kv_all, block):
        from kernels_pallas import ops

        # The scan slices every parameter per layer except, where the expert kernels index layer
        # stacks, the routed experts: those stay whole and each layer's MoE indexes the stack
        # itself, so the kernels read only the chosen experts' rows instead of a per-layer copy of
        # all of them (moe.expert_ffn, ops.indexes_layer_stacks).
        whole = is_routed_expert if ops.indexes_layer_stacks() else nnx.Nothing
        for stack, first in self._stacks():
            graphdef, experts, state = nnx.split(stack, whole, ...)
            n = jax.tree.leaves(state)[0].shape[0]
            stacked = bool(jax.tree.leaves(experts))

            def body(carry, xs, graphdef=graphdef, experts=experts, first=first, stacked=stacked):
                x, kv = carry
                layer_state, j = xs
                layer = nnx.merge(graphdef, experts, layer_state)
                x, kv = layer(x, ctx, None if kv is None else (*kv, first + j), block=block,
                              stack_index=j if stacked else None)
                return (x, kv), None

            (x, kv_all), _ = jax.lax.scan(body, (x, kv_all), (state, jnp.arange(n)))
        return x, kv_all

    def __call__(self, tokens: jax.Array, cache: LatentCache, n_valid: jax.Array | int | None = None,
                 *, block: int = DEFAULT_KV_BLOCK) -> tuple[jax.Array, LatentCache]:
        """Run a chunk of tokens [b,c] through the model, writing their latents at `cache.length`.

        Returns the final hidden states [b,c,d] (before the last norm) and the cache advanced by
        `n_valid` tokens (default: all c). Positions past `n_valid` are padding: they are computed
        and written past the new length, where nothing real ever sees them."""
        c = tokens.shape[1]
        n_valid = c if n_valid is None else n_valid
        w = cache.length
        q_slots = w + jnp.arange(c, dtype=jnp.int32)
        positions = jnp.maximum(q_slots[None, :] - cache.starts[:, None], 0)
        cos, sin = rope.rope_angles(self.cfg, positions)
        n_blocks = cache.slots // block
        ctx = AttnContext(
            cos=cos, sin=sin, starts=cache.starts, q_slots=q_slots, write_at=w,
            block_lo=jnp.min(cache.starts) // block,
            block_hi=jnp.minimum((w + c + block - 1) // block, n_blocks),
        )
        x = jnp.take(self.embed[...], tokens, axis=0)
        x, (c_kv, k_pe) = self._run(x, ctx, (cache.c_kv, cache.k_pe), block)
        return x, LatentCache(c_kv=c_kv, k_pe=k_pe, starts=cache.starts, length=w + n_valid)

    def forward_no_cache(self, tokens: jax.Array, starts: jax.Array | None = None) -> jax.Array:
        """Causal forward over whole sequences [b,t] without a cache (training, scoring).

        `starts[b]` marks left padding as in the cache layout. Differentiable."""
        b, t = tokens.shape
        starts = jnp.zeros((b,), jnp.int32) if starts is None else starts
        q_slots = jnp.arange(t, dtype=jnp.int32)
        cos, sin = rope.rope_angles(self.cfg, jnp.maximum(q_slots[None, :] - starts[:, None], 0))
        ctx = AttnContext(cos=cos, sin=sin, starts=starts, q_slots=q_slots, write_at=jnp.int32(0),
                          block_lo=0, block_hi=1)
        x = jnp.take(self.embed[...], tokens, axis=0)
        x, _ = self._run(x, ctx, None, t)
        return self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and lm_head, float32 logits."""
        h = rms_norm(hidden, self.norm[...], self.cfg.rms_norm_eps)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)


def abstract_model(cfg: Config, dtype=jnp.bfloat16):
    """(graphdef, state) of a `KimiK2` with shapes and dtypes only: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: KimiK2(cfg, dtype=dtype, rngs=nnx.Rngs(params=0))))
