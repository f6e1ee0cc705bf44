"""How far bfloat16 runs drift from float32 at long context: the rows of BENCHMARKS.md's
"bf16 drift" table, the documented tolerance of a bf16 run.

    python scripts/bench_bf16_drift.py                      # 4K and 32K tokens, as in BENCHMARKS.md
    python scripts/bench_bf16_drift.py --lengths 4096 --new 16

The checkpoint is kimi_jax.fixtures.LONG_CONTEXT (K2 Thinking's exact rotary settings, one dense
and one MoE layer, one head) written with a rope gain, so attention is peaked as in
tests/test_long_context.py; the same weights are loaded once as float32 and once as bfloat16. For
each prompt length (a random prompt with repeated motifs):

- logits: `forward_no_cache` at every prompt position in both dtypes; the largest |difference| per
  position, its maximum, 99th percentile and median over positions, and how often the two argmaxes
  agree (teacher-forced top-1);
- greedy: `--new` tokens through the engine (chunked prefill, paged cache, cached decode) in both
  dtypes; how many leading tokens agree, and how many in all.

Needs only kimi_jax; 32K tokens take about 2 GB of memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time

import numpy as np


def drift(directory: str, cfg, tokens: int, new: int, *, chunk: int, seed: int) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    import kimi_jax
    from kimi_jax.fixtures import motif_prompt

    prompt = motif_prompt(cfg, tokens, seed=seed)
    logits, greedy = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = kimi_jax.load(directory, dtype=dtype, progress=False)
        logits[dtype] = np.asarray(nnx.jit(lambda m, t: m.forward_no_cache(t))(model, jnp.asarray([prompt])))[0]
        engine = kimi_jax.BatchEngine(model, max_batch=1, max_len=tokens + new + 1, chunk=chunk)
        (request,) = engine.generate([prompt], kimi_jax.SamplingParams(max_new_tokens=new))
        greedy[dtype] = list(request.tokens)
        del model, engine
        gc.collect()
    diff = np.abs(logits["bfloat16"] - logits["float32"]).max(-1)
    same = [a == b for a, b in zip(greedy["float32"], greedy["bfloat16"])]
    return {
        "prompt_tokens": tokens,
        "max_logit_diff": float(diff.max()),
        "p99_logit_diff": float(np.quantile(diff, 0.99)),
        "median_logit_diff": float(np.median(diff)),
        "logit_scale": float(np.abs(logits["float32"]).max()),
        "top1_agreement": float(np.mean(logits["float32"].argmax(-1) == logits["bfloat16"].argmax(-1))),
        "new_tokens": new,
        "greedy_leading_equal": same.index(False) if False in same else len(same),
        "greedy_equal": sum(same),
    }


def markdown(rows: list[dict], command: str, rope_gain: float) -> str:
    lines = ["| date | machine | command | rope gain | prompt tokens | max \\|Δlogit\\| | p99 over positions "
             "| median | logit scale | top-1 agreement | greedy: leading equal | greedy: equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {time.strftime('%Y-%m-%d')} | 2-core CPU VM (shared) | `{command}` | {rope_gain:g} "
                     f"| {r['prompt_tokens']:,} | {r['max_logit_diff']:.3f} | {r['p99_logit_diff']:.3f} "
                     f"| {r['median_logit_diff']:.3f} "
                     f"| {r['logit_scale']:.2f} | {100 * r['top1_agreement']:.2f}% "
                     f"| {r['greedy_leading_equal']} / {r['new_tokens']} | {r['greedy_equal']} / {r['new_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768], help="prompt lengths")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens compared after each prompt")
    ap.add_argument("--chunk", type=int, default=2048, help="the engine's prefill chunk")
    ap.add_argument("--rope-gain", type=float, default=4.0, help="scale of the q/k rope weights (peakedness)")
    ap.add_argument("--seed", type=int, default=0, help="checkpoint and prompt seed")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if min(args.lengths) < 2 or args.new < 1 or args.chunk < 1:
        print("error: --lengths must be >= 2, --new and --chunk >= 1", file=sys.stderr)
        return 2

    from kimi_jax.fixtures import LONG_CONTEXT, make_fixture_checkpoint

    cfg = LONG_CONTEXT
    if max(args.lengths) >= cfg.max_position_embeddings:
        print(f"error: --lengths must stay below {cfg.max_position_embeddings:,} positions", file=sys.stderr)
        return 2

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        make_fixture_checkpoint(directory, cfg, seed=args.seed, tokenizer=False, rope_gain=args.rope_gain)
        for tokens in args.lengths:
            t0 = time.perf_counter()
            rows.append(drift(directory, cfg, tokens, args.new, chunk=args.chunk, seed=args.seed))
            print(json.dumps({**rows[-1], "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    command = "python scripts/bench_bf16_drift.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, command.strip(), args.rope_gain))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
