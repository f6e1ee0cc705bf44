"""W4A16 matmul y = x @ W^T with the INT4 dequant fused in: the XLA reference and the TPU (Mosaic) kernel.

The GPU kernels live in int4_gpu.py. Weights stay in the checkpoint layout: packed [E, N, K/8] int32,
scale [E, N, K/g]; the dense matmul is the grouped one with a single group holding every row.

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

from kernels_pallas.dequant import aligned_divisor, check_supported, dequant_planes_tpu, spread_matrix
from kernels_pallas.grouped_moe import DOT_NT, mask_padding_rows, rows_per_expert, silu_mul
from kernels_pallas.int4 import NIBBLES_PER_WORD
from kernels_pallas.layout import dequantize

__all__ = ["int4_matmul_ref", "int4_matmul_tpu", "grouped_int4_swiglu_tpu", "grouped_int4_matmul_tpu",
           "tpu_visits"]


def int4_matmul_ref(x, packed, scale, *, layout="ct"):
    """x [M, K] @ W^T for W = dequant(packed [N, K8], scale [N, K/g]) -> [M, N] in x.dtype (pure jnp).
    `layout`: where packed and scale keep the words (layout.py; "tpu": [K8, N] and [K/g, N])."""
    w = dequantize(packed, scale, layout, x.dtype, x.shape[-1])
    return lax.dot_general(x, w, DOT_NT, preferred_element_type=jnp.float32).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Visit metadata (jnp; tiny arrays, computed on device so group sizes can be traced values).


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
# TPU kernel (Pallas Mosaic lowering)


def _tpu_kernel(vg_ref, vb_ref, off_ref, nv_ref, x_ref, spread_ref, *refs, bm, k8, swiglu):
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


def tpu_grouped_call(x, weights, group_sizes, *, swiglu, block_m, block_n=512, interpret=False):
    """x [M, K]; weights [(packed [E, N, K8], scale [E, N, G]), ...]; group_sizes [E] -> [M, N]."""
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
    visits = tpu_visits(group_sizes, m, bm)
    w_spec = [pl.BlockSpec((None, bn, k8), lambda j, t, vg, vb, off, nv: (vg[t], j, 0)),
              pl.BlockSpec((None, bn, n_groups), lambda j, t, vg, vb, off, nv: (vg[t], j, 0))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(visits),
        grid=(n // bn, visits[0].shape[0]),
        in_specs=[pl.BlockSpec((bm, k8 * NIBBLES_PER_WORD), lambda j, t, vg, vb, off, nv: (vb[t], 0)),
                  pl.BlockSpec((n_groups, k8), lambda j, t, vg, vb, off, nv: (0, 0)),
                  *(w_spec * len(weights))],
        out_specs=pl.BlockSpec((bm, bn), lambda j, t, vg, vb, off, nv: (vb[t], j)),
    )
    kernel = functools.partial(_tpu_kernel, bm=bm, k8=k8, swiglu=swiglu)
    out = tpu_visit_call(kernel, grid_spec, jax.ShapeDtypeStruct((m_pad, n), x.dtype), interpret=interpret,
                         name="int4_swiglu_tpu" if swiglu else "int4_matmul_tpu",
                         )(*visits, x_pm, spread_matrix(k8, group, weights[0][1].dtype), *[a for p in weights for a in p])
    return out[:m]


def tpu_visit_call(kernel, grid_spec, out_shape, *, interpret, name: str):
    """The pallas_call of a TPU kernel whose grid is (column block, visit) over `tpu_visits`."""
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=grid_spec,
        # Visits revisit output blocks, so only the column axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=48 * 2**20),
        interpret=interpret, name=name)


# ---------------------------------------------------------------------------------------------
# Entry points (`interpret`: False, or a `pltpu.InterpretParams` to run on any platform)


def _grouped_tpu(x, weights, group_sizes, *, swiglu, block_m, block_n, interpret):
    k = x.shape[1]
    check_supported("tpu", k, k // weights[0][1].shape[2])
    bm = block_m or tpu_block_m(rows_per_expert(x.shape[0], group_sizes.shape[0]))
    out = tpu_grouped_call(x, weights, group_sizes, swiglu=swiglu, block_m=bm, block_n=block_n or 512,
                           interpret=interpret)
    return mask_padding_rows(out, group_sizes)


def int4_matmul_tpu(x, packed, scale, *, block_m=None, block_n=None, interpret=False):
    """`int4_matmul_ref` as one Mosaic kernel: x [M, K], packed [N, K/8], scale [N, K/g] -> [M, N]."""
    sizes = jnp.full((1,), x.shape[0], jnp.int32)
    return _grouped_tpu(x, [(packed[None], scale[None])], sizes, swiglu=False,
                        block_m=block_m or tpu_block_m(x.shape[0]), block_n=block_n, interpret=interpret)


def grouped_int4_swiglu_tpu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, block_m=None,
                            block_n=None, interpret=False):
    """`grouped_int4_swiglu_ref` as one Mosaic kernel reading gate and up side by side."""
    return _grouped_tpu(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                        block_m=block_m, block_n=block_n, interpret=interpret)


def grouped_int4_matmul_tpu(h, packed, scale, group_sizes, *, block_m=None, block_n=None, interpret=False):
    """`grouped_int4_matmul_ref` as one Mosaic kernel."""
    return _grouped_tpu(h, [(packed, scale)], group_sizes, swiglu=False, block_m=block_m, block_n=block_n,
                        interpret=interpret)
