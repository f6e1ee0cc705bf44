"""Decode-step benchmark of the whole engine against the memory roofline, on one device.

A random model with K2's real layer shapes (hidden 7168, MLA 1536/512/64, 384 INT4 experts top-8 plus
a shared expert, 163840 vocabulary) but fewer layers, so it fits one GPU. One decode step must read
every non-expert weight, the routed experts the batch selects, and the latent cache; that many
bytes over the device-to-device copy bandwidth measured in the same run is the floor. Prints a
markdown table; --json writes the numbers.

    python scripts/bench_decode.py --layers 4 --context 4096      # on a GPU
    python scripts/bench_decode.py --layers 4 --profile            # plus the per-kernel table of a step
    python scripts/bench_decode.py --tiny                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

import numpy as np
from bench_common import copy_bandwidth
from profile_table import format_table, profile


def step_bytes(model, batch: int, context: int) -> tuple[int, int]:
    """(bytes a decode step must read, of which routed experts) for `batch` rows at `context`."""
    import jax
    from flax import nnx

    from kimi_jax.quant import is_routed_expert

    cfg = model.cfg
    total = experts = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(var.get_value()))
        if path == ("embed",):
            size = size // cfg.vocab_size * batch  # only the rows of this step's tokens
        elif is_routed_expert(path, var):
            # distinct experts touched per layer under uniform routing (docs/performance-targets.md)
            touched = cfg.n_routed_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch)
            size = int(size * touched / cfg.n_routed_experts)
            experts += size
        total += size
    cache = cfg.num_hidden_layers * cfg.cache_dim * 2 * context * batch
    return total + cache, experts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="layers (the first dense, the rest MoE)")
    ap.add_argument("--context", type=int, default=4096, help="tokens already in the cache")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 10 engine steps at the first batch size: device time per kernel, device idle")
    ap.add_argument("--impl", default=None, help="kernel implementation (default: the platform's)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.config import K2_THINKING, TINY, Int4Quant
    from kimi_jax.engine import BatchEngine
    from kimi_jax.model import KimiK2
    from kimi_jax.sampling import SamplingParams

    if args.tiny:
        cfg = TINY.replace(quantization=Int4Quant(group_size=16))
    else:
        cfg = K2_THINKING.replace(num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    model = KimiK2(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0))
    jax.block_until_ready(nnx.state(model))
    print(f"built {cfg.num_hidden_layers}-layer K2-shaped model in {time.perf_counter() - t0:.0f}s on {jax.devices()[0]}",
          file=sys.stderr)
    bw = copy_bandwidth(1 << 26 if args.tiny else 1 << 30)
    profiles = {}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        engine = BatchEngine(model, max_batch=batch, prefill_rows=batch, max_len=args.context + args.steps + 64,
                             chunk=min(512, args.context), impl=args.impl)
        rng = np.random.default_rng(batch)
        engine.generate(rng.integers(0, min(1000, cfg.vocab_size), (batch, args.context)).tolist(), SamplingParams(max_new_tokens=3))
        reqs = engine.generate(rng.integers(0, min(1000, cfg.vocab_size), (batch, args.context)).tolist(),  # not prefix-cached
                               SamplingParams(max_new_tokens=args.steps))
        first = max(r.first_token_at for r in reqs)
        step_s = (max(r.finished_at for r in reqs) - first) / max(1, args.steps - 1)
        if args.profile and not profiles:
            profiles[batch] = profile_steps(engine, rng.integers(0, min(1000, cfg.vocab_size), (batch, args.context)).tolist())
        need, exp = step_bytes(model, batch, args.context)
        rows.append(dict(batch=batch, context=args.context, step_ms=step_s * 1e3, tok_s=batch / step_s,
                         bytes_per_step=need, expert_bytes=exp, roofline_ms=need / bw * 1e3,
                         achieved_gb_s=need / step_s / 1e9, peak_gb_s=bw / 1e9,
                         prefill_s=first - min(r.submitted_at for r in reqs)))
    dev = jax.devices()[0].device_kind
    print(f"| date | device | layers | batch | context | step ms | tok/s | bytes/step | roofline ms | GB/s (of {bw / 1e9:,.0f}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {datetime.date.today()} | {dev} | {cfg.num_hidden_layers} | {r['batch']} | {r['context']} | "
              f"{r['step_ms']:.2f} | {r['tok_s']:,.0f} | {r['bytes_per_step'] / 1e9:.2f} GB | {r['roofline_ms']:.2f} | "
              f"{r['achieved_gb_s']:,.0f} ({r['achieved_gb_s'] / r['peak_gb_s']:.0%}) |")
    for batch, table in profiles.items():
        print(f"\nprofile of 10 engine iterations (a block of decode steps each), batch {batch}, "
              f"context {args.context}:")
        print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "layers": cfg.num_hidden_layers, "rows": rows,
                       "profiles": {b: dataclasses.asdict(t) for b, t in profiles.items()}}, f, indent=2)
    return 0


def profile_steps(engine, prompts, steps: int = 10):
    """Profile `steps` scheduler iterations of a running batch: each one dispatches a block of
    decode steps and reads the previous block's tokens, so host gaps show up as device idle time."""
    from kimi_jax.sampling import SamplingParams
    from kimi_jax.scheduler import DEFAULT_DECODE_BLOCK

    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))  # the programs are compiled already
    running = [engine.submit(p, SamplingParams(max_new_tokens=(steps + 8) * DEFAULT_DECODE_BLOCK))
               for p in prompts]
    while not all(r.tokens for r in running):  # prefill everything first
        engine.step()
    table = profile(engine.step, steps=steps, warmup=2)
    while engine.step():
        pass
    return table


if __name__ == "__main__":
    sys.exit(main())
