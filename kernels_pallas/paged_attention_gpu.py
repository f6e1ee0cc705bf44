"""Absorbed-MLA attention over the paged latent cache on NVIDIA GPUs (Pallas Triton), flash-decoding style.

Same signature and semantics as `paged_attention.paged_attention_ref` (read it for the page orders):

    paged_attention_gpu(q_lat [R, C, H, r], q_pe [R, C, H, p], kv_pages [P, S, r + p], page_table [R, T],
                        q_start [R], kv_len [R], *, scale) -> o_lat [R, C, H, r] float32

The lengths are data and the key loop runs inside the kernel, so a decode step never waits on the
host. One program owns (head block, key split, row): it loads its block of query rows (C queries x
block heads, flattened so C > 1 for speculative decoding costs nothing extra) once, then walks
its split of the row's keys `block_tokens` at a time. Key t is slot t % S of page
page_table[row, t // S]; the kernel gathers the tokens' cache rows directly, so pages may come in
any order and any page size works. Each cache byte is read once per head block, and head blocks
of one split are neighbours in the grid so the second read tends to hit L2.

Splits: the number is static (enough programs to fill the GPU, from rows x head blocks and the
table's capacity); their length is not: each row divides its own visible keys among them, at
least `min_split_tokens` each, so a short row uses few splits and a long one all. With more than
one split, programs write float32 partials (running max m, sum l, unnormalized acc) and a second
kernel merges only the splits a row used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["paged_attention_gpu", "unsupported_reason", "attention_config"]

GPU_TARGET_PROGRAMS = 264  # two programs per SM of a 132-SM H100/H200


def unsupported_reason(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale, **config) -> str | None:
    """Why the kernel cannot take these shapes (Triton tiles are powers of two, dots at least 16 wide)."""
    r, p = q_lat.shape[-1], q_pe.shape[-1]
    for name, width in (("latent", r), ("rope", p)):
        if width < 16 or width & (width - 1):
            return f"the GPU attention kernel needs a power-of-two {name} width of at least 16; got {width}"
    if kv_pages.shape[-1] != r + p:
        return f"cache rows hold {kv_pages.shape[-1]} values, not latent {r} + rope {p}"
    return None


def attention_config(rows: int, heads_x_queries: int, max_tokens: int) -> dict:
    """Default tiling for `rows` sequences of `heads_x_queries` query rows and `max_tokens` capacity.

    32 query rows per program keep the float32 accumulator [32, 512] at 64 registers a thread
    with 8 warps; 32 tokens per step keep a cache tile at 36 KB of shared memory per stage."""
    block_rows = min(32, max(16, pl.next_power_of_2(heads_x_queries)))
    head_blocks = pl.cdiv(heads_x_queries, block_rows)
    min_split = 256
    n_splits = max(1, min(pl.cdiv(GPU_TARGET_PROGRAMS, rows * head_blocks), pl.cdiv(max_tokens, min_split)))
    return dict(block_rows=block_rows, block_tokens=32, n_splits=n_splits, min_split_tokens=min_split,
                num_warps=8, num_stages=2)


def _split(n_keys, sp, n_splits: int, min_split: int, bt: int):
    """Keys [start, end) of split `sp` when a row's n_keys visible keys are shared by n_splits."""
    chunk = jnp.maximum(min_split, (n_keys + n_splits - 1) // n_splits)
    chunk = (chunk + bt - 1) // bt * bt
    start = sp * chunk
    return start, jnp.minimum(start + chunk, n_keys), chunk


def _visible_keys(q_start, kv_len, c: int, capacity: int):
    """Keys any of the row's C queries can see: positions < min(q_start + C, kv_len)."""
    return jnp.clip(jnp.minimum(q_start + c, kv_len), 0, capacity)


def _attention_kernel(table_ref, q_start_ref, kv_len_ref, ql_ref, qp_ref, kv_ref, *out_refs, scale, c, hc,
                      bq, mq, bt, page, r, p, n_splits, min_split):
    from jax.experimental.pallas import triton as plgpu

    hb, sp, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q0, length = q_start_ref[b], kv_len_ref[b]
    capacity = table_ref.shape[1] * page
    start, end, _ = _split(_visible_keys(q0, length, c, capacity), sp, n_splits, min_split, bt)
    idx = lax.broadcasted_iota(jnp.int32, (mq,), 0)
    rows = hb * bq + idx  # flattened (head, query) rows
    row_ok = (idx < bq) & (rows < hc)
    limit = jnp.minimum(q0 + rows % c, length - 1)  # last key each query row sees
    ql = plgpu.load(ql_ref.at[b, pl.ds(hb * bq, mq), :], mask=jnp.broadcast_to(row_ok[:, None], (mq, r)), other=0)
    qp = plgpu.load(qp_ref.at[b, pl.ds(hb * bq, mq), :], mask=jnp.broadcast_to(row_ok[:, None], (mq, p)), other=0)

    def body(i, carry):
        m, l, acc = carry
        tok = start + i * bt + lax.broadcasted_iota(jnp.int32, (bt,), 0)
        tok_ok = tok < end
        page_id = plgpu.load(table_ref.at[b, tok // page], mask=tok_ok, other=0)
        kv_row = (page_id * page + tok % page)[:, None]
        # A gather of whole cache rows (index arrays in both dims: the interpreter's load rule
        # does not mix index arrays with slices; Triton sees the same pointers either way).
        lat_cols = lax.broadcasted_iota(jnp.int32, (1, r), 1)
        pe_cols = r + lax.broadcasted_iota(jnp.int32, (1, p), 1)
        c_kv = plgpu.load(kv_ref.at[kv_row, lat_cols], mask=jnp.broadcast_to(tok_ok[:, None], (bt, r)),
                          other=0).astype(ql.dtype)
        k_pe = plgpu.load(kv_ref.at[kv_row, pe_cols], mask=jnp.broadcast_to(tok_ok[:, None], (bt, p)),
                          other=0).astype(qp.dtype)
        s = lax.dot_general(ql, c_kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s += lax.dot_general(qp, k_pe, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        visible = (tok[None, :] <= limit[:, None]) & tok_ok[None, :]
        s = jnp.where(visible, s * scale, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # nothing visible yet: keep exp() finite
        pr = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        acc = acc * corr[:, None] + lax.dot_general(pr.astype(ql.dtype), c_kv, (((1,), (0,)), ((), ())),
                                                    preferred_element_type=jnp.float32)
        return m_new, l * corr + pr.sum(axis=1), acc

    init = (jnp.full((mq,), -jnp.inf, jnp.float32), jnp.zeros((mq,), jnp.float32), jnp.zeros((mq, r), jnp.float32))
    m, l, acc = lax.fori_loop(0, (jnp.maximum(end - start, 0) + bt - 1) // bt, body, init)
    out_ok = jnp.broadcast_to(row_ok[:, None], (mq, r))
    if n_splits == 1:
        o_ref, = out_refs
        plgpu.store(o_ref.at[b, pl.ds(hb * bq, mq), :], acc / jnp.where(l > 0, l, 1.0)[:, None], mask=out_ok)
    else:
        acc_ref, m_ref, l_ref = out_refs
        plgpu.store(acc_ref.at[sp, b, pl.ds(hb * bq, mq), :], acc, mask=out_ok)
        plgpu.store(m_ref.at[sp, b, pl.ds(hb * bq, mq)], m, mask=row_ok)
        plgpu.store(l_ref.at[sp, b, pl.ds(hb * bq, mq)], l, mask=row_ok)


def _combine_kernel(q_start_ref, kv_len_ref, acc_ref, m_ref, l_ref, o_ref, *, c, hc, bq, bc, bt, capacity,
                    n_splits, min_split):
    """Merge the partials of the splits row b used, for query rows [qb*bq, +bq) x columns [cb*bc, +bc)."""
    from jax.experimental.pallas import triton as plgpu

    b, qb, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_keys = _visible_keys(q_start_ref[b], kv_len_ref[b], c, capacity)
    _, _, chunk = _split(n_keys, 0, n_splits, min_split, bt)
    used = (n_keys + chunk - 1) // chunk
    rows = qb * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    row_ok = rows < hc
    tile_ok = jnp.broadcast_to(row_ok[:, None], (bq, bc))

    def body(s, carry):
        m, l, acc = carry
        m_s = plgpu.load(m_ref.at[s, b, pl.ds(qb * bq, bq)], mask=row_ok, other=-jnp.inf)
        l_s = plgpu.load(l_ref.at[s, b, pl.ds(qb * bq, bq)], mask=row_ok, other=0)
        acc_s = plgpu.load(acc_ref.at[s, b, pl.ds(qb * bq, bq), pl.ds(cb * bc, bc)], mask=tile_ok, other=0)
        m_new = jnp.maximum(m, m_s)
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        a, w = jnp.exp(m - m_safe), jnp.exp(m_s - m_safe)
        return m_new, l * a + l_s * w, acc * a[:, None] + acc_s * w[:, None]

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, bc), jnp.float32))
    _, l, acc = lax.fori_loop(0, used, body, init)
    plgpu.store(o_ref.at[b, pl.ds(qb * bq, bq), pl.ds(cb * bc, bc)], acc / jnp.where(l > 0, l, 1.0)[:, None],
                mask=tile_ok)


def _flat_queries(q):
    """[R, C, H, d] -> [R, H * C, d]: one head's C queries are neighbouring rows of a head block."""
    rows, c, h, d = q.shape
    return q.reshape(rows, h, d) if c == 1 else q.transpose(0, 2, 1, 3).reshape(rows, h * c, d)


def paged_attention_gpu(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, *, scale: float, interpret=False,
                        **overrides):
    """See the module docstring. `overrides` replace entries of `attention_config` (benchmarks);
    `interpret=True` runs the kernels on any platform."""
    from jax.experimental.pallas import triton as plgpu

    reason = unsupported_reason(q_lat, q_pe, kv_pages, page_table, q_start, kv_len, scale=scale)
    if reason:
        raise ValueError(reason)
    rows, c, h, r = q_lat.shape
    p = q_pe.shape[-1]
    n_pages, page, _ = kv_pages.shape
    capacity = page_table.shape[1] * page
    hc = h * c
    cfg = attention_config(rows, hc, capacity)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"the GPU attention kernel has no setting {sorted(unknown)}; it takes {sorted(cfg)}")
    cfg.update(overrides)
    bq, bt, n_splits = cfg["block_rows"], cfg["block_tokens"], cfg["n_splits"]
    mq = max(16, pl.next_power_of_2(bq))  # Triton dots need at least 16 rows
    head_blocks = pl.cdiv(hc, bq)
    params = plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kernel = functools.partial(_attention_kernel, scale=float(scale), c=c, hc=hc, bq=bq, mq=mq, bt=bt, page=page,
                               r=r, p=p, n_splits=n_splits, min_split=cfg["min_split_tokens"])
    f32 = jnp.float32
    if n_splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, hc, r), f32)
    else:
        out_shape = (jax.ShapeDtypeStruct((n_splits, rows, hc, r), f32),
                     jax.ShapeDtypeStruct((n_splits, rows, hc), f32), jax.ShapeDtypeStruct((n_splits, rows, hc), f32))
    args = (page_table.astype(jnp.int32), q_start.astype(jnp.int32), kv_len.astype(jnp.int32))
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(head_blocks, n_splits, rows), compiler_params=params,
        interpret=interpret, name="mla_paged_decode",
    )(*args, _flat_queries(q_lat), _flat_queries(q_pe), kv_pages.reshape(n_pages * page, r + p))
    if n_splits > 1:
        bc = min(64, r)
        combine = functools.partial(_combine_kernel, c=c, hc=hc, bq=16, bc=bc, bt=bt, capacity=capacity,
                                    n_splits=n_splits, min_split=cfg["min_split_tokens"])
        out = pl.pallas_call(
            combine, out_shape=jax.ShapeDtypeStruct((rows, hc, r), f32), grid=(rows, pl.cdiv(hc, 16), r // bc),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
            name="mla_paged_decode_combine",
        )(args[1], args[2], *out)
    out = out.reshape(rows, h, c, r)
    return out.transpose(0, 2, 1, 3) if c > 1 else out.reshape(rows, 1, h, r)
