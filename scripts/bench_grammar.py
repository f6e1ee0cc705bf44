"""Cost of strict tool calls: the host's mask work per decode step against the step itself.

For R constrained rows (default 1, 8 and 32) this measures, on the bundled nano model:
  mask     the host's work per decode step for R rows: `mask()` and `accept()` of each row's
           OutputConstraint (tool_choice required over the builtin tools, so every step is
           masked), driven by random tokens drawn under the masks as a model would be;
  step     one decode step of the engine at R rows, unconstrained (from two generation lengths, so
           prefill drops out);
  engine   with an engine that takes constraints: generated tokens/s of R rows that are all
           constrained (the masked rows run one step per dispatch) against the same R rows free.
The share `mask / step` is the figure the issue targets (<= 5 % at 8 rows).

    python scripts/bench_grammar.py                 # rows 1,8,32 on the nano model (CPU: ~2 min)
    python scripts/bench_grammar.py --rows 8 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def mask_cost(tok, vocab_size: int, rows: int, steps: int, seed: int) -> dict:
    """Seconds of mask() + accept() per decode step for `rows` constrained rows."""
    from constrained_sampling import RandomModel

    from kimi_jax.chat.constraint import output_constraint
    from kimi_jax.chat.grammar import ToolChoice
    from kimi_jax.tools import builtin_tools

    tools = builtin_tools().specs()

    def fresh(i):
        return output_constraint(tok, vocab_size=vocab_size, stop_ids=tok.stop_ids, thinking=False, tools=tools,
                                 tool_choice=ToolChoice("required"))

    constraints = [fresh(i) for i in range(rows)]
    models = [RandomModel(tok, vocab_size, seed + i) for i in range(rows)]
    host, compile_s = 0.0, []
    for _ in range(steps):
        for i in range(rows):
            t0 = time.perf_counter()
            mask = constraints[i].mask()
            host += time.perf_counter() - t0
            token = models[i].next_token(mask)
            t0 = time.perf_counter()
            constraints[i].accept(token)
            host += time.perf_counter() - t0
            if token in tok.stop_ids:  # a finished call: the row starts a new one
                t0 = time.perf_counter()
                constraints[i] = fresh(i)
                compile_s.append(time.perf_counter() - t0)
    return {"mask_per_step_s": host / steps, "mask_per_row_token_us": host / steps / rows * 1e6,
            "grammar_compile_ms": 1e3 * float(np.mean(compile_s)) if compile_s else None}


def step_time(rt, rows: int, short: int, long: int) -> float:
    """Seconds per unconstrained decode step at `rows` rows (the difference of two lengths)."""
    from kimi_jax.sampling import SamplingParams

    prompts = [[5 + i, 6, 7, 8] for i in range(rows)]
    times = {short: [], long: []}
    for n in (short, long) * 4:  # the first two compile; the least of the other three counts
        t0 = time.perf_counter()
        rt.engine.generate(prompts, SamplingParams(max_new_tokens=n))
        times[n].append(time.perf_counter() - t0)
    return (min(times[long][1:]) - min(times[short][1:])) / (long - short)


def engine_rate(rt, tok, rows: int, new_tokens: int, constrained: bool, seed: int) -> float:
    """Generated tokens/s of `rows` requests with a short prompt after which the answer starts, each
    under its own constraint (a required call, every token masked) or free (and then without stop
    tokens, so every request runs its full length). Requests that end early are followed by new
    ones until `rows` * `new_tokens` tokens are made."""
    from kimi_jax.chat.constraint import output_constraint
    from kimi_jax.chat.grammar import ToolChoice
    from kimi_jax.sampling import SamplingParams
    from kimi_jax.tools import builtin_tools

    tools = builtin_tools().specs()
    prompt = tok.encode("What is 17*23?<think></think>", allow_special=True)
    made, started, live = 0, 0, []
    t0 = time.perf_counter()
    while made < rows * new_tokens:
        while len(live) < rows:
            sampling = SamplingParams(temperature=1.0, seed=seed + started, max_new_tokens=new_tokens,
                                      stop_ids=rt.stop_ids() if constrained else ())
            constraint = output_constraint(tok, vocab_size=rt.cfg.vocab_size, stop_ids=rt.stop_ids(),
                                           thinking=False, max_tokens=new_tokens, tools=tools,
                                           tool_choice=ToolChoice("required")) if constrained else None
            live.append(rt.engine.submit(prompt, sampling, constraint=constraint))
            started += 1
        rt.engine.wait(live[:1])
        made += sum(len(r.tokens) for r in live if r.done.is_set())
        live = [r for r in live if not r.done.is_set()]
    rt.engine.wait(live)
    made += sum(len(r.tokens) for r in live)
    return made / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "kimi-k2-nano"))
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--mask-steps", type=int, default=300, help="decode steps of masked rows timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]

    from kimi_jax.runtime import Runtime

    rt = Runtime.load(args.checkpoint, max_len=512, max_batch=max(rows), progress=False)
    tok = rt.tokenizer
    takes_constraints = "constraint" in inspect.signature(rt.engine.submit).parameters
    results = []
    for r in rows:
        row = {"rows": r, **mask_cost(tok, rt.cfg.vocab_size, r, args.mask_steps, args.seed)}
        row["step_s"] = step_time(rt, r, 16, 80)
        row["mask_share"] = row["mask_per_step_s"] / row["step_s"]
        if takes_constraints:
            for constrained in (False, True):  # compiles what each kind of row runs
                engine_rate(rt, tok, r, 16, constrained, args.seed)
            row["free_tok_s"] = engine_rate(rt, tok, r, 64, False, args.seed)
            row["constrained_tok_s"] = engine_rate(rt, tok, r, 64, True, args.seed)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{datetime.date.today()}, {args.checkpoint}, vocabulary {rt.cfg.vocab_size}\n")
    print("| constrained rows | mask + accept per step | per row and token | decode step | mask share | "
          "constrained / free tokens/s |")
    print("|---|---|---|---|---|---|")
    for row in results:
        rate = (f"{row['constrained_tok_s']:.1f} / {row['free_tok_s']:.1f} = "
                f"{row['constrained_tok_s'] / row['free_tok_s']:.2f}" if "free_tok_s" in row
                else "(the engine takes no constraints)")
        print(f"| {row['rows']} | {row['mask_per_step_s'] * 1e3:.3f} ms | {row['mask_per_row_token_us']:.0f} µs | "
              f"{row['step_s'] * 1e3:.2f} ms | {row['mask_share']:.1%} | {rate} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
