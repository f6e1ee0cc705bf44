"""The GPU paged decode-attention kernel, in interpret mode, against the reference it must equal.

Cache pages are scattered in random order over a pool whose other pages hold junk; lengths end
mid-page; rows include an empty cache and a single token. Widths are the smallest Triton tiles
(latent 32, rope 16); 4 heads pad to a 16-row tile.
"""


import jax.numpy as jnp
import numpy as np
import pytest
from page_pools import scattered_pool

from kernels_pallas import ops
from kernels_pallas.paged_attention import paged_attention_ref
from kernels_pallas.paged_attention_gpu import attention_config, paged_attention_gpu

H, LAT, ROPE, PAGE = 4, 32, 16, 4
SCALE = 0.3


def paged_case(rng, lengths, c, dtype=jnp.float32, n_pages=48, max_pages=24):
    pool, table = scattered_pool(rng, lengths, PAGE, LAT + ROPE, n_pages, max_pages)
    rows = len(lengths)
    kv_len = np.asarray(lengths, np.int32)
    q_start = np.maximum(kv_len - c, 0)  # the row's last c positions (fewer when the cache is short)
    q_lat = rng.standard_normal((rows, c, H, LAT)).astype(np.float32)
    q_pe = rng.standard_normal((rows, c, H, ROPE)).astype(np.float32)
    return tuple(jnp.asarray(a, dt) for a, dt in ((q_lat, dtype), (q_pe, dtype), (pool, dtype), (table, None),
                                                  (q_start, None), (kv_len, None)))


LENGTHS = [0, 1, 13, 70]  # empty, one token, ends mid-page, many pages


@pytest.mark.parametrize("c,overrides", [
    (1, dict(n_splits=1)),  # one program per (row, head block) walks all keys
    (1, dict(n_splits=3, min_split_tokens=16, block_tokens=16)),  # 70 keys -> 3 splits of 32, 32, 6
    (3, dict(n_splits=2, min_split_tokens=16, block_tokens=16, block_rows=8)),  # causal chunk, 2 head blocks
])
def test_gpu_kernel_matches_the_reference(c, overrides):
    args = paged_case(np.random.default_rng(c), LENGTHS, c)
    want = paged_attention_ref(*args, scale=SCALE, block_pages=2)
    got = paged_attention_gpu(*args, scale=SCALE, interpret=True, **overrides)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(got[0]) == 0)  # no cached token: zeros, not NaN


def test_bf16_cache_and_queries_stay_within_bf16_rounding():
    args = paged_case(np.random.default_rng(7), [5, 70], 1, dtype=jnp.bfloat16)
    want = paged_attention_ref(*args, scale=SCALE)
    got = paged_attention_gpu(*args, scale=SCALE, interpret=True, n_splits=2, min_split_tokens=16, block_tokens=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_default_tiling_fills_the_gpu_with_splits_only_where_rows_are_few():
    one_long = attention_config(rows=1, heads_x_queries=64, max_tokens=65536)
    assert one_long["block_rows"] == 32 and one_long["n_splits"] * 2 >= 132  # heads in 2 blocks
    many = attention_config(rows=64, heads_x_queries=64, max_tokens=4096)
    assert many["n_splits"] * 64 * 2 <= 2 * 264
    assert attention_config(rows=1, heads_x_queries=8, max_tokens=300)["n_splits"] == 2  # 256-token minimum


def test_ops_run_the_kernel_and_fall_back_for_widths_triton_cannot_tile():
    args = paged_case(np.random.default_rng(3), [9, 30], 1)
    assert ops.paged_attention.choose("interpret_gpu", *args, scale=SCALE)[0] == "interpret_gpu"
    got = ops.paged_attention(*args, scale=SCALE, impl="interpret_gpu")
    np.testing.assert_allclose(np.asarray(got), np.asarray(paged_attention_ref(*args, scale=SCALE)), atol=2e-5)
    narrow = (args[0], args[1][..., :8], args[2][..., :LAT + 8], *args[3:])  # rope width 8 < 16
    assert ops.paged_attention.choose("interpret_gpu", *narrow, scale=SCALE)[0] == "xla"
    assert "rope width of at least 16; got 8" in ops.paged_attention.fallback_reason("interpret_gpu", *narrow, scale=SCALE)
    with pytest.raises(ValueError, match="rope width"):
        paged_attention_gpu(*narrow, scale=SCALE, interpret=True)
    assert ops.paged_attention.choose("pallas_tpu", *args, scale=SCALE)[0] == "xla"  # no TPU kernel here yet
