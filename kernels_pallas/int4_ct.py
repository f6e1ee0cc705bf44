"""INT4 in compressed-tensors `pack-quantized` form, packing "ct" (docs/k2-format.md §3): the host
quantizer, packing and unpacking, and the pure-jnp dequantization every kernel is checked against.

A weight W of logical shape [..., N, K] (out, in) is stored as
  packed int32 [..., N, ceil(K/8)]: column 8k+j of a row is the nibble u = q + 8 in bits [4j, 4j+3]
                                    of word k (offset binary, first column least significant);
  scale        [..., N, K/group]:   W[r, c] = (u - 8) * scale[r, c // group], no zero point.
The GPU and CPU kernels read exactly these arrays, so a checkpoint loads by copying; the TPU
kernels read the same bits repacked (int4_packing.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NIBBLES_PER_WORD = 8
QMIN, QMAX = -8, 7


def _np_dtype(dtype) -> np.dtype:
    # jnp.bfloat16 is an ml_dtypes scalar type, which numpy accepts as a dtype.
    return np.dtype(jnp.dtype(dtype))


def quantize_int4(w: np.ndarray, group_size: int = 32, scale_dtype=jnp.bfloat16):
    """[..., N, K] float -> (packed int32 [..., N, ceil(K/8)], scale [..., N, K/group_size]).

    compressed-tensors' symmetric minmax observer: scale = absmax / 7.5 (its bit_range / 2 for int4),
    rounded to the scale dtype, zeros replaced by that dtype's eps; then q = clamp(round_half_even(
    W / scale), -8, 7) against the *stored* scale so that dequantizing reproduces the rounding. The
    arithmetic is float32 (compressed-tensors runs it in the weight's own dtype)."""
    w = np.asarray(w, np.float32)
    *lead, n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input size {k}")
    groups = w.reshape(*lead, n, k // group_size, group_size)
    absmax = np.max(np.abs(groups), axis=-1)
    sdt = _np_dtype(scale_dtype)
    scale = (absmax / np.float32((QMAX - QMIN) / 2)).astype(sdt)
    scale = np.where(scale == 0, np.asarray(jnp.finfo(sdt).eps, sdt), scale)
    q = np.clip(np.round(groups / scale.astype(np.float32)[..., None]), QMIN, QMAX)
    return pack_int4(q.reshape(*lead, n, k).astype(np.int8)), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., K] -> int32 [..., ceil(K/8)] (K zero-padded to a multiple of 8)."""
    q = np.asarray(q)
    if q.size and (q.min() < QMIN or q.max() > QMAX):
        raise ValueError("int4 values must lie in [-8, 7]")
    k = q.shape[-1]
    pad = -k % NIBBLES_PER_WORD
    # Padding is zero *words*, as compressed-tensors writes them (its pad happens after the +8).
    u = np.pad((q.astype(np.int32) + 8).astype(np.uint32), [(0, 0)] * (q.ndim - 1) + [(0, pad)])
    u = u.reshape(*q.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4
    return np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint32).view(np.int32)


def unpack_int4(packed, k: int):
    """int32 [..., K8] -> int8 [..., k] in [-8, 7] (numpy or jax input, jax output)."""
    p = jnp.asarray(packed, jnp.int32)
    shifts = jnp.arange(NIBBLES_PER_WORD, dtype=jnp.int32) * 4
    # The arithmetic shift smears the sign bit into high bits; the mask keeps only the nibble.
    u = (p[..., None] >> shifts) & 0xF
    u = u.reshape(*p.shape[:-1], p.shape[-1] * NIBBLES_PER_WORD)[..., :k]
    return (u - 8).astype(jnp.int8)


def dequantize_int4_ref(packed, scale, k: int, dtype=jnp.float32):
    """[..., N, K8] int32, [..., N, G] -> [..., N, k] in `dtype`.

    The product is taken in the scale's dtype, then cast, exactly like compressed-tensors'
    `_dequantize` (x_q.to(scale.dtype) * scale). For bf16 scales every (u - 8) * s is rounded once
    to bf16; kernels that multiply in float32 and round to bf16 give bit-identical weights."""
    scale = jnp.asarray(scale)
    q = unpack_int4(packed, k)
    n_groups = scale.shape[-1]
    if k % n_groups:
        raise ValueError(f"{n_groups} scale groups do not divide k={k}")
    lead = q.shape[:-1]
    w = q.astype(scale.dtype).reshape(*lead, n_groups, k // n_groups) * scale[..., None]
    return w.reshape(*lead, k).astype(dtype)

