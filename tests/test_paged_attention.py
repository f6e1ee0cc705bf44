"""The paged-attention reference against plain softmax attention over each row's own sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import paged_attention_ref

R, H, LAT, ROPE, PAGE = 3, 4, 32, 8, 4
SCALE = 0.3


def _dense(q_lat, q_pe, seqs, q_start, kv_len):
    """Attention of each query over the visible prefix of its row's own sequence, in float64."""
    out = np.zeros(q_lat.shape, np.float64)
    for b in range(q_lat.shape[0]):
        for c in range(q_lat.shape[1]):
            last = min(q_start[b] + c, kv_len[b] - 1)
            if last < 0:
                continue
            keys = seqs[b][:last + 1].astype(np.float64)
            s = (np.einsum("hr,sr->hs", q_lat[b, c], keys[:, :LAT]) + np.einsum("hp,sp->hs", q_pe[b, c], keys[:, LAT:]))
            p = np.exp(SCALE * s - (SCALE * s).max(-1, keepdims=True))
            out[b, c] = (p / p.sum(-1, keepdims=True)) @ keys[:, :LAT]
    return out


def _paged(rng, lengths, n_pages=40, max_pages=12):
    """A pool with each row's sequence scattered over random distinct pages (page 0 left as junk)."""
    pool = rng.standard_normal((n_pages, PAGE, LAT + ROPE)).astype(np.float32)
    order = rng.permutation(np.arange(1, n_pages))
    table = np.zeros((len(lengths), max_pages), np.int32)
    seqs = []
    used = 0
    for b, n in enumerate(lengths):
        k = -(-n // PAGE)
        table[b, :k] = order[used:used + k]
        used += k
        seqs.append(pool[table[b, :k]].reshape(k * PAGE, LAT + ROPE)[:n])
    return pool, table, seqs


@pytest.mark.parametrize("block_pages", [1, 3])
def test_decode_query_sees_exactly_its_rows_cached_tokens(block_pages):
    rng = np.random.default_rng(0)
    lengths = [1, 13, 30]
    pool, table, seqs = _paged(rng, lengths)
    q_lat = rng.standard_normal((R, 1, H, LAT)).astype(np.float32)
    q_pe = rng.standard_normal((R, 1, H, ROPE)).astype(np.float32)
    kv_len = np.asarray(lengths, np.int32)
    got = paged_attention_ref(jnp.asarray(q_lat), jnp.asarray(q_pe), jnp.asarray(pool), jnp.asarray(table),
                              jnp.asarray(kv_len - 1), jnp.asarray(kv_len), scale=SCALE, block_pages=block_pages)
    np.testing.assert_allclose(np.asarray(got), _dense(q_lat, q_pe, seqs, kv_len - 1, kv_len), atol=2e-5)


def test_chunk_queries_are_causal_and_stop_at_the_rows_length():
    rng = np.random.default_rng(1)
    c = 5
    lengths = [3, 17, 26]  # row 0: two of its five queries are padding past its length
    pool, table, seqs = _paged(rng, lengths)
    q_start = np.asarray([0, 12, 21], np.int32)
    q_lat = rng.standard_normal((R, c, H, LAT)).astype(np.float32)
    q_pe = rng.standard_normal((R, c, H, ROPE)).astype(np.float32)
    f = jax.jit(lambda *a: paged_attention_ref(*a, scale=SCALE, block_pages=2))
    got = f(q_lat, q_pe, pool, table, q_start, np.asarray(lengths, np.int32))
    np.testing.assert_allclose(np.asarray(got), _dense(q_lat, q_pe, seqs, q_start, lengths), atol=2e-5)


def test_a_row_with_no_cached_tokens_gets_zeros_not_nans():
    rng = np.random.default_rng(2)
    pool, table, _ = _paged(rng, [0, 5, 9])
    q = jnp.asarray(rng.standard_normal((R, 1, H, LAT)), jnp.float32)
    qp = jnp.asarray(rng.standard_normal((R, 1, H, ROPE)), jnp.float32)
    kv_len = jnp.asarray([0, 5, 9], jnp.int32)
    got = np.asarray(paged_attention_ref(q, qp, jnp.asarray(pool), jnp.asarray(table), jnp.maximum(kv_len - 1, 0),
                                         kv_len, scale=SCALE))
    assert np.all(got[0] == 0) and np.all(np.isfinite(got)) and np.abs(got[1:]).max() > 0
