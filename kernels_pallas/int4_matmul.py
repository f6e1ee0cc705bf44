"""W4A16 matmul y = x @ W^T with the INT4 dequant fused in (GPU Triton and TPU Mosaic), and its reference.

Both kernels are written once for *row tiles that each belong to one weight matrix*, so the dense
matmul here and the grouped MoE matmuls (grouped_moe.py) share them: the dense case is one group
holding every row. Weights stay in the checkpoint layout: packed [E, N, K/8] int32, scale [E, N, K/g].

GPU: a tile is (expert e, rows [r0, r1)) with r1 - r0 <= block_m, aligned to its group's first row,
so a program never mixes experts and every tile of an expert streams that expert's weights once per
column block. Grid = (tiles, column blocks, K splits); tiles past the real count exit at once.
Weights are dequantized tile by tile in registers and fed to the tensor cores as bf16.

TPU: Pallas blocks must start at multiples of the block size, so a "visit" is (group g, row block b)
for every block b that g touches (megablox style); consecutive visits of one row block accumulate
into the resident output block under a row mask. Group metadata is scalar-prefetched so index maps
can pick the expert's weight block; padding visits repeat the last real one, which costs no DMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.dequant import (
    aligned_divisor,
    check_supported,
    dequant_planes_tpu,
    dequant_tile_gpu,
    spread_matrix,
)
from kernels_pallas.int4 import NIBBLES_PER_WORD
from kernels_pallas.layout import dequantize

__all__ = ["int4_matmul", "int4_matmul_ref", "gpu_config", "gpu_tiles", "tpu_visits"]

DOT_NT = (((1,), (1,)), ((), ()))  # contract the last dims: x [m, k] . w [n, k] -> [m, n]
GPU_TARGET_PROGRAMS = 512  # ~4 programs per SM on a 132-SM H100: enough bytes in flight


def int4_matmul_ref(x, packed, scale, layout="ct"):
    """x [M, K] @ W^T for W = dequant(packed [N, K8], scale [N, K/g]) -> [M, N] in x.dtype (pure jnp).
    `layout`: where packed and scale keep the words (layout.py; "tpu": [K8, N] and [K/g, N])."""
    w = dequantize(packed, scale, layout, x.dtype, x.shape[-1])
    return lax.dot_general(x, w, DOT_NT, preferred_element_type=jnp.float32).astype(x.dtype)


def silu_mul(g, u):
    return g / (1.0 + jnp.exp(-g)) * u


# ---------------------------------------------------------------------------------------------
# Tile metadata (jnp; tiny arrays, computed on device so group sizes can be traced values).


def gpu_tiles(group_sizes, m: int, bm: int):
    """Group-aligned row tiles -> (expert, first row, end row) int32 [T] each; T is a static bound.

    Each nonempty group g gets ceil(size_g / bm) tiles; sum_g ceil(s_g/bm) <= m // bm + #nonempty.
    Unused tiles have first row == end row and do nothing."""
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


def tpu_visits(group_sizes, m: int, bm: int):
    """(group, row block) visits -> (group [T], block [T], group row offsets [E+1], count [1])."""
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


# ---------------------------------------------------------------------------------------------
# GPU kernel (Pallas Triton lowering)


def gpu_config(rows_per_group: float, n: int, k: int, group: int) -> dict:
    """Block sizes by the expected rows per weight matrix. Starting points, checked correct on an H100
    but not yet tuned there (`scripts/bench_int4.py --variants` times alternatives).

    Few rows: memory-bound, so narrow column blocks give enough programs to fill the SMs, and long
    K steps keep many bytes in flight. Many rows: a classic tensor-core tile."""
    if rows_per_group <= 16:
        cfg = dict(block_m=16, block_n=32, block_k=512, num_warps=4, num_stages=3)
    elif rows_per_group <= 32:
        cfg = dict(block_m=32, block_n=64, block_k=256, num_warps=4, num_stages=3)
    elif rows_per_group <= 96:
        cfg = dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    cfg["dequant"] = "f32"
    cfg["split_k"] = 1
    cfg["block_k"] = max(min(cfg["block_k"], pl.next_power_of_2(k)), group, 16)
    cfg["block_n"] = min(cfg["block_n"], max(16, pl.next_power_of_2(n)))
    return cfg


def _gpu_kernel(te_ref, r0_ref, r1_ref, x_ref, *refs, bm, bn, bk, group, swiglu, dequant, split_k):
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
        if split_k == 1:
            accs = lax.fori_loop(0, n_steps, step, zeros)
            y = silu_mul(*accs) if swiglu else accs[0]
            plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)], y.astype(o_ref.dtype),
                        mask=row_ok & col_ok)
        else:  # float32 partial sums [split, acc, M, N]; the caller adds them up
            accs = lax.fori_loop(sp * per_split, jnp.minimum((sp + 1) * per_split, n_steps), step, zeros)
            for a, acc in enumerate(accs):
                plgpu.store(o_ref.at[sp, jnp.int32(a), pl.ds(r0, bm), pl.ds(j * bn, bn)], acc,
                            mask=row_ok & col_ok)


def gpu_grouped_call(x, weights, tiles, *, swiglu, block_m, block_n, block_k, num_warps, num_stages,
                     dequant="f32", split_k=1, interpret=False):
    """x [M, K]; weights [(packed [E, N, K8], scale [E, N, G]), ...]; tiles from `gpu_tiles`.

    split_k > 1 splits the K loop over a third grid axis (for few, wide-K matmuls that would not
    fill the GPU otherwise) and reduces the float32 partials in XLA."""
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = weights[0][0].shape[1]
    group = k // weights[0][1].shape[2]
    if block_k % group or block_k % NIBBLES_PER_WORD:
        raise ValueError(f"block_k={block_k} must be a multiple of the group size {group} and of 8")
    split_k = max(1, min(split_k, pl.cdiv(k, block_k)))
    kernel = functools.partial(_gpu_kernel, bm=block_m, bn=block_n, bk=block_k, group=group,
                               swiglu=swiglu, dequant=dequant, split_k=split_k)
    flat = [a for pair in weights for a in pair]
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
        name="int4_swiglu_gpu" if swiglu else "int4_matmul_gpu",
    )(*tiles, x, *flat)
    if split_k == 1:
        return out
    # Rows no tile covers (padding past the groups) hold garbage; grouped callers mask them.
    accs = out.sum(0)
    return (silu_mul(*accs) if swiglu else accs[0]).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# TPU kernel (Pallas Mosaic lowering)


def _tpu_kernel(vg_ref, vb_ref, off_ref, nv_ref, base_ref, x_ref, spread_ref, *refs, bm, k8, swiglu):
    *w_refs, o_ref = refs
    t = pl.program_id(1)

    @pl.when(t < nv_ref[0])
    def _():
        g = vg_ref[t]
        rows = vb_ref[t] * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        mine = (rows >= off_ref[g]) & (rows < off_ref[g + 1])
        x = x_ref[...]  # [bm, 8*k8], plane-major: lane j*k8 + kk holds column 8kk + j
        accs = []
        for p_ref, s_ref in zip(w_refs[::2], w_refs[1::2]):
            planes = dequant_planes_tpu(p_ref[...], s_ref[...], spread_ref[...], x.dtype)
            acc = None
            for j, w in enumerate(planes):
                d = lax.dot_general(x[:, j * k8:(j + 1) * k8], w, DOT_NT, preferred_element_type=jnp.float32)
                acc = d if acc is None else acc + d
            accs.append(acc)
        y = silu_mul(*accs) if swiglu else accs[0]
        o_ref[...] = jnp.where(mine, y.astype(o_ref.dtype), o_ref[...])


def tpu_block_m(rows_per_group: float) -> int:
    # 16 rows fill a bf16 sublane tile; bigger tiles only once groups are big enough to fill them.
    return int(min(256, max(16, pl.next_power_of_2(int(rows_per_group)))))


def tpu_grouped_call(x, weights, group_sizes, *, swiglu, block_m, block_n=512, interpret=False, expert_base=0):
    """x [M, K]; weights [(packed [W, N, K8], scale [W, N, G]), ...]; group_sizes [E] -> [M, N].

    Group g reads weight matrix expert_base + g (W >= E; see grouped_moe.py for why)."""
    from jax.experimental.pallas import tpu as pltpu

    m, k = x.shape
    n, k8 = weights[0][0].shape[1:]
    n_groups = weights[0][1].shape[2]
    group = k // n_groups
    bm = block_m
    m_pad = pl.cdiv(m, bm) * bm
    # Permute x once (cheap: activations) so each weight plane contracts against contiguous lanes.
    x_pm = jnp.pad(x, ((0, m_pad - m), (0, k8 * NIBBLES_PER_WORD - k)))
    x_pm = x_pm.reshape(m_pad, k8, NIBBLES_PER_WORD).swapaxes(1, 2).reshape(m_pad, -1)
    bn = aligned_divisor(n, block_n, 128)
    visits = (*tpu_visits(group_sizes, m, bm), jnp.asarray(expert_base, jnp.int32).reshape(1))
    w_spec = [pl.BlockSpec((None, bn, k8), lambda j, t, vg, vb, off, nv, base: (base[0] + vg[t], j, 0)),
              pl.BlockSpec((None, bn, n_groups), lambda j, t, vg, vb, off, nv, base: (base[0] + vg[t], j, 0))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(n // bn, visits[0].shape[0]),
        in_specs=[pl.BlockSpec((bm, k8 * NIBBLES_PER_WORD), lambda j, t, vg, vb, off, nv, base: (vb[t], 0)),
                  pl.BlockSpec((n_groups, k8), lambda j, t, vg, vb, off, nv, base: (0, 0)),
                  *(w_spec * len(weights))],
        out_specs=pl.BlockSpec((bm, bn), lambda j, t, vg, vb, off, nv, base: (vb[t], j)),
    )
    kernel = functools.partial(_tpu_kernel, bm=bm, k8=k8, swiglu=swiglu)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
        grid_spec=grid_spec,
        # Visits revisit output blocks, so only the column axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=48 * 2**20),
        interpret=interpret,
        name="int4_swiglu_tpu" if swiglu else "int4_matmul_tpu",
    )(*visits, x_pm, spread_matrix(k8, group, weights[0][1].dtype), *[a for p in weights for a in p])
    return out[:m]


# ---------------------------------------------------------------------------------------------


def int4_matmul(x, packed, scale, *, backend: str = "gpu", block_m=None, block_n=None, block_k=None,
                num_warps=None, num_stages=None, dequant=None, split_k=None, interpret=False):
    """Fused W4A16 matmul: x [M, K] @ dequant(packed [N, K8], scale [N, K/g])^T -> [M, N] in x.dtype.

    backend "gpu" (Triton) or "tpu" (Mosaic); block sizes default to `gpu_config` / `tpu_block_m`."""
    m, k = x.shape
    group = k // scale.shape[-1]
    check_supported(backend, k, group)
    weights = [(packed[None], scale[None])]
    sizes = jnp.full((1,), m, jnp.int32)
    if backend == "tpu":
        return tpu_grouped_call(x, weights, sizes, swiglu=False, block_m=block_m or tpu_block_m(m),
                                block_n=block_n or 512, interpret=interpret)
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                 num_stages=num_stages, dequant=dequant, split_k=split_k)
    cfg = gpu_config(m, packed.shape[0], k, group)
    cfg.update({key: v for key, v in given.items() if v is not None})
    if split_k is None:  # one matrix and few rows: split K until the grid can fill the GPU
        programs = pl.cdiv(m, cfg["block_m"]) * pl.cdiv(packed.shape[0], cfg["block_n"])
        cfg["split_k"] = max(1, min(pl.cdiv(k, cfg["block_k"]), GPU_TARGET_PROGRAMS // programs))
    return gpu_grouped_call(x, weights, gpu_tiles(sizes, m, cfg["block_m"]), swiglu=False,
                            interpret=interpret, **cfg)
