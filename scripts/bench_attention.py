"""Check and time the paged MLA decode-attention kernel: per-layer microseconds and GB/s of cache read
(against the measured copy bandwidth) at contexts 4K and 64K, batch 1, 8 and 32, next to the XLA reference.

    PYTHONPATH=. python scripts/bench_attention.py [--impl pallas_gpu] [--json out.json]

One decode step per row (C = 1, q_start = kv_len - 1), K2's absorbed-MLA widths (latent 512 + rope 64,
64 heads, or 8 under tensor=8), 64-token pages handed out in random order. The bytes a step must read
are its rows' cache tokens (576 bf16 values each) plus the queries and outputs. On CPU it runs small
shapes through `impl`, so the script stays testable; CPU figures are not targets.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from bench_common import Budget, arg_parser, copy_bandwidth, device_time, log, markdown, rel_err

from kernels_pallas import ops
from kernels_pallas.paged_attention import paged_attention_ref
from kernels_pallas.paged_attention_gpu import paged_attention_gpu


@dataclasses.dataclass(frozen=True)
class AttnShapes:
    heads: int
    latent: int
    rope: int
    page: int
    contexts: tuple[int, ...]
    batches: tuple[int, ...]


K2 = AttnShapes(64, 512, 64, 64, (4096, 65536), (1, 8, 32))
SMALL = AttnShapes(16, 64, 16, 16, (256, 1024), (1, 4))
TINY = AttnShapes(4, 32, 16, 4, (64,), (1, 2))

VARIANTS = [dict(block_rows=16), dict(block_rows=64), dict(block_tokens=64), dict(min_split_tokens=1024),
            dict(num_warps=4), dict(num_stages=3)]


def decode_case(shapes: AttnShapes, batch: int, context: int, heads: int | None = None, lengths=None, seed=0):
    """(q_lat, q_pe, kv_pages, page_table, q_start, kv_len) for one decode step; page 0 is the sink."""
    h = heads or shapes.heads
    pages_per_row = -(-context // shapes.page)
    n_pages = batch * pages_per_row + 1
    key = jax.random.key(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    kv = jax.random.normal(k1, (n_pages, shapes.page, shapes.latent + shapes.rope), jnp.bfloat16)
    table = 1 + jax.random.permutation(k2, n_pages - 1).reshape(batch, pages_per_row).astype(jnp.int32)
    kv_len = jnp.asarray(lengths if lengths is not None else [context] * batch, jnp.int32)
    q_lat = jax.random.normal(k3, (batch, 1, h, shapes.latent), jnp.bfloat16)
    q_pe = jax.random.normal(k4, (batch, 1, h, shapes.rope), jnp.bfloat16)
    return q_lat, q_pe, kv, table, jnp.maximum(kv_len - 1, 0), kv_len


def check_attention(shapes: AttnShapes, impl: str) -> list[dict]:
    """The GPU kernel against the reference: ragged lengths (0, 1, mid-page, full), both head counts,
    one split and several."""
    interpret = impl == "interpret_gpu"
    ctx = shapes.contexts[0]
    ref = jax.jit(lambda *a: paged_attention_ref(*a, scale=0.07))
    rows = []
    for heads in (shapes.heads, max(1, shapes.heads // 8)):
        lengths = [0, 1, shapes.page + 3, ctx]
        args = decode_case(shapes, len(lengths), ctx, heads, lengths, seed=heads)
        want = ref(*args)
        for over in (dict(n_splits=1), dict(n_splits=3, min_split_tokens=shapes.page), {}):
            row = dict(check=f"attention heads={heads} {over or 'default'}", context=ctx)
            try:
                got = paged_attention_gpu(*args, scale=0.07, interpret=interpret, **over)
                row.update(rel_err=rel_err(got, want))
                row.update(ok=row["rel_err"] < 2e-2 and bool(jnp.all(got[0] == 0)))
            except Exception as e:  # a failed check, not the end of the run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            log(row)
    return rows


def bench_attention(shapes, impl, copy_bps, reps, budget, contexts=None, batches=None, overrides=None,
                    reference=True):
    """Per-layer time of one decode step's attention and its cache GB/s."""
    rows = []
    width = shapes.latent + shapes.rope
    for context in contexts or shapes.contexts:
        for batch in batches or shapes.batches:
            if not budget.allows(f"attention ctx={context} batch={batch}", 3):
                continue
            args = decode_case(shapes, batch, context)
            if overrides:
                f = jax.jit(lambda *a: paged_attention_gpu(*a, scale=0.07, interpret=impl == "interpret_gpu",
                                                           **overrides))
            else:
                f = jax.jit(lambda *a: ops.paged_attention(*a, scale=0.07, impl=impl))
            dt, first = device_time(f, args, reps)
            cache = batch * context * width * 2
            io = 2 * batch * shapes.heads * (shapes.latent * 2 + shapes.rope * 2 + shapes.latent * 4)
            gbps = (cache + io) / dt / 1e9
            row = dict(context=context, batch=batch, impl=impl, config=str(overrides or ""), us=dt * 1e6,
                       cache_mb=cache / 1e6, gbps=gbps, pct_copy=100 * gbps * 1e9 / copy_bps, first_call_s=first)
            # The reference's key loop is a data-dependent while: on GPU every block syncs with the
            # host. Timed at the shorter context only, as the 'before' of the kernel.
            if reference and context == min(shapes.contexts):
                row["ref_us"] = device_time(jax.jit(lambda *a: paged_attention_ref(*a, scale=0.07)), args, reps)[0] * 1e6
                row["speedup_vs_ref"] = row["ref_us"] / row["us"]
            rows.append(row)
            log(row)
    return rows


COLUMNS = [("context", "context", "d"), ("batch", "batch", "d"), ("config", "config", ""), ("us/layer", "us", ".1f"),
           ("cache MB", "cache_mb", ".1f"), ("GB/s", "gbps", ".0f"), ("% copy", "pct_copy", ".0f"),
           ("XLA ref us", "ref_us", ".1f"), ("x ref", "speedup_vs_ref", ".1f")]
CHECK_COLUMNS = [("check", "check", ""), ("context", "context", "d"), ("rel err", "rel_err", ".2e"), ("ok", "ok", "")]


def main(argv=None) -> int:
    on_gpu = jax.default_backend() == "gpu"
    ap = arg_parser(__doc__, reps_on_gpu=20)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--variants", action="store_true", help="also time tiling variants at the longest context")
    args = ap.parse_args(argv)
    shapes = TINY if args.tiny else K2 if on_gpu else SMALL
    budget = Budget(1e9)
    results = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, impl=args.impl,
                   shapes=dataclasses.asdict(shapes))
    ok = True
    if args.impl in ("pallas_gpu", "interpret_gpu"):
        results["checks"] = check_attention(shapes, args.impl)
        ok = all(r["ok"] for r in results["checks"])
        print(markdown(results["checks"], CHECK_COLUMNS))
    copy_bps = copy_bandwidth(1 << 20 if args.tiny else 4 << 30 if on_gpu else 64 << 20, args.reps)
    results["copy_gbps"] = copy_bps / 1e9
    results["timings"] = bench_attention(shapes, args.impl, copy_bps, args.reps, budget)
    if args.variants and args.impl in ("pallas_gpu", "interpret_gpu"):
        for over in VARIANTS:
            results["timings"] += bench_attention(shapes, args.impl, copy_bps, args.reps, budget,
                                                  [max(shapes.contexts)], [1], over, reference=False)
    print(f"\ncopy {copy_bps / 1e9:.0f} GB/s\n" + markdown(results["timings"], COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
