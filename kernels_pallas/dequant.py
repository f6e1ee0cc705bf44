"""INT4 -> float dequantization as Pallas kernels (GPU Triton and TPU Mosaic), beside the reference.

Also home of the two tile-level dequant routines the fused matmuls reuse:
  * `dequant_tile_gpu`: packed [bn, bk/8] + scale [bn, bk/g] -> weights [bn, bk] in column order.
    Triton handles the [bn, bk/8, 8] -> [bn, bk] merge (the same join+reshape its own int4 loads
    use), so x and the output keep the checkpoint's column order.
  * `dequant_planes_tpu`: interleaving lanes is a relayout on TPU, so it yields 8 *planes*
    w_j[n, kk] = W[n, 8kk + j] and lets callers permute the small operand (x) instead. The per-group
    scale is spread onto the plane lanes by a matmul with a 0/1 matrix, which the MXU does exactly
    (one nonzero term per output).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.int4 import NIBBLES_PER_WORD

__all__ = ["dequantize_int4_gpu", "dequantize_int4_tpu", "dequant_tile_gpu", "dequant_planes_tpu",
           "check_supported", "unsupported_reason"]

_MAGIC_F32 = 0x4B000000  # float32 2**23: OR-ing a nibble u into its mantissa gives 2**23 + u exactly
_MAGIC_BF16 = 0x4300  # bfloat16 128: likewise 128 + u, exact for u < 16


def gpu_supports(k: int, group: int) -> bool:
    """Triton tensors have power-of-two shapes, so a tile must hold whole power-of-two groups, and
    the GEMV kernel reads whole packed words per group."""
    return group >= NIBBLES_PER_WORD and k % group == 0 and group & (group - 1) == 0


def tpu_supports(k: int, group: int) -> bool:
    """The plane layout needs each packed word to sit inside one group."""
    return group > 0 and k % group == 0 and group % NIBBLES_PER_WORD == 0


_SUPPORTS = {"gpu": (gpu_supports, "a power-of-two group size of at least 8 dividing k"),
             "tpu": (tpu_supports, "a group size dividing k that is a multiple of 8")}


def unsupported_reason(backend: str, k: int, group: int) -> str | None:
    """Why the `backend` kernels cannot take inputs of width k in groups of `group`, or None."""
    if backend not in _SUPPORTS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(_SUPPORTS)}")
    ok, need = _SUPPORTS[backend]
    return None if ok(k, group) else f"the {backend} kernels need {need}; got k={k}, group size {group}"


def check_supported(backend: str, k: int, group: int):
    """Raise ValueError naming the requirement when the `backend` kernels cannot take this shape."""
    reason = unsupported_reason(backend, k, group)
    if reason:
        raise ValueError(reason)


def dequant_tile_gpu(p, s, *, group: int, dtype, mode: str = "f32"):
    """p int32 [bn, w], s [bn, 8w/group] -> [bn, 8w] in `dtype` (checkpoint column order).

    No int->float conversion instruction: NVIDIA GPUs issue conversions at a small fraction of the
    FMA rate, enough to bound a memory-bound kernel. The nibble goes into a float mantissa instead
    (exact), and the product is rounded once to the scale's dtype, matching the reference bit for bit.
    mode "f32": float32 math on a [bn, w, 8] broadcast; "bf16": the same with bf16 math (128 + u
    is exact in bf16); "join": eight [bn, w] planes interleaved by Triton joins."""
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


def spread_matrix(k8: int, group: int, dtype) -> jax.Array:
    """0/1 [k/group, k8]: entry (g, kk) is 1 when packed word kk lies in group g."""
    g = lax.broadcasted_iota(jnp.int32, (k8 * NIBBLES_PER_WORD // group, k8), 0)
    kk = lax.broadcasted_iota(jnp.int32, (k8 * NIBBLES_PER_WORD // group, k8), 1)
    return (kk // (group // NIBBLES_PER_WORD) == g).astype(dtype)


def dequant_planes_tpu(p, s, spread, dtype):
    """p int32 [bn, k8], s [bn, G], spread [G, k8] -> 8 planes [bn, k8]; plane j holds columns 8kk+j."""
    # Mosaic accepts fp32 contract precision only on f32 operands; with a 0/1 spread matrix the
    # f32 product reproduces every scale exactly.
    s_lanes = lax.dot(s.astype(jnp.float32), spread.astype(jnp.float32), precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
    planes = []
    for j in range(NIBBLES_PER_WORD):
        q = ((p >> (4 * j)) & 0xF) - 8
        planes.append((q.astype(jnp.float32) * s_lanes).astype(s.dtype).astype(dtype))
    return planes


def aligned_divisor(n: int, target: int, align: int) -> int:
    """Largest multiple of `align` that divides n and is <= target, else n (whole-dim blocks are
    always legal on TPU, where a block must be a multiple of the (8, 128) tile or the full dim)."""
    for b in range(min(target, n) // align * align, 0, -align):
        if n % b == 0:
            return b
    return n


# ---------------------------------------------------------------------------------------------
# GPU (Triton): grid over (row blocks, column blocks); masks handle ragged edges.


def _dequant_gpu_kernel(p_ref, s_ref, o_ref, *, bn, bk, group, rows, k):
    from jax.experimental.pallas import triton as plgpu

    i, c = pl.program_id(0), pl.program_id(1)
    r = i * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
    wcol = c * (bk // 8) + lax.broadcasted_iota(jnp.int32, (1, bk // 8), 1)
    gcol = c * (bk // group) + lax.broadcasted_iota(jnp.int32, (1, bk // group), 1)
    col = c * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    p = plgpu.load(p_ref.at[pl.ds(i * bn, bn), pl.ds(c * (bk // 8), bk // 8)],
                   mask=(r < rows) & (wcol < p_ref.shape[1]), other=0)
    s = plgpu.load(s_ref.at[pl.ds(i * bn, bn), pl.ds(c * (bk // group), bk // group)],
                   mask=(r < rows) & (gcol < s_ref.shape[1]), other=0)
    w = dequant_tile_gpu(p, s, group=group, dtype=o_ref.dtype)
    plgpu.store(o_ref.at[pl.ds(i * bn, bn), pl.ds(c * bk, bk)], w, mask=(r < rows) & (col < k))


def _dequant_gpu(p2, s2, k, group, dtype, interpret, block_rows=32, block_k=512):
    from jax.experimental.pallas import triton as plgpu

    rows = p2.shape[0]
    bk = max(min(block_k, pl.next_power_of_2(k)), group, NIBBLES_PER_WORD)
    kernel = functools.partial(_dequant_gpu_kernel, bn=block_rows, bk=bk, group=group, rows=rows, k=k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, k), dtype),
        grid=(pl.cdiv(rows, block_rows), pl.cdiv(k, bk)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="int4_dequant_gpu",
    )(p2, s2)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic): one block = `block_rows` whole rows; the output is plane-major [8, rows, k8] so each
# plane is one aligned store, and XLA interleaves the planes afterwards.


def _dequant_tpu_kernel(p_ref, s_ref, spread_ref, o_ref):
    planes = dequant_planes_tpu(p_ref[...], s_ref[...], spread_ref[...], o_ref.dtype)
    for j, w in enumerate(planes):
        o_ref[j] = w


def _dequant_tpu(p2, s2, k, group, dtype, interpret, block_rows=256):
    from jax.experimental.pallas import tpu as pltpu

    rows, k8 = p2.shape
    n_groups = s2.shape[1]
    bn = aligned_divisor(rows, block_rows, 8)
    planes = pl.pallas_call(
        _dequant_tpu_kernel,
        out_shape=jax.ShapeDtypeStruct((NIBBLES_PER_WORD, rows, k8), dtype),
        grid=(rows // bn,),
        in_specs=[pl.BlockSpec((bn, k8), lambda i: (i, 0)),
                  pl.BlockSpec((bn, n_groups), lambda i: (i, 0)),
                  pl.BlockSpec((n_groups, k8), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((NIBBLES_PER_WORD, bn, k8), lambda i: (0, i, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="int4_dequant_tpu",
    )(p2, s2, spread_matrix(k8, group, s2.dtype))
    return planes.transpose(1, 2, 0).reshape(rows, k8 * NIBBLES_PER_WORD)[:, :k]


def _dequantize(kernel, backend, packed, scale, k, dtype, interpret):
    """Flatten the leading dims to rows, run `kernel` on [rows, K8] / [rows, G], restore them."""
    lead = packed.shape[:-1]
    group = k // scale.shape[-1]
    check_supported(backend, k, group)
    p2 = packed.reshape(-1, packed.shape[-1])
    s2 = scale.reshape(-1, scale.shape[-1])
    return kernel(p2, s2, k, group, dtype, interpret).reshape(*lead, k)


def dequantize_int4_gpu(packed, scale, k: int, dtype=jnp.bfloat16, *, interpret=False):
    """Triton dequant: packed [..., N, K8] int32, scale [..., N, G] -> [..., N, k] in `dtype`,
    bit-identical to `dequantize_int4_ref`. `interpret=True` runs it on any platform."""
    return _dequantize(_dequant_gpu, "gpu", packed, scale, k, dtype, interpret)


def dequantize_int4_tpu(packed, scale, k: int, dtype=jnp.bfloat16, *, interpret=False):
    """Mosaic dequant, as `dequantize_int4_gpu`; `interpret` takes a `pltpu.InterpretParams`."""
    return _dequantize(_dequant_tpu, "tpu", packed, scale, k, dtype, interpret)
