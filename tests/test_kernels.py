"""The GPU INT4 expert kernels (packing "ct"), in interpret mode on CPU, against their pure-jnp
references; the references' own invariants; and the `ops` dispatch.

GPU kernels run under Pallas' generic interpreter. Grids stay at a handful of points; shapes are
deliberately not multiples of the block sizes and some groups are empty. Data is random and never
zero. test_kernels_tpu.py runs the TPU kernels (packing "tpu") under TPU interpret mode, and
test_triton_lowering.py lowers the GPU kernels at K2's shapes.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import experts_gpu, ops
from kernels_pallas.experts_gpu import dequant_tile_gpu
from kernels_pallas.experts_tpu import tpu_visits
from kernels_pallas.experts_xla import (
    expert_row_tiles,
    grouped_int4_matmul_ref,
    grouped_int4_swiglu_ref,
    grouped_matmul_ref,
    rows_per_expert,
)
from kernels_pallas.int4_ct import dequantize_int4_ref, quantize_int4


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


def pallas_call_names(fn, *args):
    """Names of the Pallas kernels in fn's jaxpr (walking sub-jaxprs)."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                names.append(eqn.params["name"])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


# ---------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize("mode", ["bf16", "join"])
def test_gpu_dequant_variants_give_the_same_weights(mode):
    rng = np.random.default_rng(7)
    packed, scale = int4_weights(rng, (16, 128))
    want = dequant_tile_gpu(packed, scale, group=32, dtype=jnp.bfloat16, mode="f32")
    got = dequant_tile_gpu(packed, scale, group=32, dtype=jnp.bfloat16, mode=mode)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    ref = dequantize_int4_ref(packed, scale, 128, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(want).view(np.uint16), np.asarray(ref).view(np.uint16))


def test_gemv_nibble_floats_are_128_plus_the_nibble_without_a_conversion():
    # Every nibble value in every position of a word, sign bit included.
    words = np.array([sum(((u + j) % 16) << (4 * j) for j in range(8)) for u in range(16)], np.uint32)
    p = jnp.asarray(words.view(np.int32))
    for j in range(8):
        f = np.asarray(experts_gpu._plane_floats(p, j), np.float64)
        u = (np.arange(16) + j) % 16
        want = 128 + (u / 16 if j % 2 == 0 else u)
        np.testing.assert_array_equal(f, want)
        np.testing.assert_array_equal(f * experts_gpu._X_SCALE[j] - 128 * experts_gpu._X_SCALE[j], u)


# ---------------------------------------------------------------------------------------------
# Matmuls


def one_expert(x, packed, scale, **kw):
    """x @ W^T through the grouped GPU kernel with a single expert holding every row."""
    sizes = jnp.full((1,), x.shape[0], jnp.int32)
    return experts_gpu.grouped_int4_matmul_gpu(x, packed[None], scale[None], sizes, interpret=True, **kw)


@pytest.mark.parametrize("kernel,kwargs", [
    ("gemv", {}),  # M = 3 rows: one tile of block_m = 4 with a masked row
    ("gemv", dict(block_m=1, block_n=16, block_groups=2, split_k=3, x_planes=False)),  # K split 2+2+0 steps
    ("mma", dict(block_m=16, block_n=16, block_k=64, split_k=1)),  # several K steps and column blocks
    ("mma", dict(block_k=64, split_k=3)),
])
def test_one_expert_holding_every_row(kernel, kwargs):
    rng = np.random.default_rng(11)
    m, n, k = (21 if kernel == "mma" else 3), 40, 256
    packed, scale = int4_weights(rng, (n, k))
    x = activations(rng, (m, k))
    got = one_expert(x, packed, scale, kernel=kernel, **kwargs)
    assert got.shape == (m, n) and got.dtype == x.dtype
    sizes = jnp.full((1,), m, jnp.int32)
    want = grouped_int4_matmul_ref(x, packed[None], scale[None], sizes)
    assert_close(got, want)
    assert_close(want, dense_oracle(x, [(packed[None], scale[None])], [m], False))


@pytest.mark.parametrize("group", [8, 16])
def test_gemv_takes_groups_of_one_or_two_packed_words(group):
    rng = np.random.default_rng(group)
    packed, scale = int4_weights(rng, (24, 128), group)
    x = activations(rng, (2, 128))
    got = one_expert(x, packed, scale, kernel="gemv")
    assert_close(got, dense_oracle(x, [(packed[None], scale[None])], [2], False))


SIZES = [3, 0, 17, 1, 0]  # empty experts, a group straddling a 16-row block, 3 padding rows (M = 24)
DECODE_SIZES = [1, 0, 2, 1, 0, 0, 1, 0]  # decode: a row or two per chosen expert, 2 padding rows (M = 7)


