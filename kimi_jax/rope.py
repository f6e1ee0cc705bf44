"""Rotary position embedding with YaRN scaling, as K2 uses it (docs/k2-format.md §4.2-§4.4).

K2 rotates *interleaved* pairs (x[2i], x[2i+1]) of the 64 rope dims by angle pos·inv_freq[i]. The
reference implementation de-interleaves first and then rotates halves; the two layouts differ by a
fixed permutation applied to both q and k, so dot products (and hence the model) are identical and
we keep the checkpoint's interleaved layout throughout, the cached rope key included.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kimi_jax.config import Config


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN attention temperature: 1 without scaling, else 0.1·m·ln(s) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(cfg: Config) -> np.ndarray:
    """Per-pair rotation frequencies [qk_rope_head_dim // 2], float32, computed the way the stacks
    K2 was trained and is served with compute them: each step of the YaRN formula in float32
    arithmetic (docs/k2-format.md §4.3). Frequencies rounded from a float64 evaluation differ from
    those by one ulp in 7 of K2's 32 pairs, which at position 131,072 moves cos/sin by 0.008."""
    f32 = np.float32
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)  # float32 as in the reference (exact for 64)
    # base ** exponent, correctly rounded to float32 (a float64 power is accurate far below float32's
    # ulp). numpy's float32 power is not correctly rounded: 10 of K2's 32 powers come out one ulp off.
    base_pow = (np.float64(base) ** exponent.astype(np.float64)).astype(f32)
    extrapolated = f32(1) / base_pow
    y = cfg.rope_scaling
    if y is None:
        return extrapolated
    interpolated = f32(1) / (f32(y.factor) * base_pow)

    # Pairs that rotate fewer than beta_slow times over the original context get interpolated
    # (divided by factor); pairs rotating more than beta_fast times keep their frequency; a linear
    # ramp joins the two. For K2 (beta 1/1) that is a hard switch at pair 20 of 32. The bounds are
    # host floats (float64), as in the reference; the ramp and the blend are float32.
    def correction_dim(n_rot: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep = f32(1) - ramp  # the share of the original (extrapolated) frequency
    return interpolated * (f32(1) - keep) + extrapolated * keep


def cos_sin_scale(cfg: Config) -> float:
    """Multiplier on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim); 1.0 for K2."""
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


def softmax_scale(cfg: Config) -> float:
    """Attention logit scale over the full 192-dim q·k (docs/k2-format.md §4.4): 0.1446796 for K2 Thinking."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.rope_scaling
    if y is not None and y.mscale_all_dim:
        m = yarn_mscale(y.factor, y.mscale_all_dim)
        scale *= m * m
    return scale


def rope_angles(cfg: Config, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape positions.shape + [rope_dim // 2], float32."""
    # The angle is the float32 product of a float32 position and frequency, rounded as the reference
    # rounds it: past position 65,536 its float32 resolution (up to 0.016 rad) is part of what the
    # model was trained with, so a more exact angle would rotate differently from the reference.
    freq = jnp.asarray(inv_freq(cfg))
    ang = positions.astype(jnp.float32)[..., None] * freq
    m = cos_sin_scale(cfg)
    return jnp.cos(ang) * m, jnp.sin(ang) * m


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of the last dim. x: [..., P]; cos/sin broadcast to [..., P/2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
