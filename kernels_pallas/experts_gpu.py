"""Routed-expert W4A16 matmuls on NVIDIA GPUs (Pallas Triton), reading INT4 packing "ct": a GEMV
kernel for few rows per expert, a tensor-core kernel for many, and the entry points that choose
between them by the static rows per expert.

Both read the checkpoint's packing unchanged (packed [E, N, K/8] int32, scale [E, N, K/g]; a row is
contiguous along K) and run over `expert_row_tiles`: a tile is (expert e, rows [r0, r1)) with at
most block_m rows of one expert, so each tile streams its expert's weights once and experts
without rows cost nothing. The grid spans tiles, column blocks and K splits; idle tiles exit at once.

GEMV (decode: 1-4 rows per expert). Bound by the bytes it streams, so it must spend as few
instructions per weight as possible and apply the group scales in registers:
  * A packed word is shifted so that nibble j lands at mantissa bit 12 (even j) or 16 (odd j), and
    OR-ed with the exponent of 128.0: the float is 128 + u/16 or 128 + u exactly, with no
    int->float conversion (issued at a fraction of the FMA rate). One shift serves two nibbles.
  * x is read plane by plane (x[8w + j] for the words w of a block; XLA lays x out plane-major
    first, a tiny copy of the activations) and the even planes are scaled by 16, so every product
    f * x' = 128 x' + u x is one FMA, and the constant part sum(128 x' + 8 x) per group, which
    depends on x only, is subtracted once per group: sum_k (u_k - 8) x_k. The cancellation costs
    ~2^-11 relative per term, far below the bf16 rounding of the result.
  * Each group's sum is multiplied by its scale and accumulated per (row, group) in float32; the
    groups are summed once at the end. gate and up share one pass over x; silu(g) * u is fused.
Few programs (8 experts x one token, or N split over tensor-parallel devices) split K as well,
writing float32 partials that XLA adds up.

Tensor core (prefill and big batches). Weights are dequantized tile by tile in registers
(`dequant_tile_gpu`) and fed to the tensor cores as bf16.

Block sizes are starting points chosen from the arithmetic above, not tuned on hardware
(`scripts/bench_int4.py --variants` and `scripts/gpu_session.py` time the alternatives).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.experts_xla import DOT_NT, expert_row_tiles, mask_padding_rows, rows_per_expert, silu_mul
from kernels_pallas.int4_ct import NIBBLES_PER_WORD

__all__ = ["grouped_int4_swiglu_gpu", "grouped_int4_matmul_gpu", "gemv_config", "mma_config", "GEMV_MAX_ROWS",
           "unsupported_reason", "dequant_tile_gpu"]

GEMV_MAX_ROWS = 4  # rows per expert up to which the GEMV kernel is the default (static choice)
GPU_TARGET_PROGRAMS = 512  # ~4 programs per SM on a 132-SM H100/H200: enough bytes in flight
_MAGIC_128 = 0x43000000  # float32 128.0; mantissa bit 16 is worth 1, bit 12 is worth 1/16
_MAGIC_F32 = 0x4B000000  # float32 2**23: OR-ing a nibble u into its mantissa gives 2**23 + u exactly
_MAGIC_BF16 = 0x4300  # bfloat16 128: likewise 128 + u, exact for u < 16


def unsupported_reason(k: int, group: int) -> str | None:
    """Why these kernels cannot take inputs of width k in groups of `group`, or None. Triton tensors
    have power-of-two shapes, so a tile must hold whole power-of-two groups, and the GEMV kernel
    reads whole packed words per group."""
    if group >= NIBBLES_PER_WORD and k % group == 0 and group & (group - 1) == 0:
        return None
    return f"the gpu kernels need a power-of-two group size of at least 8 dividing k; got k={k}, group size {group}"


def dequant_tile_gpu(p, s, *, group: int, dtype, mode: str = "f32"):
    """p int32 [bn, w], s [bn, 8w/group] -> [bn, 8w] in `dtype` (checkpoint column order): the
    tensor-core kernel's dequantization of one weight tile, in registers.

    No int->float conversion instruction: NVIDIA GPUs issue conversions at a small fraction of the
    FMA rate, enough to bound a memory-bound kernel. The nibble goes into a float mantissa instead
    (exact), and the product is rounded once to the scale's dtype, matching the reference bit for bit.
    Triton merges [bn, w, 8] into [bn, 8w] (the join and reshape its own int4 loads use), so x and
    the output keep the checkpoint's column order. mode "f32": float32 math on a [bn, w, 8]
    broadcast; "bf16": the same with bf16 math (128 + u is exact in bf16); "join": eight [bn, w]
    planes interleaved by Triton joins."""
    bn, w = p.shape
    k = w * NIBBLES_PER_WORD
    n_groups = s.shape[1]
    s_cols = jnp.broadcast_to(s[:, :, None], (bn, n_groups, k // n_groups)).reshape(bn, k)
    if mode == "bf16" and s.dtype == jnp.bfloat16:
        shifts = 4 * lax.broadcasted_iota(jnp.int32, (1, 1, NIBBLES_PER_WORD), 2)
        bits = ((p[:, :, None] >> shifts) & 0xF | _MAGIC_BF16).astype(jnp.int16)
        q = lax.bitcast_convert_type(bits, jnp.bfloat16) - jnp.bfloat16(128 + 8)
        return (q.reshape(bn, k) * s_cols).astype(dtype)
    if mode == "join":
        planes = [lax.bitcast_convert_type((p >> (4 * j)) & 0xF | _MAGIC_F32, jnp.float32)
                  for j in range(NIBBLES_PER_WORD)]
        # Column 8kk + 4a + 2b + c: join over a, then b, then c (each join appends a minor dim).
        lvl = [jnp.stack([planes[j], planes[j + 4]], axis=-1) for j in range(4)]
        lvl = [jnp.stack([lvl[c], lvl[c + 2]], axis=-1) for c in range(2)]
        q = jnp.stack(lvl, axis=-1).reshape(bn, k)
    else:
        shifts = 4 * lax.broadcasted_iota(jnp.int32, (1, 1, NIBBLES_PER_WORD), 2)
        nib = (p[:, :, None] >> shifts) & 0xF | _MAGIC_F32
        q = lax.bitcast_convert_type(nib, jnp.float32).reshape(bn, k)
    q = q - jnp.float32(2**23 + 8)
    return (q * s_cols.astype(jnp.float32)).astype(s.dtype).astype(dtype)


def _split_k(busy_tiles: int, n_blocks: int, n_steps: int) -> int:
    """K splits that bring the grid up to GPU_TARGET_PROGRAMS busy programs."""
    return max(1, min(n_steps, GPU_TARGET_PROGRAMS // max(1, busy_tiles * n_blocks)))


def gemv_config(rows: float, m: int, n: int, k: int, group: int) -> dict:
    """GEMV block sizes for `rows` expected rows per expert out of m rows, output width n."""
    block_m = 1 if rows <= 1.25 else min(GEMV_MAX_ROWS, pl.next_power_of_2(math.ceil(rows)))
    n_groups = k // group
    cfg = dict(block_m=block_m, block_n=32 if block_m <= 2 else 16,
               block_groups=min(16, pl.next_power_of_2(n_groups)), num_warps=4, num_stages=3, x_planes=True)
    cfg["block_n"] = min(cfg["block_n"], max(16, pl.next_power_of_2(n)))
    cfg["split_k"] = _split_k(pl.cdiv(m, block_m), pl.cdiv(n, cfg["block_n"]),
                              pl.cdiv(n_groups, cfg["block_groups"]))
    return cfg


def mma_config(rows: float, m: int, n: int, k: int, group: int) -> dict:
    """Tensor-core block sizes: a row tile that the expected rows per expert fill, K in long steps."""
    if rows <= 16:
        cfg = dict(block_m=16, block_n=32, block_k=512, num_warps=4, num_stages=3)
    elif rows <= 32:
        cfg = dict(block_m=32, block_n=64, block_k=256, num_warps=4, num_stages=3)
    elif rows <= 96:
        cfg = dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    cfg["dequant"] = "f32"
    cfg["block_k"] = max(min(cfg["block_k"], pl.next_power_of_2(k)), group, 16)
    cfg["block_n"] = min(cfg["block_n"], max(16, pl.next_power_of_2(n)))
    cfg["split_k"] = _split_k(pl.cdiv(m, cfg["block_m"]), pl.cdiv(n, cfg["block_n"]), pl.cdiv(k, cfg["block_k"]))
    return cfg


def _finish(out, swiglu, dtype):
    """Sum float32 K-split partials [split, weights, M, N] and apply the epilogue."""
    if out.ndim == 2:
        return out
    accs = out.sum(0)
    return (silu_mul(accs[0], accs[1]) if swiglu else accs[0]).astype(dtype)


# ---------------------------------------------------------------------------------------------
# GEMV kernel


def _plane_floats(p, j: int):
    """Nibble j of every packed word as float32: 128 + u/16 for even j, 128 + u for odd j."""
    shift = 12 - 4 * (j - j % 2)  # one shift puts nibbles j, j+1 at bits 12 and 16
    moved = p << shift if shift > 0 else p >> -shift if shift < 0 else p
    pos = 12 if j % 2 == 0 else 16
    return lax.bitcast_convert_type(moved & (0xF << pos) | _MAGIC_128, jnp.float32)


_X_SCALE = [16.0 if j % 2 == 0 else 1.0 for j in range(NIBBLES_PER_WORD)]  # planes at bit 12 read u/16
_X_CONST = [128.0 * s + 8.0 for s in _X_SCALE]  # sum((u - 8) x) = sum(f x') - _X_CONST[j] sum(x)


def _gemv_kernel(te_ref, r0_ref, r1_ref, x_ref, *refs, bm, bn, bg, n_splits, swiglu, x_planes):
    from jax.experimental.pallas import triton as plgpu

    *w_refs, o_ref = refs
    pairs = list(zip(w_refs[::2], w_refs[1::2]))
    jb, t, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e, r0, r1 = te_ref[t], r0_ref[t], r1_ref[t]
    n, n_groups, gw = w_refs[0].shape[1:]
    n_steps = pl.cdiv(n_groups, bg)
    per_split = pl.cdiv(n_steps, n_splits)
    cols = jb * bn + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    col_ok = cols < n

    @pl.when(r0 < r1)
    def _():
        row_ok = [r0 + r < r1 for r in range(bm)]

        def step(i, accs):
            g_ok = i * bg + lax.broadcasted_iota(jnp.int32, (bg,), 0) < n_groups
            x_ok = jnp.broadcast_to(g_ok[:, None], (bg, gw))
            p_ok = col_ok[:, None, None] & x_ok[None]
            s_ok = col_ok[:, None] & g_ok[None, :]
            xs = []  # per row: 8 scaled planes [bg, gw] and the per-group constant [bg]
            for r in range(bm):
                planes, const = [], None
                for j in range(NIBBLES_PER_WORD):
                    # (A static plane index would do, but the interpreter's load rule wants an array.)
                    at = (x_ref.at[r0 + r, jnp.int32(j), pl.ds(i * bg, bg), :] if x_planes
                          else x_ref.at[r0 + r, pl.ds(i * bg, bg), :, jnp.int32(j)])
                    xj = plgpu.load(at, mask=row_ok[r] & x_ok, other=0).astype(jnp.float32)
                    planes.append(xj * _X_SCALE[j])
                    c = xj.sum(axis=1) * _X_CONST[j]
                    const = c if const is None else const + c
                xs.append((planes, const))
            new = []
            for w, (p_ref, s_ref) in enumerate(pairs):
                # Groups past K load as p = 0, s = 0, with x = 0: they add exactly nothing.
                p = plgpu.load(p_ref.at[e, pl.ds(jb * bn, bn), pl.ds(i * bg, bg), :], mask=p_ok, other=0)
                s = plgpu.load(s_ref.at[e, pl.ds(jb * bn, bn), pl.ds(i * bg, bg)], mask=s_ok,
                               other=0).astype(jnp.float32)
                sums = [None] * bm
                for j in range(NIBBLES_PER_WORD):
                    f = _plane_floats(p, j)  # [bn, bg, gw]
                    for r in range(bm):
                        term = f * xs[r][0][j][None]
                        sums[r] = term if sums[r] is None else sums[r] + term
                for r in range(bm):
                    new.append(accs[w * bm + r] + (sums[r].sum(axis=2) - xs[r][1][None]) * s)
            return tuple(new)

        zeros = tuple(jnp.zeros((bn, bg), jnp.float32) for _ in range(len(pairs) * bm))
        accs = lax.fori_loop(sp * per_split, jnp.minimum((sp + 1) * per_split, n_steps), step, zeros)
        for r in range(bm):
            ys = [accs[w * bm + r].sum(axis=1) for w in range(len(pairs))]  # [bn] each
            mask = col_ok & row_ok[r]
            if n_splits == 1:
                y = silu_mul(*ys) if swiglu else ys[0]
                plgpu.store(o_ref.at[r0 + r, pl.ds(jb * bn, bn)], y.astype(o_ref.dtype), mask=mask)
            else:
                for w, y in enumerate(ys):
                    plgpu.store(o_ref.at[sp, jnp.int32(w), r0 + r, pl.ds(jb * bn, bn)], y, mask=mask)


def gemv_call(x, weights, tiles, *, swiglu, block_m, block_n, block_groups, num_warps, num_stages,
              split_k=1, x_planes=True, interpret=False):
    """x [M, K]; weights [(packed [E, N, K8], scale [E, N, G]), ...]; tiles from `expert_row_tiles`
    with block_m rows -> [M, N] (rows no tile covers are left unwritten).

    x_planes: XLA first lays x out plane-major, [M, 8, G, words], so each plane is a contiguous,
    vectorizable load (one small extra op per call); else the kernel reads each plane with a
    stride-8 load, which moves ~8x the bytes through L1."""
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n_exp, n, k8 = weights[0][0].shape
    n_groups = weights[0][1].shape[2]
    gw = k8 // n_groups  # packed words per group
    # Free reshapes: the group's words, and x as [M, G, words, nibble] so plane j is a strided load.
    flat = []
    for p, s in weights:
        flat += [p.reshape(n_exp, n, n_groups, gw), s]
    x4 = x.reshape(m, n_groups, gw, NIBBLES_PER_WORD)
    if x_planes:
        x4 = x4.transpose(0, 3, 1, 2)
    split_k = max(1, min(split_k, pl.cdiv(n_groups, block_groups)))
    if split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split_k, len(weights), m, n), jnp.float32)
    kernel = functools.partial(_gemv_kernel, bm=block_m, bn=block_n, bg=block_groups, n_splits=split_k,
                               swiglu=swiglu, x_planes=x_planes)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        # Column blocks vary fastest, so neighbouring programs stream neighbouring rows of one expert.
        grid=(pl.cdiv(n, block_n), tiles[0].shape[0], split_k),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="int4_swiglu_gemv" if swiglu else "int4_matmul_gemv",
    )(*tiles, x4, *flat)
    return _finish(out, swiglu, x.dtype)


# ---------------------------------------------------------------------------------------------
# Tensor-core kernel


def _mma_kernel(te_ref, r0_ref, r1_ref, x_ref, *refs, bm, bn, bk, group, swiglu, dequant, split_k):
    from jax.experimental.pallas import triton as plgpu

    *w_refs, o_ref = refs
    pairs = list(zip(w_refs[::2], w_refs[1::2]))
    t, j, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e, r0, r1 = te_ref[t], r0_ref[t], r1_ref[t]
    k = x_ref.shape[1]
    n, k8 = w_refs[0].shape[1:]
    n_groups = w_refs[1].shape[2]
    n_steps = pl.cdiv(k, bk)
    per_split = pl.cdiv(n_steps, split_k)

    @pl.when(r0 < r1)
    def _():
        row_ok = r0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < r1
        wrow_ok = j * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n

        def step(i, accs):
            kx = i * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(i * bk, bk)], mask=row_ok & (kx < k), other=0)
            kw = i * (bk // 8) + lax.broadcasted_iota(jnp.int32, (1, bk // 8), 1)
            kg = i * (bk // group) + lax.broadcasted_iota(jnp.int32, (1, bk // group), 1)
            new = []
            for (p_ref, s_ref), acc in zip(pairs, accs):
                p = plgpu.load(p_ref.at[e, pl.ds(j * bn, bn), pl.ds(i * (bk // 8), bk // 8)],
                               mask=wrow_ok & (kw < k8), other=0)
                # Scales past K load as 0, so the padded weights are exactly 0 whatever p holds.
                s = plgpu.load(s_ref.at[e, pl.ds(j * bn, bn), pl.ds(i * (bk // group), bk // group)],
                               mask=wrow_ok & (kg < n_groups), other=0)
                w = dequant_tile_gpu(p, s, group=group, dtype=x.dtype, mode=dequant)
                new.append(acc + lax.dot_general(x, w, DOT_NT, preferred_element_type=jnp.float32))
            return tuple(new)

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in pairs)
        col_ok = j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1) < n
        accs = lax.fori_loop(sp * per_split, jnp.minimum((sp + 1) * per_split, n_steps), step, zeros)
        if split_k == 1:
            y = silu_mul(*accs) if swiglu else accs[0]
            plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)], y.astype(o_ref.dtype), mask=row_ok & col_ok)
        else:  # float32 partials [split, weights, M, N]
            for a, acc in enumerate(accs):
                plgpu.store(o_ref.at[sp, jnp.int32(a), pl.ds(r0, bm), pl.ds(j * bn, bn)], acc,
                            mask=row_ok & col_ok)


def mma_call(x, weights, tiles, *, swiglu, block_m, block_n, block_k, num_warps, num_stages,
             dequant="f32", split_k=1, interpret=False):
    """x [M, K]; weights [(packed [E, N, K8], scale [E, N, G]), ...]; tiles from `expert_row_tiles`
    with block_m rows -> [M, N] (rows no tile covers are left unwritten)."""
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = weights[0][0].shape[1]
    group = k // weights[0][1].shape[2]
    if block_k % group or block_k % NIBBLES_PER_WORD:
        raise ValueError(f"block_k={block_k} must be a multiple of the group size {group} and of 8")
    split_k = max(1, min(split_k, pl.cdiv(k, block_k)))
    kernel = functools.partial(_mma_kernel, bm=block_m, bn=block_n, bk=block_k, group=group,
                               swiglu=swiglu, dequant=dequant, split_k=split_k)
    if split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split_k, len(weights), m, n), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(tiles[0].shape[0], pl.cdiv(n, block_n), split_k),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="int4_swiglu_mma" if swiglu else "int4_matmul_mma",
    )(*tiles, x, *[a for pair in weights for a in pair])
    return _finish(out, swiglu, x.dtype)


# ---------------------------------------------------------------------------------------------
# Entry points


_KERNELS = {"gemv": (gemv_config, gemv_call), "mma": (mma_config, mma_call)}


def _grouped_gpu(x, weights, group_sizes, *, swiglu, kernel, interpret, overrides):
    m, k = x.shape
    n = weights[0][0].shape[1]
    group = k // weights[0][1].shape[2]
    reason = unsupported_reason(k, group)
    if reason:
        raise ValueError(reason)
    rows = rows_per_expert(m, group_sizes.shape[0])
    kernel = kernel or ("gemv" if rows <= GEMV_MAX_ROWS else "mma")
    if kernel not in _KERNELS:
        raise ValueError(f"unknown GPU kernel {kernel!r}; expected one of {sorted(_KERNELS)}")
    config, call = _KERNELS[kernel]
    cfg = config(rows, m, n, k, group)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"the {kernel} kernel has no setting {sorted(unknown)}; it takes {sorted(cfg)}")
    cfg.update(overrides)
    tiles = expert_row_tiles(group_sizes, m, cfg["block_m"])
    out = call(x, weights, tiles, swiglu=swiglu, interpret=interpret, **cfg)
    return mask_padding_rows(out, group_sizes)


def grouped_int4_swiglu_gpu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, kernel=None,
                            interpret=False, **overrides):
    """`grouped_int4_swiglu_ref` on the GPU: one pass reads gate and up side by side.

    kernel: "gemv" or "mma" (default: by the expected rows per expert); `overrides` replace
    entries of `gemv_config` / `mma_config` (benchmarks); `interpret=True` runs on any platform."""
    return _grouped_gpu(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                        kernel=kernel, interpret=interpret, overrides=overrides)


def grouped_int4_matmul_gpu(h, packed, scale, group_sizes, *, kernel=None, interpret=False, **overrides):
    """`grouped_int4_matmul_ref` on the GPU (the down projection); arguments as the SwiGLU's."""
    return _grouped_gpu(h, [(packed, scale)], group_sizes, swiglu=False, kernel=kernel, interpret=interpret,
                        overrides=overrides)
