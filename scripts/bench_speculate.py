"""Speculative decoding benchmarks: decode speed with and without drafts on copy-heavy text, and the
cost of a verify step against a decode step.

    python scripts/bench_speculate.py                     # copy workloads, the copy model, concurrency 1,8,32
    python scripts/bench_speculate.py --verify-cost --checkpoint DIR   # verify vs decode step, k = 1, 4, 8

Copy workloads (by default on the copy model of scripts/make_copy_model.py, built on first use
into scripts/copy_model/: the bundled nano model does not continue repeated text):
  edit  a 200-line Python file in the prompt, then the start of the same file with one line changed;
        the model goes on copying the rest
  json  JSON records that differ in one field; the model writes the next record
Each request of a run has its own file or records (seeded). The engine with speculation
(`--speculate`, default suffix) and without run the same prompts in the same process, alternately,
after a warm-up run of other prompts (compiles, and the speculating engine's cost measurements).
Decode tok/s counts the tokens generated after the last request got its first token (every prompt
prefilled) over the time from then to the last request's end.

--verify-cost times, on a checkpoint (e.g. the K2-shaped INT4 slice of
`scripts/make_fixture_checkpoint.py --preset k2-thinking --int4 --layers 2 --experts 64`), one decode
step and one verify step with k draft tokens for the same rows, and prints their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COPY_MODEL = os.path.join(HERE, "copy_model")

WORDS = ("alpha beta gamma delta total count index value items result buffer offset limit retries timeout name "
         "path mode size level queue store cache token stream batch").split()


def _ident(rng) -> str:
    return str(rng.choice(WORDS))


def python_file(rng, lines: int = 200) -> list[str]:
    """A plausible Python module of `lines` lines: imports, constants, small functions."""
    out = ["import os", "import sys", ""]
    while len(out) < lines:
        kind = rng.integers(3)
        if kind == 0:
            out.append(f"{_ident(rng).upper()} = {int(rng.integers(1, 1000))}")
        else:
            args = ", ".join(_ident(rng) for _ in range(int(rng.integers(1, 4))))
            out.append(f"def {_ident(rng)}({args}):")
            for _ in range(int(rng.integers(2, 7))):
                out.append(f"    {_ident(rng)} = {_ident(rng)}({int(rng.integers(0, 100))})")
            out.append(f"    return {_ident(rng)}")
            out.append("")
    return out[:lines]


def edit_prompt(rng) -> str:
    """A 200-line file, then its first lines again with one of them changed: the model continues."""
    lines = python_file(rng)
    head = int(rng.integers(8, 16))
    changed = list(lines[:head])
    at = int(rng.integers(3, head))
    changed[at] = changed[at].rstrip() + "  # changed"
    return "\n".join(lines) + "\n\n# the same file after the edit:\n" + "\n".join(changed) + "\n"


def json_prompt(rng) -> str:
    """Records that differ in one field (the id), and the start of the next one."""
    fields = {_ident(rng): (int(rng.integers(0, 10000)) if rng.random() < 0.4 else _ident(rng)) for _ in range(12)}
    records = [json.dumps({"id": i, **fields}) for i in range(1, 4)]
    return "\n".join(records) + "\n"


WORKLOADS = {"edit": edit_prompt, "json": json_prompt}


def timed_run(engine, prompts: list[list[int]], max_new: int) -> dict:
    """Run the prompts together; decode tok/s after the last first token (see the module doc)."""
    from kimi_jax.sampling import SamplingParams

    events = []
    params = SamplingParams(max_new_tokens=max_new)
    spec = engine.scheduler.spec
    before = dict(spec.stats) if spec is not None else {}
    requests = [engine.submit(p, params, lambda r, t, done: events.append((time.perf_counter(), len(t))))
                for p in prompts]
    engine.wait(requests)
    start = max(r.first_token_at for r in requests)
    end = max(r.finished_at for r in requests)
    decoded = sum(n for t, n in events if t > start)
    delta = {k: v - before[k] for k, v in spec.stats.items()} if spec is not None else {}
    return {"decode_tok_s": decoded / (end - start) if end > start else float("nan"), "tokens": decoded,
            "outputs": [r.tokens for r in requests], **delta}


def copy_benchmark(args) -> list[dict]:
    from kimi_jax.drafting import SuffixIndex
    from kimi_jax.runtime import Runtime

    if args.checkpoint == COPY_MODEL and not os.path.isdir(COPY_MODEL):
        from make_copy_model import build

        build(COPY_MODEL)
    rows = []
    for workload in args.workloads:
        for clients in args.levels:
            rt = {mode: Runtime.load(args.checkpoint, max_len=args.max_len, max_batch=clients, speculate=mode,
                                     draft_tokens=args.draft_tokens, progress=False, compile_cache=False)
                  for mode in ("off", args.speculate)}
            tok = rt["off"].tokenizer
            make = WORKLOADS[workload]
            warm = [tok.encode(make(np.random.default_rng(10_000 + i))) for i in range(clients)]
            timed = [tok.encode(make(np.random.default_rng(i))) for i in range(clients)]
            spec_engine = rt[args.speculate].engine
            for r in rt.values():
                r.engine.warm_up()  # every program compiled before anything is timed
                timed_run(r.engine, warm, args.max_new_tokens)
            results = {"off": [], args.speculate: []}
            for _ in range(args.repeats):
                for mode, r in rt.items():
                    if r.engine is spec_engine and spec_engine.scheduler.spec.shared is not None:
                        spec_engine.scheduler.spec.shared = SuffixIndex(spec_engine.scheduler.spec.shared.capacity)
                    results[mode].append(timed_run(r.engine, timed, args.max_new_tokens))
            off, on = results["off"], results[args.speculate]
            same = all(a["outputs"] == b["outputs"] for a, b in zip(off, on))
            rate = lambda runs: float(np.mean([x["decode_tok_s"] for x in runs]))  # noqa: E731
            total = {k: sum(x[k] for x in on) for k in spec_engine.scheduler.spec.stats}
            row = {"workload": workload, "concurrency": clients, "prompt_tokens": int(np.mean([len(p) for p in timed])),
                   "decode_tok_s_off": rate(off), "decode_tok_s_on": rate(on), "speedup": rate(on) / rate(off),
                   "verify_steps": total["verify_steps"], "drafted": total["drafted_tokens"],
                   "accepted": total["accepted_tokens"], "same_tokens": same,
                   "tokens_per_verify_row": total["verify_tokens"] / max(1, total["verify_rows"]),
                   "accepted_per_verify_row": total["accepted_tokens"] / max(1, total["verify_rows"]),
                   "off_runs": [x["decode_tok_s"] for x in off], "on_runs": [x["decode_tok_s"] for x in on]}
            rows.append(row)
            print(f"{workload} x{clients}: {row['decode_tok_s_off']:.1f} -> {row['decode_tok_s_on']:.1f} decode tok/s "
                  f"({row['speedup']:.2f}x), {row['tokens_per_verify_row']:.2f} tokens per verify step and request, "
                  f"same tokens: {same}", file=sys.stderr, flush=True)
    return rows


def verify_cost(args) -> list[dict]:
    """Seconds of one decode step and of verify steps of k drafts, the same rows and context."""
    import jax
    import jax.numpy as jnp

    from kimi_jax.checkpoint import load_model
    from kimi_jax.model import default_impl
    from kimi_jax.steps import split_model

    model, cfg = load_model(args.checkpoint, dtype=jnp.bfloat16, progress=False)
    model_def, weights = split_model(model)
    out = []
    for batch in args.cost_batches:
        row = _step_costs(model_def, weights, cfg, default_impl(), batch, args.cost_context, args.cost_k, args.reps)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
        jax.clear_caches()
    return out


def _step_costs(model_def, weights, cfg, impl: str, batch: int, context: int, ks: list[int], reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from bench_common import device_time

    from kernels_pallas.backends import backend_for
    from kimi_jax.cache import PagedCache
    from kimi_jax.sampling import SamplingParams, knob_arrays
    from kimi_jax.steps import SlotState, decode_steps, prefill_step, verify_step

    backend = backend_for(jax.default_backend())
    ps = backend.page_size
    pages = -(-(context + 16) // ps)
    cache = PagedCache.create(cfg, slots=batch, max_len=pages * ps, page_size=ps, n_pages=1 + batch * pages,
                              dtype=jnp.bfloat16, page_order=backend.page_order, words=backend.cache_words)
    cache = cache.with_table(1 + np.arange(batch * pages, dtype=np.int32).reshape(batch, pages))
    knobs = knob_arrays([SamplingParams()] * batch)
    state = SlotState.create(batch, cache.lengths.sharding)
    rng = np.random.default_rng(0)
    rows = np.arange(batch, dtype=np.int32)
    one = jnp.int32(1)  # decode steps per timed call
    for start in range(0, context, 128):  # the context, in chunks
        n = min(128, context - start)
        _, _, cache, state = prefill_step(model_def, weights, cache, state,
                                          rng.integers(0, 1000, (batch, 128)).astype(np.int32), rows,
                                          np.full(batch, start, np.int32), np.full(batch, n, np.int32),
                                          np.full(batch, 8 if start + n == context else -1, np.int32), knobs, impl=impl)
    lengths = np.asarray(cache.lengths)  # a host copy: the device array goes with the donated cache
    live = {"cache": cache, "state": state}

    def fresh():  # every timed call starts from the same lengths and budgets (the buffers are donated)
        c, s = live["cache"], live["state"]
        return (PagedCache(c.pages, c.page_table, jnp.asarray(lengths), c.page_order),
                SlotState(s.tokens, jnp.ones(batch, bool), jnp.full(batch, 8, jnp.int32)))

    def decode():
        c, s = fresh()
        t, _, live["cache"], live["state"] = decode_steps(model_def, weights, c, s, rows, one, knobs, max_steps=1,
                                                        impl=impl)
        return t

    def verify(drafts, n_draft):
        c, s = fresh()
        t, live["cache"], live["state"] = verify_step(model_def, weights, c, s, rows, drafts, n_draft, knobs,
                                                      impl=impl)
        return t

    base, _ = device_time(decode, (), reps=reps)
    row = {"batch": batch, "context": context, "decode_s": base}
    for k in ks:
        seconds, _ = device_time(verify, (rng.integers(0, 1000, (batch, k)).astype(np.int32),
                                          np.full(batch, k, np.int32)), reps=reps)
        row[f"verify_k{k}_s"], row[f"ratio_k{k}"] = seconds, seconds / base
    return row


def k2_projection(tokens_per_step: float, max_draft: int, ks: list[int], batches=(1, 8, 32),
                  context: int = 8192) -> list[dict]:
    """Bytes a K2 Thinking step must read (INT4 experts, bf16 rest, `context` tokens of cache per
    row) for a verify step of k drafts per row, over a decode step's: every non-expert weight once,
    each token's embedding row, and the routed experts its tokens select (uniform routing: a layer's
    distinct experts for T tokens are E(1 - (1 - 8/E)^T)). On a GPU a step is bound by those bytes,
    so this ratio is its cost in decode steps. The tokens a verify step makes with k drafts come
    from a per-token acceptance fitted to `tokens_per_step` measured with up to `max_draft` drafts
    (geometric: 1 + a + ... + a^k)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.config import K2_THINKING
    from kimi_jax.model import abstract_model
    from kimi_jax.quant import is_routed_expert

    cfg = K2_THINKING
    _, state = abstract_model(cfg, jnp.bfloat16)
    fixed = experts = embed_row = 0
    for path, var in nnx.to_flat_state(state):
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(var.get_value()))
        if path == ("embed",):
            embed_row = size // cfg.vocab_size
        elif is_routed_expert(path, var):
            experts += size
        else:
            fixed += size
    per_token_cache = cfg.num_hidden_layers * cfg.cache_dim * 2
    lo, hi = 0.0, 1.0
    for _ in range(60):  # fit a: sum of a^i for i <= max_draft equals the measured tokens per step
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a ** i for i in range(max_draft + 1)) < tokens_per_step else (lo, a)
    e, top = cfg.n_routed_experts, cfg.num_experts_per_tok

    def step(batch, k):
        t = batch * (k + 1)
        return fixed + embed_row * t + experts * (1 - (1 - top / e) ** t) + per_token_cache * context * batch

    rows = []
    for batch in batches:
        for k in ks:
            cost = step(batch, k) / step(batch, 0)
            made = sum(a ** i for i in range(k + 1))
            rows.append({"batch": batch, "k": k, "acceptance": a, "bytes_ratio": cost, "tokens_per_step": made,
                         "speedup": made / cost})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=COPY_MODEL, help="default: the copy model (scripts/copy_model, built if missing)")
    p.add_argument("--workloads", default="edit,json")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-len", type=int, default=4096, help="context of each engine (an edit prompt is ~2,450 tokens)")
    p.add_argument("--speculate", default="suffix", choices=("ngram", "suffix"))
    p.add_argument("--draft-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine, alternating (default 2)")
    p.add_argument("--verify-cost", action="store_true", help="time verify steps against a decode step instead")
    p.add_argument("--cost-batches", default="1,8")
    p.add_argument("--cost-k", default="1,4,8")
    p.add_argument("--cost-context", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--project", type=float, metavar="TOKENS_PER_STEP",
                   help="instead: project K2 on a GPU from this measured number of tokens per verify step")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.levels = [int(x) for x in args.concurrency.split(",") if x]
    args.cost_batches = [int(x) for x in args.cost_batches.split(",") if x]
    args.cost_k = [int(x) for x in args.cost_k.split(",") if x]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench_serve import machine

    if args.project:
        rows = k2_projection(args.project, args.draft_tokens, args.cost_k)
        print("| batch | k | bytes per step, x decode | tokens per step | projected speedup |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch']} | {r['k']} | {r['bytes_ratio']:.2f} | {r['tokens_per_step']:.2f} | "
                  f"{r['speedup']:.2f}x |")
        print(f"(per-token acceptance fitted: {rows[0]['acceptance']:.3f})")
        return 0
    rows = verify_cost(args) if args.verify_cost else copy_benchmark(args)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "command": " ".join(["python scripts/bench_speculate.py", *(argv if argv is not None else sys.argv[1:])]),
              "checkpoint": args.checkpoint, "rows": rows}
    if args.verify_cost:
        print("| batch | context | decode step | " + " | ".join(f"verify k={k}" for k in args.cost_k) + " |")
        print("|---|---|---|" + "---|" * len(args.cost_k))
        for r in rows:
            print(f"| {r['batch']} | {r['context']} | {1e3 * r['decode_s']:.1f} ms | " + " | ".join(
                f"{1e3 * r[f'verify_k{k}_s']:.1f} ms ({r[f'ratio_k{k}']:.2f}x)" for k in args.cost_k) + " |")
    else:
        print("| workload | concurrency | prompt tokens | decode tok/s off | decode tok/s on | speedup | "
              "tokens per verify step and request | drafted / accepted | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['workload']} | {r['concurrency']} | {r['prompt_tokens']} | {r['decode_tok_s_off']:.1f} | "
                  f"{r['decode_tok_s_on']:.1f} | {r['speedup']:.2f}x | {r['tokens_per_verify_row']:.2f} | "
                  f"{r['drafted']} / {r['accepted']} | {r['same_tokens']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
