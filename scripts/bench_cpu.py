"""CPU benchmark: kimi_jax against transformers on the same random K2-architecture checkpoint.

Measures, in one run and on the same checkpoint (float32 for both):
  * prefill tokens/s of one prompt,
  * decode tokens/s at batch 1 and batch 8 (greedy, fixed number of new tokens),
and prints the latent cache bytes per token. Compilation is timed apart (one warm-up run).

    python scripts/bench_cpu.py                      # print a table
    python scripts/bench_cpu.py --write BENCHMARKS.md  # also append the rows there
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np


def bench_config():
    from kimi_jax.config import TINY, Yarn
    from kimi_jax.fixtures import with_fixture_token_ids

    # Small enough for a 2-core CI box, large enough that work dominates dispatch: K2's branch mix
    # (dense first layer, MLA with q LoRA, 16 experts top-4 + shared, YaRN) at width 256.
    return with_fixture_token_ids(TINY.replace(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=8,
        rope_scaling=Yarn(factor=8.0, original_max_position_embeddings=256), max_position_embeddings=2048))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_ours(path, prompt_len, new_tokens, batches, reps):
    import jax.numpy as jnp

    from kimi_jax.checkpoint import load_model
    from kimi_jax.engine import BatchEngine
    from kimi_jax.sampling import SamplingParams

    model, cfg = load_model(path, dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(0)
    out = {}
    sp = SamplingParams(max_new_tokens=new_tokens)
    for batch in batches:
        # All prompts prefill in one call, then every step decodes the whole batch; prompts differ
        # per run so the prefix cache never serves them.
        engine = BatchEngine(model, max_batch=batch, prefill_rows=batch, max_len=prompt_len + new_tokens + 8,
                             chunk=prompt_len)
        t0 = time.perf_counter()
        engine.generate(rng.integers(0, cfg.vocab_size - 256, (batch, prompt_len)).tolist(), sp)  # compiles
        compile_s = time.perf_counter() - t0
        pre, dec = [], []
        for _ in range(reps):
            reqs = engine.generate(rng.integers(0, cfg.vocab_size - 256, (batch, prompt_len)).tolist(), sp)
            first = max(r.first_token_at for r in reqs)
            pre.append(first - min(r.submitted_at for r in reqs))
            dec.append((max(r.finished_at for r in reqs) - first) / (new_tokens - 1))  # token 1 is prefill's
        out[batch] = dict(prefill_tok_s=batch * prompt_len / np.median(pre), decode_tok_s=batch / np.median(dec),
                          compile_s=compile_s)
    return out


def time_reference(path, prompt_len, new_tokens, batches, reps):
    import torch

    from kimi_jax.reference import load_reference

    model = load_reference(path)
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        ids = torch.as_tensor(rng.integers(0, model.config.vocab_size - 256, (batch, prompt_len)))
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kw)  # warm-up
            pre, total = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                model(ids)
                pre.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                total.append(time.perf_counter() - t0)
        p, t = np.median(pre), np.median(total)
        out[batch] = dict(prefill_tok_s=batch * prompt_len / p, decode_tok_s=batch * (new_tokens - 1) / max(t - p, 1e-9))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", help="append the result rows to this markdown file")
    args = ap.parse_args(argv)

    from kimi_jax.cache import cache_bytes_per_token
    from kimi_jax.config import K2_THINKING
    from kimi_jax.fixtures import make_fixture_checkpoint

    cfg = bench_config()
    batches = (1, 8)
    with tempfile.TemporaryDirectory() as d:
        make_fixture_checkpoint(d, cfg, tokenizer=False, max_shard_bytes=64 << 20)
        ours = time_ours(d, args.prompt_len, args.new_tokens, batches, args.reps)
        ref = time_reference(d, args.prompt_len, args.new_tokens, batches, args.reps)

    date = datetime.date.today().isoformat()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    cmd = "python scripts/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for batch in batches:
        for what, key in (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s")):
            if what == "prefill" and batch != 1:
                continue
            a, b = ours[batch][key], ref[batch][key]
            rows.append(f"| {date} | {machine} | `{cmd.strip()}` | {what} tok/s, batch {batch} "
                        f"(prompt {args.prompt_len}) | {a:,.1f} | {b:,.1f} (transformers, fp32) | {a / b:.1f}x |")
    header = ("| date | machine | command | metric | kimi_jax | reference | ratio |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    print("\n".join(rows))
    print(f"\ncompile (prefill+decode+sample, first run): batch 1 {ours[1]['compile_s']:.1f}s, "
          f"batch 8 {ours[8]['compile_s']:.1f}s")
    print(f"latent cache bytes per token: bench config fp32 {cache_bytes_per_token(cfg, 'float32'):,}, "
          f"K2-Thinking bf16 {cache_bytes_per_token(K2_THINKING, 'bfloat16'):,} "
          f"(per-head K/V would be {61 * 64 * (192 + 128) * 2:,})")
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
