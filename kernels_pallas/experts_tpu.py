"""Routed-expert W4A16 matmuls on TPU (Mosaic), reading INT4 packing "tpu" (int4_packing.py).

  grouped_int4_swiglu_tpu(x [M, K], gate (packed [E, K/8, N], scale [E, G, N]), up (same), sizes [E'])
      -> silu(x @ Wg[e]^T) * (x @ Wu[e]^T) [M, N], row r using the expert e whose run holds r
  grouped_int4_matmul_tpu(h [M, K], packed [E, K/8, N], scale [E, G, N], sizes [E']) -> [M, N]

Rows past sum(sizes) are padding and come back as zeros; group e (e < E' <= E) reads expert e. The
references are experts_xla.py's with packing="tpu". N must be a multiple of 128. There is no TPU
kernel for packing "ct": its minor dimensions (K/32 scale columns, K/8 words) are not multiples of
128, so XLA:TPU would copy every layer's experts into another tiling before any kernel could read
them; the loader repacks them once instead (backends.py).

Grid = (column blocks, visits). A visit is (expert e, row block b) for every block b of `block_m`
rows that e's run touches (`tpu_visits`); consecutive visits of one row block accumulate into the
resident output block under a row mask. Visit metadata is scalar-prefetched so the index maps pick
expert e's weight block; an expert with no rows is never visited and padding visits repeat the last
real one, so neither costs a DMA: each selected expert's [K/8, block_n] words and [G, block_n]
scales are streamed once per column block and row block they serve.

Inside a visit, 128 columns at a time, each tile of 8 groups (int4_packing.py) is decoded with one shift,
one mask and one OR per word and pair of nibbles into bfloat16 128 + u in column order. Then:
  * few rows ("scale after", block_m <= 32, decode): the MXU multiplies x by 128 + u with the scales
    left out, one partial sum per (group, row), because x enters block-diagonally: left row (gl, m)
    holds row m's columns of group gl, zeros elsewhere. Each partial, less 136 * (row m's sum over
    the group), times the group's scale row (a stride-0 load, no VPU work), adds to the result:
    three VPU operations per 8 rows and 128 columns of a group. The products are those of the exact
    dequantized weights, without the reference's bf16 rounding of each weight.
  * many rows ("dequant"): every weight becomes (u - 8) * scale rounded like the reference, and the
    MXU multiplies x by those weights; the decode is then small next to the matmul.
Why: libtpu's schedule of a decode-shaped call (v5p, tensor=8 shapes, static bundle counts) puts
the straightforward kernel (unpack, convert, scale, round every weight) at ~1.4 bundles per 1024
weights, VPU-bound; this one at ~0.6 (gate+up) and ~0.8 (down), against ~0.36 cycles of HBM time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.experts_xla import mask_padding_rows, rows_per_expert, silu_mul
from kernels_pallas.int4_ct import NIBBLES_PER_WORD
from kernels_pallas.int4_packing import TILE_GROUPS, features

__all__ = ["grouped_int4_swiglu_tpu", "grouped_int4_matmul_tpu", "experts_call", "block_m_for", "block_n_for",
           "tpu_visits", "unsupported_reason"]

BLOCK_WORD_BYTES = 2 * 2**20  # words per weight block: a grid step's ~0.35 us is small next to its DMA
SPLIT_MIN_BYTES = 2**20  # split columns across TensorCores only while blocks keep at least this much
SCALE_AFTER_MAX_ROWS = 32  # above this, scaling every weight costs less than scaling partial sums
TARGET_TILES = 32  # tiles of work per loop body: fewer leave MXU latency exposed in the schedule
LANES = 128  # columns per inner step (stride-0 loads need refs with rows of exactly 128 lanes)
_MAGIC = 0x43004300  # bfloat16 128.0 in both 16-bit halves: OR-ing a nibble u in gives 128 + u exactly
_LOW_NIBBLES = 0x000F000F
_OFFSET = 128 + 8  # the decoded 128 + u is q + 136


def unsupported_reason(n: int, k: int, n_groups: int) -> str | None:
    """Why these kernels cannot take weights of N outputs and K inputs in `n_groups` scale groups
    (packing "tpu"), or None."""
    group = k // n_groups if n_groups else 0
    if not group or k % n_groups or group % NIBBLES_PER_WORD or n_groups % TILE_GROUPS:
        return (f"the tpu kernels need a group size that is a multiple of 8 and a multiple of {TILE_GROUPS} "
                f"groups; got k={k} in {n_groups} groups")
    if n % LANES:
        return f"the tpu kernels need N a multiple of {LANES}; got N={n}"
    return None


def aligned_divisor(n: int, target: int, align: int) -> int:
    """Largest multiple of `align` that divides n and is <= target, else n (whole-dim blocks are
    always legal on TPU, where a block must be a multiple of the (8, 128) tile or the full dim)."""
    for b in range(min(target, n) // align * align, 0, -align):
        if n % b == 0:
            return b
    return n


def tpu_visits(group_sizes, m: int, bm: int):
    """(expert, row block) visits -> (expert [T], block [T], expert row offsets [E+1], count [1]).

    Pallas blocks must start at multiples of the block size, so an expert's run of rows is visited
    once per block of `bm` rows it touches (megablox style). Computed on device (tiny arrays), so
    group sizes can be traced values."""
    n_exp = group_sizes.shape[0]
    n_blocks = pl.cdiv(m, bm)
    n_visits = n_blocks + min(n_exp, m)
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(gs), m)
    starts = ends - jnp.minimum(gs, ends)
    count = jnp.where(ends > starts, (ends - 1) // bm - starts // bm + 1, 0)
    visit_end = jnp.cumsum(count)
    total = visit_end[-1]
    # Padding visits repeat the last real one: same block indices, so the pipeline fetches nothing.
    t = jnp.minimum(jnp.arange(n_visits, dtype=jnp.int32), jnp.maximum(total - 1, 0))
    g = jnp.minimum(jnp.searchsorted(visit_end, t, side="right", method="compare_all"), n_exp - 1)
    b = jnp.minimum(starts[g] // bm + t - (visit_end[g] - count[g]), n_blocks - 1)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    return g.astype(jnp.int32), b.astype(jnp.int32), offsets, total.reshape(1).astype(jnp.int32)


def tpu_visit_call(kernel, grid_spec, out_shape, *, interpret, name: str):
    """The pallas_call of a kernel whose grid is (column block, visit) over `tpu_visits`."""
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec,
        # Visits revisit output blocks, so only the column axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=48 * 2**20),
        interpret=interpret, name=name)



def block_n_for(n: int, k8: int, cores: int = 2) -> int:
    """Columns per block: a multiple of 128 dividing N with about BLOCK_WORD_BYTES of words, split
    into `cores` blocks (the column axis is the one shared out between TensorCores) while each keeps
    SPLIT_MIN_BYTES."""
    target = max(LANES, BLOCK_WORD_BYTES // (4 * k8) // LANES * LANES)
    if n // cores * 4 * k8 >= SPLIT_MIN_BYTES:
        target = min(target, n // cores)
    return aligned_divisor(n, target, LANES)


def block_m_for(rows_per_group: float) -> int:
    """Rows per block: the expected rows per expert as a power of two, from 8 (a float32 sublane
    tile; scaling partial sums costs VPU work per row, so decode keeps blocks small) to 256."""
    return int(min(256, max(8, pl.next_power_of_2(max(1, int(rows_per_group))))))


def mxu_depth() -> int:
    """Rows of a weight tile the target's MXU holds: 128 up to v5, 256 from v6 (TPU7x included).
    The target is the context mesh's device (an AOT compile from a CPU host) or the default one."""
    from jax.experimental.pallas import tpu as pltpu

    try:
        return pltpu.get_tpu_info().mxu_column_size
    except ValueError:  # not a TPU (interpret mode on CPU): any depth computes the same
        return 128


