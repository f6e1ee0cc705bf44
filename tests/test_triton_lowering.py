"""Every GPU kernel lowers to Triton at Kimi K2's real shapes, without a GPU.

Lowering for the "cuda" platform runs Pallas' whole Triton lowering in Python (it stops at Triton
IR; ptxas and the GPU itself are not involved), so it catches ops, index forms and block shapes
Triton rejects, at sizes far beyond what interpret mode can run. What it cannot catch (register
spills, shared-memory limits, speed) needs a GPU: scripts/gpu_session.py.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import experts_gpu
from kernels_pallas.paged_attention_gpu import paged_attention_gpu

HIDDEN, INTER, LATENT, ROPE, HEADS = 7168, 2048, 512, 64, 64


def triton_kernels(fn, *specs) -> list[str]:
    """Names of the Triton kernels in fn lowered for CUDA, in program order."""
    text = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    return [re.search(r'name = "(\w+)", num_stages', line).group(1) for line in calls]


def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def int4_spec(e, n, k):
    return spec((e, n, k // 8), jnp.int32), spec((e, n, k // 32))


@pytest.mark.parametrize("m,inter,kernel", [
    (8, INTER, "gemv"),  # batch 1 decode: 8 experts, a row each
    (256, INTER, "gemv"),  # batch 32 decode
    (8, INTER // 8, "gemv"),  # the expert MLP split over tensor=8: K splits fill the grid
    (4096, INTER, "mma"),  # prefill
])
def test_grouped_int4_kernels(m, inter, kernel):
    e, sizes = 384, spec((384,), jnp.int32)  # shapes only: nothing is allocated
    swiglu = triton_kernels(lambda x, g, u, s: experts_gpu.grouped_int4_swiglu_gpu(x, *g, *u, s), spec((m, HIDDEN)),
                            int4_spec(e, inter, HIDDEN), int4_spec(e, inter, HIDDEN), sizes)
    down = triton_kernels(lambda h, d, s: experts_gpu.grouped_int4_matmul_gpu(h, *d, s), spec((m, inter)),
                          int4_spec(e, HIDDEN, inter), sizes)
    assert (swiglu, down) == ([f"int4_swiglu_{kernel}"], [f"int4_matmul_{kernel}"])


@pytest.mark.parametrize("overrides", [dict(block_m=2), dict(block_m=4, block_n=16), dict(block_groups=8, split_k=4),
                                       dict(x_planes=False)])
def test_gemv_variants_the_gpu_session_times(overrides):
    e = 64
    got = triton_kernels(lambda x, g, u, s: experts_gpu.grouped_int4_swiglu_gpu(x, *g, *u, s, kernel="gemv", **overrides),
                         spec((4 * e, HIDDEN)), int4_spec(e, INTER, HIDDEN), int4_spec(e, INTER, HIDDEN),
                         spec((e,), jnp.int32))
    assert got == ["int4_swiglu_gemv"]


@pytest.mark.parametrize("rows,heads,queries,context,split", [
    (1, HEADS, 1, 65536, True),  # batch 1 at 64K: keys split over the GPU, then merged
    (32, HEADS, 1, 4096, True),
    (8, HEADS // 8, 1, 4096, True),  # 8 heads per device under tensor=8: padded to a 16-row tile
    (64, HEADS, 2, 4096, False),  # two queries per row (speculative decoding), one split
])
def test_paged_decode_attention(rows, heads, queries, context, split):
    page = 64
    pages = context // page
    specs = (spec((rows, queries, heads, LATENT)), spec((rows, queries, heads, ROPE)),
             spec((rows * pages + 1, page, LATENT + ROPE)), spec((rows, pages), jnp.int32),
             spec((rows,), jnp.int32), spec((rows,), jnp.int32))
    extra = {} if split else dict(n_splits=1)
    got = triton_kernels(lambda *a: paged_attention_gpu(*a, scale=0.1, **extra), *specs)
    assert got == (["mla_paged_decode", "mla_paged_decode_combine"] if split else ["mla_paged_decode"])


@pytest.mark.parametrize("group", [8, 16, 128])
def test_gemv_with_other_group_sizes(group):
    p, s = spec((8, INTER, HIDDEN // 8), jnp.int32), spec((8, INTER, HIDDEN // group))
    got = triton_kernels(lambda x, p, s, n: experts_gpu.grouped_int4_matmul_gpu(x, p, s, n), spec((8, HIDDEN)), p, s,
                         spec((8,), jnp.int32))
    assert got == ["int4_matmul_gemv"]
