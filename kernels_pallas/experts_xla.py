"""Routed-expert matmuls over rows already sorted by expert, backend "xla": the references every
kernel is checked against and the CPU production path, plus the row tiles the GPU kernels share.

  grouped_int4_swiglu_ref(x [M, K], gate (packed [E, I, K/8], scale [E, I, K/g]), up (same), sizes [E])
      -> silu(x @ Wg[e]^T) * (x @ Wu[e]^T) [M, I], row r using the expert e whose run holds r
  grouped_int4_matmul_ref(h [M, I], packed [E, D, I/8], scale [E, D, I/g], sizes [E]) -> [M, D]
  grouped_matmul_ref(x [M, K], w [E, K, N] bf16, sizes [E]) -> [M, N]      (dense experts)

Rows past sum(sizes) are padding and come back as zeros. The INT4 references loop over
group-aligned row tiles (`expert_row_tiles`, the same tiles the GPU kernels run), dequantizing one
expert at a time: they are the CPU production path, so they must never hold all experts
dequantized (K2: 2 TB in bf16). The dense reference gathers one expert per block of rows instead,
because XLA:CPU lowers `ragged_dot` to a product of every row with every expert.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.int4_packing import dequantize, features

__all__ = ["grouped_int4_swiglu_ref", "grouped_int4_matmul_ref", "grouped_matmul_ref", "expert_row_tiles",
           "rows_per_expert", "mask_padding_rows", "silu_mul", "DOT_NT"]

DOT_NT = (((1,), (1,)), ((), ()))  # contract the last dims: x [m, k] . w [n, k] -> [m, n]


def silu_mul(g, u):
    return g / (1.0 + jnp.exp(-g)) * u


def rows_per_expert(m: int, n_exp: int) -> float:
    """Expected rows per expert that has any, for m rows routed uniformly over n_exp experts.

    Static, so block sizes can depend on it: 8 decode rows over 384 experts touch ~8 experts
    (1 row each), 256 rows touch ~188 (1.4 each), a 4096-row prefill touches all of them."""
    if m == 0:
        return 1.0
    touched = n_exp * -math.expm1(-m / n_exp)
    return m / max(1.0, touched)


def expert_row_tiles(group_sizes, m: int, bm: int):
    """Row tiles that each lie inside one expert's run -> (expert, first row, end row) int32 [T].

    Each nonempty group g gets ceil(size_g / bm) tiles; sum_g ceil(s_g/bm) <= m // bm + #nonempty,
    which bounds the static tile count T. Unused tiles have first row == end row and do nothing.
    Computed on device (tiny arrays), so group sizes can be traced values."""
    n_exp = group_sizes.shape[0]
    n_tiles = m // bm + min(n_exp, m)
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(gs), m)
    starts = ends - jnp.minimum(gs, ends)
    per_group = (ends - starts + bm - 1) // bm
    tile_end = jnp.cumsum(per_group)
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(tile_end, t, side="right", method="compare_all"), n_exp - 1)
    r0 = starts[e] + (t - (tile_end[e] - per_group[e])) * bm
    r1 = jnp.minimum(r0 + bm, ends[e])
    valid = t < tile_end[-1]
    return e.astype(jnp.int32), jnp.where(valid, r0, 0), jnp.where(valid, r1, 0)


def mask_padding_rows(out, group_sizes):
    """Zero the rows past sum(group_sizes): kernels leave them unwritten (garbage, maybe NaN)."""
    rows = lax.broadcasted_iota(jnp.int32, (out.shape[0], 1), 0)
    return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


# ---------------------------------------------------------------------------------------------
# INT4 references


def _grouped_int4_ref(x, weights, group_sizes, swiglu, packing="ct"):
    weights = [(jnp.asarray(p), jnp.asarray(s)) for p, s in weights]
    m, k = x.shape
    n = features(*weights[0], packing)[0]
    bm = int(min(256, max(8, pl.next_power_of_2(int(-(-m // max(1, min(group_sizes.shape[0], m))))))))
    experts, first, end = expert_row_tiles(group_sizes, m, bm)
    x_pad = jnp.pad(x, ((0, bm), (0, 0)))  # a tile may run past row m; keep its window in bounds

    def tile(t, out):
        e, r0, r1 = experts[t], first[t], end[t]

        def compute(out):
            xs = lax.dynamic_slice_in_dim(x_pad, r0, bm)
            ys = [lax.dot_general(xs, dequantize(p[e], s[e], packing, x.dtype, k), DOT_NT,
                                  preferred_element_type=jnp.float32) for p, s in weights]
            y = (silu_mul(*ys) if swiglu else ys[0]).astype(out.dtype)
            mine = r0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < r1
            old = lax.dynamic_slice_in_dim(out, r0, bm)
            return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), r0, 0)

        return lax.cond(r0 < r1, compute, lambda o: o, out)

    out = lax.fori_loop(0, experts.shape[0], tile, jnp.zeros((m + bm, n), x.dtype))
    return out[:m]


def grouped_int4_swiglu_ref(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, packing="ct"):
    """silu(x @ Wg[e]^T) * (x @ Wu[e]^T) per row's expert e; [M, K] -> [M, I] in x.dtype. `packing`:
    how the words and scales are stored (int4_packing.py; "tpu": [E, K/8, I] and [E, K/g, I])."""
    return _grouped_int4_ref(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                             packing=packing)


def grouped_int4_matmul_ref(h, packed, scale, group_sizes, *, packing="ct"):
    """h @ W[e]^T per row's expert e (the down projection); [M, I] -> [M, D] in h.dtype."""
    return _grouped_int4_ref(h, [(packed, scale)], group_sizes, swiglu=False, packing=packing)


