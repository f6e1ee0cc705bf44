"""Greedy decoding after a long prompt: kimi_jax's engine against transformers' DeepseekV3ForCausalLM
(both float32; the reference prefills in chunks and decodes with its cache) on a 2-layer checkpoint
with K2 Thinking's exact rotary settings and peaked attention (kimi_jax.fixtures.LONG_CONTEXT
written with a rope gain), so that a rotation off by a few thousandths of a radian changes tokens.

    python scripts/long_context_greedy.py --tokens 131072 --new 12

Prints one JSON line: how many of the greedy tokens equal the reference's, where they first differ,
and the reference's smallest top-2 logit margin over the steps (how close a step was to a tie).
At 131,072 tokens this takes about an hour on a 2-core CPU; tests/test_long_context.py runs the
same comparison at 16K in CI. Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def compare(tokens: int, new: int, *, chunk: int = 2048, rope_gain: float = 4.0, seed: int = 0,
            same_frequencies: bool = False) -> dict:
    import torch

    import kimi_jax
    from kimi_jax import rope
    from kimi_jax.fixtures import LONG_CONTEXT, make_fixture_checkpoint, motif_prompt
    from kimi_jax.reference import load_reference, reference_greedy_cached

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        make_fixture_checkpoint(directory, LONG_CONTEXT, seed=seed, tokenizer=False, rope_gain=rope_gain)
        prompt = motif_prompt(LONG_CONTEXT, tokens, seed=seed)
        model = kimi_jax.load(directory, dtype="float32", progress=False)
        engine = kimi_jax.BatchEngine(model, max_batch=1, max_len=tokens + new + 1, chunk=chunk)
        (request,) = engine.generate([prompt], kimi_jax.SamplingParams(max_new_tokens=new))
        ours = list(request.tokens)
        t_ours = time.perf_counter() - t0
        reference = load_reference(directory)
        if same_frequencies:
            reference.model.rotary_emb.inv_freq.copy_(torch.as_tensor(rope.inv_freq(LONG_CONTEXT)))
        theirs, margins = reference_greedy_cached(reference, prompt, new, chunk=chunk)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return {"prompt_tokens": tokens, "new_tokens": new, "equal": sum(a == b for a, b in zip(ours, theirs)),
            "first_difference": first_diff, "reference_min_top2_margin": round(min(margins), 4),
            "same_frequencies": same_frequencies, "rope_gain": rope_gain, "seed": seed,
            "kimi_jax": ours, "transformers": theirs,
            "seconds_kimi_jax": round(t_ours, 1), "seconds_total": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="prompt length")
    ap.add_argument("--new", type=int, default=12, help="greedy tokens to compare")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk, both sides")
    ap.add_argument("--rope-gain", type=float, default=4.0, help="scale of the q/k rope weights (peakedness)")
    ap.add_argument("--seed", type=int, default=0, help="checkpoint and prompt seed")
    ap.add_argument("--same-frequencies", action="store_true",
                    help="give transformers kimi_jax's rotary frequencies (tells a frequency difference apart)")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.new < 1 or args.chunk < 1:
        print("error: --tokens, --new and --chunk must be >= 1", file=sys.stderr)
        return 2
    print(json.dumps(compare(args.tokens, args.new, chunk=args.chunk, rope_gain=args.rope_gain, seed=args.seed,
                             same_frequencies=args.same_frequencies)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
