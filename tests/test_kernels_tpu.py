"""The Mosaic INT4 expert kernels over packing "tpu" (experts_tpu.py), in TPU interpret mode on CPU.

Interpret mode simulates VMEM and DMA and poisons uninitialized memory; it costs ~15 ms per grid
point, so grids stay at a handful of points: one or two 128-column blocks, row blocks of 8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import experts_tpu, ops
from kernels_pallas.experts_tpu import grouped_int4_matmul_tpu, grouped_int4_swiglu_tpu
from kernels_pallas.experts_xla import grouped_int4_matmul_ref, grouped_int4_swiglu_ref
from kernels_pallas.int4_ct import quantize_int4
from kernels_pallas.int4_packing import dequantize, to_packing

INTERPRET = pltpu.InterpretParams()
SIZES = [3, 0, 17, 1, 0]  # empty experts, a run straddling 8-row blocks, 3 padding rows (M = 24)


def tpu_weights(rng, shape, group=32, poison=()):
    """(ct, tpu) arrays of random weights; experts in `poison` get NaN scales (must never be read)."""
    packed, scale = quantize_int4(rng.normal(size=shape).astype(np.float32) * 0.05, group)
    scale = np.asarray(scale)
    for e in poison:
        scale[e] = np.nan
    ct = (jnp.asarray(packed), jnp.asarray(scale))
    return ct, to_packing(*ct, "tpu")


def activations(rng, shape):
    return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def exact_oracle(x, weights, sizes, swiglu):
    """Each row times its expert's dequantized weights, in float64 (the weights unrounded)."""
    rows = int(np.sum(sizes))
    expert = np.repeat(np.arange(len(sizes)), sizes)
    xs = np.asarray(x, np.float64)[:rows]
    outs = [np.einsum("mk,mnk->mn", xs, np.asarray(dequantize(p, s, "ct", jnp.float32), np.float64)[expert])
            for p, s in weights]
    return outs[0] / (1 + np.exp(-outs[0])) * outs[1] if swiglu else outs[0]


def assert_close(got, want, tol=1e-2):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < tol, err


@pytest.fixture(scope="module")
def moe_case():
    rng = np.random.default_rng(5)
    empty = [e for e, n in enumerate(SIZES) if n == 0]
    gate, up = (tpu_weights(rng, (len(SIZES), 128, 256), poison=empty) for _ in range(2))
    down = tpu_weights(rng, (len(SIZES), 256, 512), poison=empty)  # 2 column slabs, 2 tiles of 8 groups
    return activations(rng, (24, 256)), gate, up, down, jnp.asarray(SIZES, jnp.int32)


@pytest.mark.parametrize("scale_after,depth", [(True, 128), (True, 256), (False, 128)])
def test_grouped_swiglu_reads_the_tpu_packing_like_the_reference(moe_case, monkeypatch, scale_after, depth):
    # depth: the MXU depth decides how a tile splits into sub-tiles for the block-diagonal x.
    monkeypatch.setattr(experts_tpu, "mxu_depth", lambda: depth)
    x, (gate_ct, gate), (up_ct, up), _, sizes = moe_case
    got = grouped_int4_swiglu_tpu(x, *gate, *up, sizes, scale_after=scale_after, interpret=INTERPRET)
    assert got.shape == (24, 128) and got.dtype == x.dtype
    rows = sum(SIZES)
    want = grouped_int4_swiglu_ref(x, *gate, *up, sizes, packing="tpu")
    np.testing.assert_array_equal(np.asarray(want), np.asarray(grouped_int4_swiglu_ref(x, *gate_ct, *up_ct, sizes)))
    assert_close(got[:rows], want[:rows])
    assert_close(got[:rows], exact_oracle(x, [gate_ct, up_ct], SIZES, True))
    np.testing.assert_array_equal(np.asarray(got[rows:], np.float32), 0.0)


