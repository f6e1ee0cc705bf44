"""The Kimi K2 / DeepSeek-V3 decoder as a Flax NNX module (docs/k2-format.md §4.1).

    h = embed[tokens]
    for each layer: h += MLA(norm(h)); h += FFN(norm(h))   FFN = dense SwiGLU (first k) or MoE
    logits = lm_head(norm(h))

Each layer is its own module with its own parameter arrays, and the forward is a plain Python loop
over them. A scan over stacked layers would compile once for all 61, but every iteration would
slice its layer's weights out of the stacks, and XLA materializes such a slice as a copy before a
GEMM or a custom kernel can read it: on a GPU that copy of the attention weights and shared expert
cost as much as reading them. Unrolled, every weight is read where it lies; the price is compile
time that grows with the layer count (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax import rope
from kimi_jax.cache import PagedCache
from kimi_jax.config import Config
from kimi_jax.layers import MLP, linear, ones, param, rms_norm
from kimi_jax.mla import MLA, AttnBatch
from kimi_jax.moe import MoE


def embed_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens]. XLA:CPU gathers bf16 through a float32 convert of the table, and inside the
    decode loop it hoists that convert out of the loop, keeping a float32 copy of the whole
    vocabulary matrix alive. Passing the table through one barrier with this step's tokens makes it
    loop-variant, so the convert stays fused into the gather. Free on every backend."""
    table, tokens = jax.lax.optimization_barrier((table, tokens))
    return jnp.take(table, tokens, axis=0)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, moe: bool, dtype, rngs: nnx.Rngs, expert_packing: str = "ct"):
        d = cfg.hidden_size
        self.cfg = cfg
        self.input_norm = ones((d,), ("embed",), dtype)
        self.attn = MLA(cfg, dtype, rngs)
        self.post_attention_norm = ones((d,), ("embed",), dtype)
        self.mlp = MoE(cfg, dtype, rngs, expert_packing) if moe else MLP(d, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x, batch: AttnBatch, pages, impl: str):
        """x [b,c,d] -> (x, this layer's page pool). `pages` None: attend within the chunk only."""
        eps = self.cfg.rms_norm_eps
        with jax.named_scope("attention"):
            a, pages = self.attn(rms_norm(x, self.input_norm[...], eps), batch, pages, impl)
        x = x + a
        h = rms_norm(x, self.post_attention_norm[...], eps)
        if isinstance(self.mlp, MoE):
            with jax.named_scope("moe"):
                return x + self.mlp(h, impl, batch.valid), pages
        with jax.named_scope("mlp"):
            return x + self.mlp(h), pages


class KimiK2(nnx.Module):
    """The whole decoder: `embed`, `layers` (a `DecoderLayer` each: `attn` is MLA, `mlp` a dense
    MLP or a `MoE`), `norm` and `lm_head`, with weights in the checkpoint's [out, in] orientation.
    `KimiK2(cfg)` draws random weights; `kimi_jax.load(dir)` builds one from a checkpoint."""

    def __init__(self, cfg: Config, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 expert_packing: str = "ct"):
        """Random weights (see kimi_jax.checkpoint for real ones). `expert_packing`: how INT4 routed
        experts are stored in device memory ("ct", the checkpoint's, or "tpu";
        kernels_pallas/int4_packing.py)."""
        rngs = rngs if rngs is not None else nnx.Rngs(params=0)
        d, v = cfg.hidden_size, cfg.vocab_size
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = param(rngs, (v, d), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i >= cfg.first_k_dense_replace, dtype, rngs, expert_packing)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = ones((d,), ("embed",), dtype)
        self.lm_head = param(rngs, (v, d), ("vocab", "embed"), dtype)

    # ---- forward ------------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, batch: AttnBatch, pages: tuple | None, *,
                 impl: str) -> tuple[jax.Array, tuple | None]:
        """Run tokens [b,c] through every layer. `batch` says where each token sits (cache.py);
        `pages` holds each layer's page pool (written in place and returned), or None to attend
        within the chunk only; `impl` names the kernels (kernels_pallas.ops: "xla", "pallas_gpu",
        ...). Returns the final hidden states [b,c,d] before the last norm."""
        x = embed_rows(self.embed[...], tokens)
        new_pages = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, p = layer(x, batch, None if pages is None else pages[i], impl)
            new_pages.append(p)
        return x, (None if pages is None else tuple(new_pages))

    def forward_cached(self, tokens: jax.Array, batch: AttnBatch, cache: PagedCache, *,
                       impl: str) -> tuple[jax.Array, PagedCache]:
        """A chunk through the cache: hidden states [b,c,d] and the cache with its pools updated
        (lengths and page table are the caller's to advance)."""
        x, pages = self(tokens, batch, cache.pages, impl=impl)
        return x, dataclasses.replace(cache, pages=pages)

    def forward_no_cache(self, tokens: jax.Array, *, impl: str | None = None) -> jax.Array:
        """Causal forward over whole sequences [b,t] without a cache (training, scoring): float32
        logits [b,t,v]. Differentiable. `impl` defaults to the best kernels for the default backend."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope.rope_angles(self.cfg, positions)
        zeros = jnp.zeros((b,), jnp.int32)
        batch = AttnBatch(cos=cos, sin=sin, page_table=zeros[:, None], q_start=zeros, kv_len=zeros + t,
                          write_page=positions * 0, write_slot=positions)
        x, _ = self(tokens, batch, None, impl=impl or default_impl())
        return self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and lm_head, float32 logits."""
        with jax.named_scope("lm_head"):
            h = rms_norm(hidden, self.norm[...], self.cfg.rms_norm_eps)
            return linear(h, self.lm_head[...], jnp.float32)


def default_impl() -> str:
    """The kernels of JAX's default backend (kernels_pallas/backends.py), for programs that run
    on the default device without saying which kernels."""
    from kernels_pallas.backends import backend_for

    return backend_for(jax.default_backend()).impl


def expert_packing_for(cfg: Config, backend) -> str:
    """How routed experts are stored on devices of `backend` (a kernels_pallas.backends.Backend):
    INT4 experts in the packing its kernels read, dense (bf16) experts always as the checkpoint
    holds them ("ct": dense experts have no packing)."""
    return "ct" if cfg.quantization is None else backend.expert_packing


class _OneKey:
    """Stands in for nnx.Rngs when only shapes are wanted. Each draw from a real Rngs advances its
    counter, a traced variable update for which flax asks the tracer for its sharding; building
    that error message scans every operation traced so far, which made tracing the full 61-layer
    K2 quadratic (93 s on a 2-core machine, before the loader could read a byte)."""

    @staticmethod
    def params():
        return jax.random.key(0)


def abstract_model(cfg: Config, dtype=jnp.bfloat16, expert_packing: str = "ct"):
    """(graphdef, state) of a `KimiK2` with shapes and dtypes only: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: KimiK2(cfg, dtype=dtype, rngs=_OneKey(), expert_packing=expert_packing)))