# ---------------------------------------------------------------------------------------------
# Dense (bf16) experts


def _row_blocks(group_sizes: jax.Array, m: int, bm: int):
    """Lay rows sorted by group out in blocks of `bm` rows that each belong to one group.

    Returns (slot of each row in the padded layout, group of each block, number of blocks). The
    block count is static: at most m rows plus bm-1 padding rows for each group that has rows.
    Rows past sum(group_sizes) belong to no group and all land on one spare slot after the blocks."""
    e = group_sizes.shape[0]
    padded = (group_sizes + bm - 1) // bm * bm
    pad_end = jnp.cumsum(padded)
    end = jnp.cumsum(group_sizes)
    n_blocks = -(-(m + min(e, m) * (bm - 1)) // bm)
    rows = jnp.arange(m)
    g = jnp.minimum(jnp.searchsorted(end, rows, side="right"), e - 1)
    slot = jnp.where(rows < end[-1], (pad_end - padded)[g] + rows - (end - group_sizes)[g], n_blocks * bm)
    block_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_blocks) * bm, side="right"), e - 1)
    return slot, block_group, n_blocks


def grouped_matmul_ref(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Row i of x (sorted by group) times its group's matrix: x [m,k], w [g,n,k] ([out, in], like
    the INT4 weights) -> [m,n].

    The semantics of `lax.ragged_dot_general`, which GPU and TPU implement as a true grouped
    matmul; XLA:CPU would multiply every row by every group, so here only the groups in use are
    gathered, one per block of rows, for a batched matmul."""
    m, g = x.shape[0], w.shape[0]
    bm = max(1, min(64, 1 << max(0, (m // g).bit_length() - 1)))  # ~ rows per group, power of two
    slot, block_group, n_blocks = _row_blocks(group_sizes, m, bm)
    xp = jnp.zeros((n_blocks * bm + 1, x.shape[1]), x.dtype).at[slot].set(x)[:-1].reshape(n_blocks, bm, -1)
    y = jnp.einsum("bmk,bnk->bmn", xp, w[block_group])
    return jnp.concatenate([y.reshape(n_blocks * bm, -1), jnp.zeros_like(y[0, :1])])[slot]


_OUT_IN = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul_ragged(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`grouped_matmul_ref`'s contract through XLA's native grouped matmul (GPU, TPU)."""
    return jax.lax.ragged_dot_general(x, w, group_sizes, _OUT_IN)
