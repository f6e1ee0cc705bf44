"""Small building blocks shared by the attention, MoE and model files.

Every weight is an `nnx.Param` carrying `axes`: one logical axis name per dimension. The sharding
rules (kimi_jax/sharding.py) map those names to mesh axes; nothing else in the model mentions a
mesh. Matrices are stored as the checkpoint stores them, [out, in] (PyTorch Linear), with heads
split out as their own axis where a projection has them: loading is then a copy, and the einsums
below contract whichever axis is the input.

Einsum letters used across the model files:
  b rows (sequences), c query tokens (chunk), s key tokens, d hidden, h heads, n nope head dim,
  p rope dim, r kv latent, q q latent, v value head dim, f mlp hidden, e experts, t flattened tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # DeepSeek-V3's initializer_range; only used for random (test/training) models


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], dtype, *, std: float = INIT_STD) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


def ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalize in float32, cast back, then scale — the reference's order of operations."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., in] times a weight stored [out, in] -> [..., out] in `out_dtype` (default x's),
    accumulated in float32.

    Written so that XLA:CPU multiplies the stored bf16 weight in place. It converts the whole weight
    to float32 first (a temporary as large as the weight, twice its bytes) for a dot whose result is
    bf16, and for a matrix-vector product, which it rewrites as an elementwise multiply and a sum:
    K2's lm_head alone made a 4.7 GB temporary in every CPU decode step. So the dot always asks for
    a float32 result (the rounding GPUs and TPUs apply anyway), and a single row is multiplied as
    two (the second a zero row, dropped): a memory-bound product costs the same for one or two."""
    rows = x.reshape(-1, x.shape[-1])
    single = rows.shape[0] == 1
    if single:
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    y = jnp.einsum("td,od->to", rows, w, preferred_element_type=jnp.float32)
    y = y[:1] if single else y
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(out_dtype or x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The dense layers and the shared expert."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.up_proj = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.down_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = linear(x, self.gate_proj[...])
        u = linear(x, self.up_proj[...])
        return linear(jax.nn.silu(g) * u, self.down_proj[...])