def grouped_case(rng, n_out, k, sizes=SIZES, m=24, poison_empty=True):
    e = len(sizes)
    weights = [int4_weights(rng, (e, n_out, k)) for _ in range(2)]
    if poison_empty:  # an expert without rows must not be read: NaN scales would show if it were
        empty = np.asarray(sizes) == 0
        weights = [(p, jnp.where(empty[:, None, None], jnp.nan, s).astype(s.dtype)) for p, s in weights]
    return activations(rng, (m, k)), weights, jnp.asarray(sizes, jnp.int32)


def check_grouped(got, want, oracle, sizes):
    rows = sum(sizes)
    assert_close(got[:rows], want[:rows])
    np.testing.assert_array_equal(np.asarray(got[rows:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(want[rows:], np.float32), 0.0)
    assert_close(want[:rows], oracle)


@pytest.mark.parametrize("kernel,kwargs,sizes,m", [
    ("gemv", {}, DECODE_SIZES, 7),
    ("gemv", dict(block_m=4, block_groups=2, split_k=2), SIZES, 24),  # masked rows in a tile, K split
    ("mma", {}, SIZES, 24),
    ("mma", dict(block_n=16, block_k=32), SIZES, 24),
])
def test_grouped_swiglu(kernel, kwargs, sizes, m):
    rng = np.random.default_rng(5)
    x, [(gp, gs), (up, us)], sizes_arr = grouped_case(rng, 40, 96, sizes, m)
    got = experts_gpu.grouped_int4_swiglu_gpu(x, gp, gs, up, us, sizes_arr, kernel=kernel, interpret=True, **kwargs)
    want = grouped_int4_swiglu_ref(x, gp, gs, up, us, sizes_arr)
    check_grouped(got, want, dense_oracle(x, [(gp, gs), (up, us)], sizes, True), sizes)


@pytest.mark.parametrize("kernel", ["gemv", "mma"])
def test_grouped_down_projection(kernel):
    rng = np.random.default_rng(6)
    sizes, m = (DECODE_SIZES, 7) if kernel == "gemv" else (SIZES, 24)
    h, [(dp, ds), _], sizes_arr = grouped_case(rng, 72, 64, sizes, m)
    got = experts_gpu.grouped_int4_matmul_gpu(h, dp, ds, sizes_arr, kernel=kernel, interpret=True)
    want = grouped_int4_matmul_ref(h, dp, ds, sizes_arr)
    check_grouped(got, want, dense_oracle(h, [(dp, ds)], sizes, False), sizes)


@pytest.mark.parametrize("kernel", ["gemv", "mma"])
def test_all_rows_in_one_expert_and_no_rows_at_all(kernel):
    rng = np.random.default_rng(8)
    e, n, k = 3, 24, 64
    dp, ds = int4_weights(rng, (e, n, k))
    h = activations(rng, (4, k))
    run = jax.jit(lambda h, sizes: experts_gpu.grouped_int4_matmul_gpu(h, dp, ds, sizes, kernel=kernel, interpret=True))
    for sizes in ([0, 4, 0], [0, 0, 0]):
        sizes = jnp.asarray(sizes, jnp.int32)
        want = grouped_int4_matmul_ref(h, dp, ds, sizes)
        got = run(h, sizes)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_gpu_kernel_is_chosen_by_the_static_rows_per_expert():
    rng = np.random.default_rng(10)
    e, n, k = 64, 16, 64
    gp, gs = int4_weights(rng, (e, n, k))

    def names(m):
        x = jnp.zeros((m, k), jnp.bfloat16)
        sizes = jnp.full((e,), m // e, jnp.int32)
        return pallas_call_names(lambda x, s: experts_gpu.grouped_int4_swiglu_gpu(x, gp, gs, gp, gs, s, interpret=True),
                                 x, sizes)

    assert rows_per_expert(8, 384) < 1.1 and 1.3 < rows_per_expert(256, 384) < 1.5
    assert names(8) == ["int4_swiglu_gemv"]  # decode: a row per expert
    assert names(64 * 64) == ["int4_swiglu_mma"]  # prefill: 64 rows per expert
    with pytest.raises(ValueError, match="no setting"):
        experts_gpu.grouped_int4_matmul_gpu(jnp.zeros((8, k), jnp.bfloat16), gp, gs, jnp.ones((e,), jnp.int32),
                                         kernel="gemv", block_k=64)


def _all_shapes(jaxpr):
    """Shapes of every value in a jaxpr and its sub-jaxprs (loop and cond bodies)."""
    for v in (*jaxpr.invars, *jaxpr.constvars):
        yield tuple(v.aval.shape)
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_reference_never_dequantizes_all_experts_at_once():
    e, n, k = 7, 24, 96  # distinct sizes, so an [e, n, k] value would be recognisable
    rng = np.random.default_rng(9)
    x, [(gp, gs), (up, us)], _ = grouped_case(rng, n, k, poison_empty=False)
    gp, gs, up, us = (jnp.concatenate([a, a[:2]]) for a in (gp, gs, up, us))
    sizes = jnp.asarray(SIZES + [2, 1], jnp.int32)
    assert gp.shape[0] == e
    shapes = set(_all_shapes(jax.make_jaxpr(grouped_int4_swiglu_ref)(x, gp, gs, up, us, sizes).jaxpr))
    assert (n, k) in shapes  # one expert at a time ...
    assert (e, n, k) not in shapes and (e, n, k // 32, 32) not in shapes  # ... never all of them


@pytest.mark.parametrize("seed", range(3))
def test_tile_metadata_covers_each_row_once_and_skips_empty_experts(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, 9) * (rng.random(9) < 0.6)
    m = int(sizes.sum()) + 5
    e, r0, r1 = (np.asarray(a) for a in expert_row_tiles(jnp.asarray(sizes, jnp.int32), m, 16))
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


def test_dense_grouped_matmul_reference_matches_ragged_dot():
    rng = np.random.default_rng(15)
    sizes = [5, 0, 9, 1]
    x = jnp.asarray(rng.normal(size=(18, 24)), jnp.float32)  # 3 padding rows
    w = jnp.asarray(rng.normal(size=(4, 10, 24)), jnp.float32)  # [experts, out, in]
    gs = jnp.asarray(sizes, jnp.int32)
    expert = np.repeat(np.arange(4), sizes)
    oracle = np.einsum("mk,mnk->mn", np.asarray(x)[:15], np.asarray(w)[expert])
    for impl in ("xla", "interpret_gpu"):
        got = np.asarray(ops.grouped_matmul(x, w, gs, impl=impl))
        np.testing.assert_allclose(got[:15], oracle, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[15:], 0.0)
    np.testing.assert_allclose(grouped_matmul_ref(x, w, gs), jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), gs),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The dispatch


def test_the_caller_says_which_implementation_runs():
    rng = np.random.default_rng(0)
    x, [(gp, gs), _], sizes = grouped_case(rng, 16, 64, poison_empty=False)
    with pytest.raises(TypeError, match="impl"):
        ops.grouped_int4_matmul(x, gp, gs, sizes)  # no hidden default: the caller says what runs
    with pytest.raises(ValueError, match="unknown impl 'cuda'.*pallas_gpu"):
        ops.grouped_int4_matmul(x, gp, gs, sizes, impl="cuda")
    assert ops.grouped_int4_matmul.choose("interpret_gpu", x, gp, gs, sizes)[0] == "interpret_gpu"
    assert ops.grouped_int4_matmul.choose("xla", x, gp, gs, sizes)[0] == "xla"


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu"])
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


def test_unsupported_shape_falls_back_to_the_reference_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_logged", set())  # an earlier test may have logged this fallback
    rng = np.random.default_rng(13)
    packed, scale = int4_weights(rng, (1, 16, 48), group=24)  # not a power of two: no GPU kernel
    x = activations(rng, (3, 48))
    sizes = jnp.full((1,), 3, jnp.int32)
    op = ops.grouped_int4_matmul
    with caplog.at_level(logging.WARNING, logger="kernels_pallas.ops"):
        assert op.choose("interpret_gpu", x, packed, scale, sizes)[0] == "xla"
        got = op(x, packed, scale, sizes, impl="interpret_gpu")
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(grouped_int4_matmul_ref(x, packed, scale, sizes), np.float32))
    fallbacks = [r for r in caplog.records if "grouped_int4_matmul: interpret_gpu falls back" in r.getMessage()]
    assert len(fallbacks) == 1 and "power-of-two group size" in fallbacks[0].getMessage()
    # The TPU kernels read packing "tpu" only: the checkpoint's goes to the reference, reason named.
    assert "read packing 'tpu', not 'ct'" in op.fallback_reason("interpret_tpu", x, packed, scale, sizes)
    # Called directly, the kernels refuse with the requirement named.
    with pytest.raises(ValueError, match="power-of-two group size"):
        experts_gpu.grouped_int4_matmul_gpu(x, packed, scale, sizes, interpret=True)
    with pytest.raises(ValueError, match="unknown GPU kernel 'wmma'"):
        experts_gpu.grouped_int4_matmul_gpu(x[:, :32], packed[..., :4], scale[..., :1], sizes, kernel="wmma")
