"""Every INT4 Pallas kernel, in interpret mode on CPU, against its pure-jnp reference.

"gpu" runs the Triton-flavoured kernel under the generic interpreter; "tpu" runs the Mosaic kernel
under TPU interpret mode (simulated VMEM/DMA, uninitialized memory poisoned with NaN). Grids stay at
a handful of points; shapes are deliberately not multiples of the block sizes and some groups are
empty. Data is random and never zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import ops
from kernels_pallas.dequant import dequantize_int4
from kernels_pallas.grouped_moe import (
    grouped_int4_matmul,
    grouped_int4_matmul_ref,
    grouped_int4_swiglu,
    grouped_int4_swiglu_ref,
)
from kernels_pallas.int4 import dequantize_int4_ref, quantize_int4
from kernels_pallas.int4_matmul import gpu_tiles, int4_matmul, int4_matmul_ref, tpu_visits

BACKENDS = {"gpu": True, "tpu": pltpu.InterpretParams()}


def int4_weights(rng, shape, group=32):
    packed, scale = quantize_int4(rng.normal(size=shape).astype(np.float32) * 0.05, group)
    return jnp.asarray(packed), jnp.asarray(scale)


def activations(rng, shape):
    return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def assert_close(got, want, tol=1e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < tol, err


def dense_oracle(x, weights, sizes, swiglu):
    """Per row: dequantize its expert in numpy and multiply (float32), the semantics by definition."""
    rows = int(np.sum(sizes))
    expert = np.repeat(np.arange(len(sizes)), sizes)
    xs = np.asarray(x, np.float32)[:rows]
    outs = []
    for packed, scale in weights:
        w = np.asarray(dequantize_int4_ref(packed, scale, x.shape[1], jnp.bfloat16), np.float32)[expert]
        outs.append(np.einsum("mk,mnk->mn", xs, w))
    if swiglu:
        g, u = outs
        return g / (1 + np.exp(-g)) * u
    return outs[0]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("shape,group", [((3, 20, 96), 32), ((40, 64), 8)])
def test_dequant_kernel_is_bit_exact(backend, shape, group):
    rng = np.random.default_rng(len(shape) + group)
    packed, scale = int4_weights(rng, shape, group)
    got = dequantize_int4(packed, scale, k=shape[-1], dtype=jnp.bfloat16, backend=backend,
                          interpret=BACKENDS[backend])
    want = dequantize_int4_ref(packed, scale, shape[-1], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


@pytest.mark.parametrize("mode", ["bf16", "join"])
def test_gpu_dequant_variants_give_the_same_weights(mode):
    from kernels_pallas.dequant import dequant_tile_gpu

    rng = np.random.default_rng(7)
    packed, scale = int4_weights(rng, (16, 128))
    want = dequant_tile_gpu(packed, scale, group=32, dtype=jnp.bfloat16, mode="f32")
    got = dequant_tile_gpu(packed, scale, group=32, dtype=jnp.bfloat16, mode=mode)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    ref = dequantize_int4_ref(packed, scale, 128, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(want).view(np.uint16), np.asarray(ref).view(np.uint16))


@pytest.mark.parametrize("backend,kwargs", [
    ("gpu", {}),
    ("gpu", dict(block_m=16, block_n=16, block_k=64)),  # several K steps and column blocks
    ("gpu", dict(block_k=64, split_k=3)),
    ("tpu", {}),
])
def test_int4_matmul(backend, kwargs):
    rng = np.random.default_rng(11)
    m, n, k = 21, 40, 256
    packed, scale = int4_weights(rng, (n, k))
    x = activations(rng, (m, k))
    got = int4_matmul(x, packed, scale, backend=backend, interpret=BACKENDS[backend], **kwargs)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert_close(got, int4_matmul_ref(x, packed, scale))
    oracle = dense_oracle(x, [(packed[None], scale[None])], [m], False)
    assert_close(int4_matmul_ref(x, packed, scale), oracle)


SIZES = [3, 0, 17, 1, 0]  # empty experts, a group straddling a 16-row block, 3 padding rows (M = 24)


def grouped_case(rng, n_out, k, poison_empty=True):
    e = len(SIZES)
    weights = [int4_weights(rng, (e, n_out, k)) for _ in range(2)]
    if poison_empty:  # an expert without rows must not be read: NaN scales would show if it were
        empty = np.asarray(SIZES) == 0
        weights = [(p, jnp.where(empty[:, None, None], jnp.nan, s).astype(s.dtype)) for p, s in weights]
    return activations(rng, (24, k)), weights, jnp.asarray(SIZES, jnp.int32)


@pytest.mark.parametrize("backend,kwargs", [("gpu", {}), ("gpu", dict(block_n=16, block_k=32)), ("tpu", {})])
def test_grouped_swiglu(backend, kwargs):
    rng = np.random.default_rng(5)
    x, [(gp, gs), (up, us)], sizes = grouped_case(rng, 40, 96)
    got = grouped_int4_swiglu(x, gp, gs, up, us, sizes, backend=backend, interpret=BACKENDS[backend],
                              **kwargs)
    want = grouped_int4_swiglu_ref(x, gp, gs, up, us, sizes)
    rows = sum(SIZES)
    assert_close(got[:rows], want[:rows])
    np.testing.assert_array_equal(np.asarray(got[rows:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(want[rows:], np.float32), 0.0)
    assert_close(want[:rows], dense_oracle(x, [(gp, gs), (up, us)], SIZES, True))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_grouped_matmul(backend):
    rng = np.random.default_rng(6)
    h, [(dp, ds), _], sizes = grouped_case(rng, 72, 64)
    got = grouped_int4_matmul(h, dp, ds, sizes, backend=backend, interpret=BACKENDS[backend])
    want = grouped_int4_matmul_ref(h, dp, ds, sizes)
    rows = sum(SIZES)
    assert_close(got[:rows], want[:rows])
    np.testing.assert_array_equal(np.asarray(got[rows:], np.float32), 0.0)
    assert_close(want[:rows], dense_oracle(h, [(dp, ds)], SIZES, False))


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu", "interpret_tpu"])
def test_expert_base_reads_one_layer_out_of_a_stack_of_layers(impl):
    # Layer 1 of 3 stacked layers, chosen by a traced base: the other layers' NaN scales must never
    # be read, and the result equals running that layer's experts on their own.
    rng = np.random.default_rng(14)
    x, layer, sizes = grouped_case(rng, 32, 64)
    e = len(SIZES)
    stack = [(jnp.concatenate([jnp.zeros_like(p)] + [p] + [jnp.zeros_like(p)]),
              jnp.concatenate([jnp.full_like(s, jnp.nan), s, jnp.full_like(s, jnp.nan)])) for p, s in layer]
    (gp, gs), (up, us) = stack

    @jax.jit
    def run(x, base):
        return ops.grouped_int4_swiglu(x, gp, gs, up, us, sizes, expert_base=base, impl=impl)

    rows = sum(SIZES)
    want = grouped_int4_swiglu_ref(x, *layer[0], *layer[1], sizes)
    assert_close(run(x, jnp.int32(e))[:rows], want[:rows])
    dp, ds = int4_weights(rng, (2 * e, 48, 32))  # down projection of two stacked layers, the second used
    got = ops.grouped_int4_matmul(want, dp, ds, sizes, expert_base=e, impl=impl)
    assert_close(got[:rows], grouped_int4_matmul_ref(want, dp[e:], ds[e:], sizes)[:rows])


def test_all_rows_in_one_expert_and_no_rows_at_all():
    rng = np.random.default_rng(8)
    e, n, k = 3, 24, 64
    dp, ds = int4_weights(rng, (e, n, k))
    h = activations(rng, (20, k))
    for sizes in ([0, 20, 0], [0, 0, 0]):
        sizes = jnp.asarray(sizes, jnp.int32)
        want = grouped_int4_matmul_ref(h, dp, ds, sizes)
        got = grouped_int4_matmul(h, dp, ds, sizes, interpret=True)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=2e-2, rtol=2e-2)


def test_reference_never_dequantizes_all_experts_at_once():
    e, n, k = 7, 24, 96  # distinct sizes, so an [e, n, k] value would be recognisable in the jaxpr
    rng = np.random.default_rng(9)
    x, [(gp, gs), (up, us)], sizes = grouped_case(rng, n, k, poison_empty=False)
    gp, gs, up, us = (jnp.concatenate([a, a[:2]]) for a in (gp, gs, up, us))
    sizes = jnp.asarray(SIZES + [2, 1], jnp.int32)
    assert gp.shape[0] == e
    text = str(jax.make_jaxpr(grouped_int4_swiglu_ref)(x, gp, gs, up, us, sizes))
    assert f"[{e},{n},{k}]" not in text and f"[{e},{n},{k // 32},32]" not in text


@pytest.mark.parametrize("seed", range(3))
def test_tile_metadata_covers_each_row_once_and_skips_empty_experts(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, 9) * (rng.random(9) < 0.6)
    m = int(sizes.sum()) + 5
    e, r0, r1 = (np.asarray(a) for a in gpu_tiles(jnp.asarray(sizes, jnp.int32), m, 16))
    owner = np.full(m, -1)
    for ei, a, b in zip(e, r0, r1):
        assert b - a <= 16
        assert np.all(owner[a:b] == -1)
        owner[a:b] = ei
    np.testing.assert_array_equal(owner[: sizes.sum()], np.repeat(np.arange(9), sizes))
    assert set(e[r1 > r0]) == set(np.flatnonzero(sizes))
    g, b, offsets, count = (np.asarray(a) for a in tpu_visits(jnp.asarray(sizes, jnp.int32), m, 16))
    real = [(gi, bi) for gi, bi in zip(g[: count[0]], b[: count[0]])]
    expect = [(gi, bi) for gi in np.flatnonzero(sizes)
              for bi in range(offsets[gi] // 16, (offsets[gi + 1] - 1) // 16 + 1)]
    assert real == expect
    assert all((gi, bi) == real[-1] for gi, bi in zip(g[count[0]:], b[count[0]:]))  # no new DMA


# ---------------------------------------------------------------------------------------------
# The dispatch


def test_dispatch_selects_by_platform_and_override():
    assert ops.selected_impl() == "xla"  # the CPU default
    assert ops.selected_impl("interpret") == "interpret_gpu"
    with ops.use_impl("interpret_tpu"):
        assert ops.selected_impl() == "interpret_tpu"
        assert ops.selected_impl("xla") == "xla"  # the argument wins over the context
        with ops.use_impl("xla"):
            assert ops.selected_impl() == "xla"
        assert ops.selected_impl() == "interpret_tpu"
    with pytest.raises(RuntimeError):
        ops.selected_impl("pallas")  # no Pallas backend on CPU
    with pytest.raises(ValueError):
        ops.selected_impl("cuda")
    # Whole layer stacks go to every implementation but compiled Mosaic TPU (see its docstring).
    assert [ops.indexes_layer_stacks(i) for i in ops.IMPLS] == [True, False, True, True, True]


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu", "interpret_tpu"])
def test_ops_agree_under_jit(impl):
    rng = np.random.default_rng(12)
    x, [(gp, gs), (up, us)], sizes = grouped_case(rng, 32, 64, poison_empty=False)
    dp, ds = int4_weights(rng, (len(SIZES), 64, 32))

    @jax.jit
    def moe(x, sizes):
        h = ops.grouped_int4_swiglu(x, gp, gs, up, us, sizes, impl=impl)
        return ops.grouped_int4_matmul(h, dp, ds, sizes, impl=impl)

    rows = sum(SIZES)
    want = grouped_int4_matmul_ref(grouped_int4_swiglu_ref(x, gp, gs, up, us, sizes), dp, ds, sizes)
    assert_close(moe(x, sizes)[:rows], want[:rows], tol=2e-2)
    assert_close(ops.int4_matmul(x, gp[0], gs[0], impl=impl), int4_matmul_ref(x, gp[0], gs[0]))
    got = ops.dequantize_int4(gp, gs, 64, jnp.bfloat16, impl=impl)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(dequantize_int4_ref(gp, gs, 64, jnp.bfloat16), np.float32))


def test_unsupported_group_size_falls_back_to_the_reference():
    rng = np.random.default_rng(13)
    packed, scale = int4_weights(rng, (16, 48), group=24)  # not a power of two: no GPU kernel
    x = activations(rng, (3, 48))
    with ops.use_impl("interpret_gpu"):
        got = ops.int4_matmul(x, packed, scale)
    want = int4_matmul_ref(x, packed, scale)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Called directly, the kernels refuse with the requirement named.
    with pytest.raises(ValueError, match="power-of-two group size"):
        int4_matmul(x, packed, scale, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dequantize_int4(packed, scale, k=48, backend="cuda")
