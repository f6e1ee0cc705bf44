"""How routed-expert INT4 words and scales are packed in device memory: one packing per backend.

The checkpoint is read in packing "ct" and repacked once, at load or convert time, into the packing
the backend's kernels read (kernels_pallas/backends.py says which). Every packing holds the same
nibbles and the same scales, only in another order, so it costs no bits (4.5 per weight for group
32 with bf16 scales) and dequantizes bit for bit to the same weights. For W of logical shape [N, K]
(out, in) and group size g (G = K/g groups):

  "ct"   compressed-tensors pack-quantized (int4_ct.py), as on disk and as the GPU/CPU kernels read it:
           packed [..., N, K/8]  nibble j of word kk of row n holds u = q + 8 of W[n, 8kk + j]
           scale  [..., N, G]
  "tpu"  lane-dense for XLA:TPU and the Mosaic kernels (experts_tpu.py):
           packed [..., K/8, N]  N minor; see "tiles" below
           scale  [..., G, N]    row gi = the scales of group gi

Why N minor: N is a multiple of 128 for every K2 shape and sharding (2048 or 7168, 256 per device
under tensor=8), and XLA:TPU lays out arrays whose minor dimension is not a multiple of 128 (the
"ct" scales: K/32 = 224 or 64 columns; down_proj's K/8 = 32 words under tensor=8) in a tiling the
Mosaic kernels cannot read, so it would copy every layer's expert slab on every call.

Tiles: K splits into tiles of 8 groups (8g values, g word rows). In tile T, word row g*T + rho holds
at nibble position c + 4h (c < 4, h < 2) the weight of input column

    k = 8g*T + 2g*c + 2*rho + h.

This is what one shift, one mask and one OR make of a word on the TPU: for each c, the two nibbles
c and c + 4 (bits 4c and 16 + 4c) land in the low bits of the word's two 16-bit halves; OR-ing in
the bfloat16 exponent of 128 gives two bfloat16s 128 + u, exactly, and the halves of word row rho
are rows 2*rho + h of a bfloat16 block, so chain c yields rows [2g*c, 2g*(c+1)) of the tile in
column order. Nibbles stay offset binary (u = q + 8), as in the checkpoint.

Everything here is pure jnp (runs on device, under jit, on numpy or jax arrays) and handles any
leading dimensions (experts, layers) and one matrix alike.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.int4_ct import NIBBLES_PER_WORD, dequantize_int4_ref

__all__ = ["PACKINGS", "check_packing", "to_packing", "from_packing", "features", "scale_groups", "dequantize",
           "TILE_GROUPS"]

PACKINGS = ("ct", "tpu")
TILE_GROUPS = 8  # groups per "tpu" tile: one float32 vreg of scales (8 sublanes)
_CHAINS, _HALVES = 4, 2  # nibble position c + 4h


def check_packing(packing: str):
    if packing not in PACKINGS:
        raise ValueError(f"unknown INT4 packing {packing!r}; expected one of {PACKINGS}")


def _tpu_geometry(k: int, n_groups: int) -> int:
    """Group size g of a "tpu" packing of K = k inputs in n_groups groups, or ValueError."""
    group = k // n_groups if n_groups else 0
    if not group or k % n_groups or group % NIBBLES_PER_WORD or n_groups % TILE_GROUPS:
        raise ValueError(f"packing 'tpu' needs a group size that is a multiple of 8 and a number of groups "
                         f"that is a multiple of {TILE_GROUPS} (K a multiple of {TILE_GROUPS} groups); got "
                         f"K={k} in {n_groups} groups")
    return group


def _nibbles(words):
    """int32 [..., W] -> uint8 [..., W, 8]: nibble j of each word (offset binary, as stored)."""
    shifts = jnp.arange(NIBBLES_PER_WORD, dtype=jnp.int32) * 4
    return ((words[..., None] >> shifts) & 0xF).astype(jnp.uint8)


def _words(nibbles):
    """uint8 [..., 8] -> int32 [...]: nibble j into bits [4j, 4j + 3]."""
    shifts = jnp.arange(NIBBLES_PER_WORD, dtype=jnp.uint32) * 4
    return jnp.bitwise_or.reduce(nibbles.astype(jnp.uint32) << shifts, axis=-1).view(jnp.int32)


def to_packing(packed, scale, packing: str):
    """ct (packed [..., N, K/8], scale [..., N, G]) -> the same nibbles and scales in `packing`."""
    check_packing(packing)
    packed, scale = jnp.asarray(packed), jnp.asarray(scale)
    if packing == "ct":
        return packed, scale
    if packed.shape[:-1] != scale.shape[:-1]:
        raise ValueError(f"packed {tuple(packed.shape)} and scale {tuple(scale.shape)} disagree on their "
                         "leading (experts, out) dimensions")
    *lead, n, k8 = packed.shape
    n_groups = scale.shape[-1]
    group = _tpu_geometry(k8 * NIBBLES_PER_WORD, n_groups)
    nib = _nibbles(packed).reshape(*lead, n, n_groups // TILE_GROUPS, _CHAINS, group, _HALVES)
    # [..., n, T, c, rho, h] -> [..., T, rho, n, h, c]: word row (T, rho), nibble position 4h + c.
    nd = nib.ndim
    nib = jnp.transpose(nib, (*range(len(lead)), nd - 4, nd - 2, nd - 5, nd - 1, nd - 3))
    words = _words(nib.reshape(*lead, k8, n, NIBBLES_PER_WORD))
    return words, jnp.swapaxes(scale, -1, -2)


def from_packing(packed, scale, packing: str):
    """The inverse of `to_packing`: arrays in `packing` -> ct (for export and tests)."""
    check_packing(packing)
    packed, scale = jnp.asarray(packed), jnp.asarray(scale)
    if packing == "ct":
        return packed, scale
    *lead, k8, n = packed.shape
    n_groups = scale.shape[-2]
    if scale.shape[-1] != n or tuple(scale.shape[:-2]) != tuple(lead):
        raise ValueError(f"not a 'tpu' packing pair: packed {tuple(packed.shape)}, scale {tuple(scale.shape)}")
    group = _tpu_geometry(k8 * NIBBLES_PER_WORD, n_groups)
    nib = _nibbles(packed).reshape(*lead, n_groups // TILE_GROUPS, group, n, _HALVES, _CHAINS)
    # [..., T, rho, n, h, c] -> [..., n, T, c, rho, h]: column 8g*T + 2g*c + 2*rho + h.
    nd = nib.ndim
    nib = jnp.transpose(nib, (*range(len(lead)), nd - 3, nd - 5, nd - 1, nd - 4, nd - 2))
    words = _words(nib.reshape(*lead, n, k8, NIBBLES_PER_WORD))
    return words, jnp.swapaxes(scale, -1, -2)


def features(packed, scale, packing: str) -> tuple[int, int]:
    """(out N, in K) of the weight matrices held in `packing`. K counts packed columns, so for ct
    arrays whose K was padded to a multiple of 8 it is the padded size."""
    check_packing(packing)
    if packing == "ct":
        return packed.shape[-2], packed.shape[-1] * NIBBLES_PER_WORD
    return packed.shape[-1], packed.shape[-2] * NIBBLES_PER_WORD


def scale_groups(scale, packing: str) -> int:
    """Scale groups per row (K / group size) of scales held in `packing`."""
    check_packing(packing)
    return scale.shape[-1] if packing == "ct" else scale.shape[-2]


def dequantize(packed, scale, packing: str, dtype=jnp.float32, k: int | None = None):
    """Weights [..., N, K] (out, in) in `dtype`, bit-identical for every packing to compressed-tensors'
    dequant of the checkpoint arrays. `k`: the logical input size (default: all packed columns)."""
    packed, scale = from_packing(packed, scale, packing)
    return dequantize_int4_ref(packed, scale, k or packed.shape[-1] * NIBBLES_PER_WORD, dtype)