@pytest.mark.parametrize("scale_after", [True, False])
def test_down_projection_over_several_tiles_and_column_slabs(moe_case, scale_after):
    x, _, _, (down_ct, down), sizes = moe_case
    h = jnp.concatenate([x, x[::-1]], axis=1)  # K = 512
    got = grouped_int4_matmul_tpu(h, *down, sizes, block_n=256, scale_after=scale_after, interpret=INTERPRET)
    rows = sum(SIZES)
    assert_close(got[:rows], grouped_int4_matmul_ref(h, *down, sizes, packing="tpu")[:rows])
    assert_close(got[:rows], exact_oracle(h, [down_ct], SIZES, False))
    np.testing.assert_array_equal(np.asarray(got[rows:], np.float32), 0.0)


def test_rows_of_no_expert_come_back_as_zeros(moe_case):
    x, _, _, (_, down), _ = moe_case
    h = jnp.concatenate([x, x], axis=1)
    got = grouped_int4_matmul_tpu(h[:8], *down, jnp.zeros((5,), jnp.int32), interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(got, np.float32), 0.0)


def test_kernels_refuse_arrays_that_are_not_in_the_tpu_packing(moe_case):
    x, (gate_ct, gate), _, _, sizes = moe_case
    with pytest.raises(ValueError, match="packing 'tpu'"):
        grouped_int4_matmul_tpu(x, *gate_ct, sizes, interpret=INTERPRET)  # checkpoint orientation
    narrow = tpu_weights(np.random.default_rng(0), (5, 40, 256))[1]
    with pytest.raises(ValueError, match="multiple of 128"):
        grouped_int4_matmul_tpu(x, *narrow, sizes, interpret=INTERPRET)
    with pytest.raises(ValueError, match="input features"):
        grouped_int4_matmul_tpu(x[:, :128], *gate, sizes, interpret=INTERPRET)


def test_block_sizes_follow_rows_per_expert_and_weight_bytes():
    assert experts_tpu.block_m_for(1) == 8 and experts_tpu.block_m_for(20) == 32
    assert experts_tpu.block_m_for(5000) == 256
    # K2 gate/up (K/8 = 896 words): ~2 MiB blocks, split for the two TensorCores of a v5p chip
    # only while each half keeps 1 MiB; down_proj under tensor=8 (K/8 = 32) keeps all 7168 columns.
    assert experts_tpu.block_n_for(2048, 896) == 512
    assert experts_tpu.block_n_for(256, 896) == 256
    assert experts_tpu.block_n_for(7168, 32) == 7168
    assert experts_tpu.block_n_for(7168, 256) == 1792  # down_proj unsharded: 4 blocks of 14 column slabs


def test_ops_pick_the_kernel_by_packing_and_fall_back_where_none_reads_it(moe_case):
    x, (gate_ct, gate), (up_ct, up), _, sizes = moe_case
    swiglu = ops.grouped_int4_swiglu
    assert swiglu.choose("pallas_tpu", x, *gate, *up, sizes, packing="tpu")[1] is not swiglu.reference
    # No TPU kernel reads the checkpoint's packing, no GPU kernel the TPU's: the reference runs.
    assert swiglu.choose("pallas_tpu", x, *gate_ct, *up_ct, sizes)[0] == "xla"
    assert swiglu.choose("pallas_gpu", x, *gate, *up, sizes, packing="tpu")[0] == "xla"
    narrow = tpu_weights(np.random.default_rng(0), (5, 40, 256))[1]
    assert swiglu.choose("pallas_tpu", x, *narrow, *narrow, sizes, packing="tpu")[0] == "xla"

    @jax.jit
    def moe(x):
        return swiglu(x, *gate, *up, sizes, packing="tpu", impl="interpret_tpu")

    rows = sum(SIZES)
    direct = grouped_int4_swiglu_tpu(x, *gate, *up, sizes, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(moe(x)[:rows], np.float32), np.asarray(direct[:rows], np.float32))
    fallback = swiglu(x, *gate, *up, sizes, packing="tpu", impl="interpret_gpu")
    np.testing.assert_array_equal(np.asarray(fallback), np.asarray(grouped_int4_swiglu_ref(x, *gate_ct, *up_ct, sizes)))