def _decode_tile(words):
    """int32 words [g, c] of one tile -> bfloat16 [8g, c] holding 128 + u in column order."""
    from jax.experimental.pallas import tpu as pltpu

    rows = []
    for chain in range(4):
        pairs = words if chain == 0 else words >> (4 * chain)
        rows.append(pltpu.bitcast((pairs & _LOW_NIBBLES) | _MAGIC, jnp.bfloat16))
    return jnp.concatenate(rows, axis=0)


def _unroll(trips: int, tiles_per_trip: int) -> int:
    """Loop iterations per body: the schedule overlaps one tile's MXU latency with another's decode
    only inside a body, and that takes about TARGET_TILES tiles."""
    return max(1, min(trips, -(-TARGET_TILES // tiles_per_trip)))


def _row_on_sublanes(ref, row, n, stride0: bool):
    """ref[row] repeated on n sublanes. Compiled, a stride-0 load does it in the load slots, free of
    VPU work; the interpreter has no stride-0 slices, so there it is a broadcast."""
    if stride0:
        return ref[pl.ds(row, n, stride=0), :]
    return jnp.broadcast_to(ref[pl.ds(row, 1), :], (n, ref.shape[-1]))


def _tree_sum(xs):
    xs = list(xs)
    while len(xs) > 1:
        xs = [a + b for a, b in zip(xs[::2], xs[1::2])] + xs[len(xs) // 2 * 2:]
    return xs[0]


# ---------------------------------------------------------------------------------------------
# The two inner strategies: one 128-column slab of every projection, [bm, 128] float32 each.


def _sub_tiles(group: int, depth: int) -> int:
    """Sub-tiles per tile, each whole chains of about `depth` rows: the MXU multiplies each by the
    x rows of its own groups only, so no row of x streams past columns it is zero on (libtpu's
    schedule on v5p: one 64-row dot per 256-row tile costs 1.7x two 32-row dots)."""
    return max(1, min(4, TILE_GROUPS * group // depth))


def _build_row_block(x_ref, xsum_ref, xbd_ref, xoff_ref, *, bm, group):
    """What the partial sums of a row block need, built when the row block changes:
      xbd[v] [gs*bm, gs*group] for sub-tile v (gs groups): row gl*bm + m holds row m of x's
          columns of group gl of v, zeros elsewhere;
      xoff[gi] [bm, 128]: 136 * (sum of row m of x over group gi) on every lane."""
    sub_k = xbd_ref.shape[2]
    gs = sub_k // group
    lane_group = lax.broadcasted_iota(jnp.int32, (bm, sub_k), 1) // group

    def sub_tile(v, carry):
        xv = x_ref[:, pl.ds(pl.multiple_of(v * sub_k, sub_k), sub_k)].astype(jnp.float32)
        xbd_ref[v] = jnp.concatenate([jnp.where(lane_group == gl, xv, 0.0) for gl in range(gs)],
                                     axis=0).astype(xbd_ref.dtype)
        return carry

    lax.fori_loop(0, xbd_ref.shape[0], sub_tile, 0)
    xsum = xsum_ref[...] * _OFFSET  # [bm, G]
    for gi in range(xoff_ref.shape[0]):
        xoff_ref[gi] = jnp.broadcast_to(xsum[:, gi:gi + 1], (bm, LANES))


def _scale_after(xbd_ref, xoff_ref, s32_ref, w_refs, cols, *, bm, group, stride0):
    packed = w_refs[::2]
    sub_k = xbd_ref.shape[2]
    sub = TILE_GROUPS * group // sub_k
    gs = TILE_GROUPS // sub

    def tile(t, accs):
        new = []
        for i, (p_ref, acc) in enumerate(zip(packed, accs)):
            rows = _decode_tile(p_ref[pl.ds(pl.multiple_of(t * group, group), group), cols])  # [8g, 128]
            acc = list(acc)
            for v in range(sub):
                part = jnp.dot(xbd_ref[t * sub + v], rows[v * sub_k:(v + 1) * sub_k],
                               preferred_element_type=jnp.float32)  # [gs bm, 128]: rows (gl, m)
                for gl in range(gs):
                    gi = t * TILE_GROUPS + v * gs + gl
                    scale = _row_on_sublanes(s32_ref.at[i], gi, bm, stride0)
                    # One accumulator per group of a tile: eight independent chains of adds.
                    a = v * gs + gl
                    acc[a] = acc[a] + (part[gl * bm:(gl + 1) * bm] - xoff_ref[gi]) * scale
            new.append(tuple(acc))
        return tuple(new)

    n_tiles = xbd_ref.shape[0] // sub
    zeros = tuple(tuple(jnp.zeros((bm, LANES), jnp.float32) for _ in range(TILE_GROUPS)) for _ in packed)
    accs = lax.fori_loop(0, n_tiles, tile, zeros, unroll=_unroll(n_tiles, len(packed)))
    return [_tree_sum(acc) for acc in accs]


def _dequant(x_ref, s32_ref, w_refs, cols, *, bm, group):
    tile_k = TILE_GROUPS * group

    def tile(t, accs):
        xt = x_ref[:, pl.ds(pl.multiple_of(t * tile_k, tile_k), tile_k)]
        new = []
        for i, (p_ref, s_ref, acc) in enumerate(zip(w_refs[::2], w_refs[1::2], accs)):
            q = _decode_tile(p_ref[pl.ds(pl.multiple_of(t * group, group), group), cols]).astype(jnp.float32)
            scale = s32_ref[i, pl.ds(pl.multiple_of(t * TILE_GROUPS, TILE_GROUPS), TILE_GROUPS), :]
            rows = jnp.broadcast_to(scale[:, None, :], (TILE_GROUPS, group, LANES)).reshape(tile_k, LANES)
            w = (q - _OFFSET) * rows
            if s_ref.dtype != xt.dtype:  # round through the scale dtype, as the reference does
                w = w.astype(s_ref.dtype)
            new.append(acc + jnp.dot(xt, w.astype(xt.dtype), preferred_element_type=jnp.float32))
        return tuple(new)

    n_tiles = x_ref.shape[1] // tile_k
    zeros = tuple(jnp.zeros((bm, LANES), jnp.float32) for _ in w_refs[::2])
    return list(lax.fori_loop(0, n_tiles, tile, zeros, unroll=_unroll(n_tiles, len(zeros))))


def _experts_kernel(vg_ref, vb_ref, off_ref, nv_ref, x_ref, xsum_ref, *refs, bm, group, swiglu, scale_after,
                   stride0):
    n_proj = 2 if swiglu else 1
    w_refs, o_ref = refs[:2 * n_proj], refs[2 * n_proj]
    s32_ref, xbd_ref, xoff_ref = refs[2 * n_proj + 1:]
    t = pl.program_id(1)
    n_lanes = o_ref.shape[1] // LANES
    n_tiles = x_ref.shape[1] // (TILE_GROUPS * group)

    if scale_after:  # the block-diagonal x depends on the row block only
        @pl.when((t == 0) | (vb_ref[t] != vb_ref[jnp.maximum(t - 1, 0)]))
        def _():
            _build_row_block(x_ref, xsum_ref, xbd_ref, xoff_ref, bm=bm, group=group)

    @pl.when(t < nv_ref[0])
    def _():
        g = vg_ref[t]
        rows = vb_ref[t] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        mine = (rows >= off_ref[g]) & (rows < off_ref[g + 1])

        def columns(lane, carry):
            cols = pl.ds(pl.multiple_of(lane * LANES, LANES), LANES)
            for i, s_ref in enumerate(w_refs[1::2]):  # the slab's scales, in float32
                s32_ref[i] = s_ref[:, cols].astype(jnp.float32)
            if scale_after:
                ys = _scale_after(xbd_ref, xoff_ref, s32_ref, w_refs, cols, bm=bm, group=group, stride0=stride0)
            else:
                ys = _dequant(x_ref, s32_ref, w_refs, cols, bm=bm, group=group)
            y = silu_mul(*ys) if swiglu else ys[0]
            o_ref[:, cols] = jnp.where(mine, y.astype(o_ref.dtype), o_ref[:, cols])
            return carry

        lax.fori_loop(0, n_lanes, columns, 0, unroll=_unroll(n_lanes, n_tiles * n_proj))


# ---------------------------------------------------------------------------------------------


def _check_shapes(x, weights, group_sizes):
    m, k = x.shape
    packed, scale = weights[0]
    n, kw = features(packed, scale, "tpu")
    for p, s in weights:
        if p.ndim != 3 or p.dtype != jnp.int32 or s.shape != (p.shape[0], scale.shape[1], p.shape[2]):
            raise ValueError(f"expected experts in packing 'tpu': packed int32 [E, K/8, N] and scale [E, G, N]; "
                             f"got packed {p.dtype}{list(p.shape)}, scale {s.dtype}{list(s.shape)}")
        if p.shape != packed.shape:
            raise ValueError(f"all projections must share one shape; got {list(p.shape)} and {list(packed.shape)}")
    if kw != k:
        raise ValueError(f"x has {k} input features but the weights hold {kw} (K/8 = {packed.shape[1]} rows)")
    if group_sizes.ndim != 1 or group_sizes.shape[0] > packed.shape[0]:
        raise ValueError(f"group_sizes {list(group_sizes.shape)} must be [E] with E <= {packed.shape[0]} experts")
    n_groups = scale.shape[1]
    reason = unsupported_reason(n, k, n_groups)
    if reason:
        raise ValueError(reason)
    group = k // n_groups
    return m, k, n, group


def experts_call(x, weights, group_sizes, *, swiglu, block_m=None, block_n=None, scale_after=None,
                    interpret=False):
    """x [M, K]; weights [(packed [E, K/8, N], scale [E, G, N]), ...] in packing "tpu";
    group_sizes [E'] (E' <= E) -> [M, N] in x.dtype; see the module docstring. `scale_after`
    forces the inner strategy (default: by block_m)."""
    from jax.experimental.pallas import tpu as pltpu

    m, k, n, group = _check_shapes(x, weights, group_sizes)
    k8, n_groups = weights[0][0].shape[1], weights[0][1].shape[1]
    bm = block_m or block_m_for(rows_per_expert(m, group_sizes.shape[0]))
    bn = block_n or block_n_for(n, k8)
    if n % bn or bn % LANES:
        raise ValueError(f"block_n={bn} must divide N={n} and be a multiple of {LANES}")
    if scale_after is None:
        scale_after = bm <= SCALE_AFTER_MAX_ROWS
    m_pad = pl.cdiv(m, bm) * bm
    x_pad = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    xsum = x_pad.astype(jnp.float32).reshape(m_pad, n_groups, group).sum(-1)  # for the 136 offset
    n_proj = len(weights)
    sub_k = TILE_GROUPS * group // _sub_tiles(group, mxu_depth())
    scratch = [pltpu.VMEM((n_proj, n_groups, LANES), jnp.float32),
               # Block-diagonal x and group-sum offsets; a token size for the "dequant" strategy.
               pltpu.VMEM((k // sub_k, sub_k // group * bm, sub_k) if scale_after else (1, 16, LANES), x.dtype),
               pltpu.VMEM((n_groups if scale_after else 1, bm, LANES), jnp.float32)]
    visits = tpu_visits(group_sizes, m, bm)
    expert = lambda j, t, vg, vb, off, nv: (vg[t], 0, j)  # noqa: E731 - one map for words and scales
    rows = lambda j, t, vg, vb, off, nv: (vb[t], 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(n // bn, visits[0].shape[0]),
        in_specs=[pl.BlockSpec((bm, k), rows), pl.BlockSpec((bm, n_groups), rows),
                  *[pl.BlockSpec((None, r, bn), expert) for _ in weights for r in (k8, n_groups)]],
        out_specs=pl.BlockSpec((bm, bn), lambda j, t, vg, vb, off, nv: (vb[t], j)),
        scratch_shapes=scratch,
    )
    kernel = functools.partial(_experts_kernel, bm=bm, group=group, swiglu=swiglu, scale_after=scale_after,
                               stride0=not interpret)
    out = tpu_visit_call(kernel, grid_spec, jax.ShapeDtypeStruct((m_pad, n), x.dtype), interpret=interpret,
                         name="int4_swiglu_tpu" if swiglu else "int4_matmul_tpu",
                         )(*visits, x_pad, xsum, *[a for pair in weights for a in pair])
    return mask_padding_rows(out[:m], group_sizes)


def grouped_int4_swiglu_tpu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, block_m=None,
                            block_n=None, scale_after=None, interpret=False):
    """silu(x @ Wg^T) * (x @ Wu^T) per row's expert; one kernel streams gate and up side by side."""
    return experts_call(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                           block_m=block_m, block_n=block_n, scale_after=scale_after, interpret=interpret)


def grouped_int4_matmul_tpu(h, packed, scale, group_sizes, *, block_m=None, block_n=None, scale_after=None,
                            interpret=False):
    """h @ W^T per row's expert (the down projection)."""
    return experts_call(h, [(packed, scale)], group_sizes, swiglu=False, block_m=block_m, block_n=block_n,
                           scale_after=scale_after, interpret=interpret)
