"""Grouped INT4 MoE matmuls over rows already sorted by expert, with their XLA references.

  grouped_int4_swiglu(x [M, K], gate (packed [W, I, K/8], scale [W, I, K/g]), up (same), sizes [E])
      -> silu(x @ Wg[e]^T) * (x @ Wu[e]^T) [M, I], row r using the expert e whose run holds r
  grouped_int4_matmul(h [M, I], packed [W, D, I/8], scale [W, D, I/g], sizes [E]) -> [M, D]

Group e uses weight matrix `expert_base + e` of the W >= E given. A model passes the experts of
*all* its layers, flattened to [layers * E, ...], with expert_base = layer * E: selecting a layer by
slicing would make XLA copy that layer's whole expert slab (8.4 GB for K2) before the kernel could
read it, on every decode step; the kernel instead reads only the rows it needs out of the stack.

The references also read the "tpu" layout (layout.py; `layout="tpu"`, kernels in int4_tpu.py).
Rows past sum(sizes) are padding and come back as zeros. The kernels (int4_matmul.py) read each
selected expert's weights once per row tile and never touch experts with no rows. The references
loop over the same group-aligned row tiles, dequantizing one expert at a time: they are the CPU
production path, so they must never hold all experts dequantized (K2: 2 TB in bf16).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.dequant import check_supported
from kernels_pallas.int4_matmul import (
    DOT_NT,
    gpu_config,
    gpu_grouped_call,
    gpu_tiles,
    silu_mul,
    tpu_block_m,
    tpu_grouped_call,
)
from kernels_pallas.layout import dequantize, features

__all__ = ["grouped_int4_swiglu", "grouped_int4_matmul", "grouped_int4_swiglu_ref",
           "grouped_int4_matmul_ref"]


def _rows_per_group(m: int, n_exp: int) -> float:
    """Expected rows per selected expert: static, so block sizes can depend on it."""
    return m / max(1, min(n_exp, m))


def _mask_padding(out, group_sizes):
    rows = lax.broadcasted_iota(jnp.int32, (out.shape[0], 1), 0)
    return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


# ---------------------------------------------------------------------------------------------
# References (pure jnp)


def _grouped_ref(x, weights, group_sizes, swiglu, expert_base=0, layout="ct"):
    weights = [(jnp.asarray(p), jnp.asarray(s)) for p, s in weights]
    m, k = x.shape
    n = features(*weights[0], layout)[0]
    bm = int(min(256, max(8, pl.next_power_of_2(int(-(-m // max(1, min(group_sizes.shape[0], m))))))))
    experts, first, end = gpu_tiles(group_sizes, m, bm)
    x_pad = jnp.pad(x, ((0, bm), (0, 0)))  # a tile may run past row m; keep its window in bounds

    def tile(t, out):
        e, r0, r1 = experts[t] + expert_base, first[t], end[t]

        def compute(out):
            xs = lax.dynamic_slice_in_dim(x_pad, r0, bm)
            ys = [lax.dot_general(xs, dequantize(p[e], s[e], layout, x.dtype, k), DOT_NT,
                                  preferred_element_type=jnp.float32) for p, s in weights]
            y = (silu_mul(*ys) if swiglu else ys[0]).astype(out.dtype)
            mine = r0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < r1
            old = lax.dynamic_slice_in_dim(out, r0, bm)
            return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), r0, 0)

        return lax.cond(r0 < r1, compute, lambda o: o, out)

    out = lax.fori_loop(0, experts.shape[0], tile, jnp.zeros((m + bm, n), x.dtype))
    return out[:m]


def grouped_int4_swiglu_ref(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, expert_base=0,
                            layout="ct"):
    return _grouped_ref(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                        expert_base=expert_base, layout=layout)


def grouped_int4_matmul_ref(h, packed, scale, group_sizes, expert_base=0, layout="ct"):
    return _grouped_ref(h, [(packed, scale)], group_sizes, swiglu=False, expert_base=expert_base, layout=layout)


# ---------------------------------------------------------------------------------------------
# Kernels


def _grouped(x, weights, group_sizes, *, swiglu, backend, interpret, expert_base=0, **overrides):
    m, k = x.shape
    n_exp, n = group_sizes.shape[0], weights[0][0].shape[1]
    group = k // weights[0][1].shape[2]
    check_supported(backend, k, group)
    rows = _rows_per_group(m, n_exp)
    overrides = {key: v for key, v in overrides.items() if v is not None}
    if backend == "tpu":
        out = tpu_grouped_call(x, weights, group_sizes, swiglu=swiglu, expert_base=expert_base,
                               block_m=overrides.get("block_m") or tpu_block_m(rows),
                               block_n=overrides.get("block_n") or 512, interpret=interpret)
    else:
        cfg = {**gpu_config(rows, n, k, group), **overrides}
        e, r0, r1 = gpu_tiles(group_sizes, m, cfg["block_m"])
        tiles = (e + jnp.asarray(expert_base, jnp.int32), r0, r1)
        out = gpu_grouped_call(x, weights, tiles, swiglu=swiglu, interpret=interpret, **cfg)
    return _mask_padding(out, group_sizes)


def grouped_int4_swiglu(x, gate_packed, gate_scale, up_packed, up_scale, group_sizes, *, backend="gpu",
                        block_m=None, block_n=None, block_k=None, num_warps=None, num_stages=None,
                        dequant=None, split_k=None, interpret=False, expert_base=0):
    """silu(x @ Wg^T) * (x @ Wu^T) per row's expert; one kernel reads gate and up side by side.

    Block sizes / warps / stages / dequant mode default to `gpu_config` (GPU) or `tpu_block_m`."""
    return _grouped(x, [(gate_packed, gate_scale), (up_packed, up_scale)], group_sizes, swiglu=True,
                    backend=backend, interpret=interpret, expert_base=expert_base, block_m=block_m, block_n=block_n, block_k=block_k,
                    num_warps=num_warps, num_stages=num_stages, dequant=dequant, split_k=split_k)


def grouped_int4_matmul(h, packed, scale, group_sizes, *, backend="gpu", block_m=None, block_n=None,
                        block_k=None, num_warps=None, num_stages=None, dequant=None, split_k=None,
                        interpret=False, expert_base=0):
    """h @ W^T per row's expert (the down projection)."""
    return _grouped(h, [(packed, scale)], group_sizes, swiglu=False, backend=backend, interpret=interpret,
                    expert_base=expert_base,
                    block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                    num_stages=num_stages, dequant=dequant, split_k=split_k)
