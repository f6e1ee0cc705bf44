"""Serving benchmark: an agent mix against the OpenAI-compatible server, at several concurrencies.

Starts the server in this process (loopback, a free port) and drives it with the official `openai`
client. Each simulated agent shares one system prompt and the builtin tool declarations, sends its
whole history on every turn (reasoning_content and tool results included), runs the tool calls it
gets back with the builtin tools, and asks its next question when it gets an answer. Reports per
concurrency: aggregate output tokens/s, time to first token and time per output token (p50/p99),
and the fraction of prompt tokens the prefix cache served. In the same run it measures the
static-batch engine's decode throughput at the top concurrency's batch size, the reference the
server's aggregate throughput is compared with.

    python scripts/bench_serve.py --quick                       # nano model on CPU, a couple of minutes
    python scripts/bench_serve.py --checkpoint DIR --mesh ...   # a real checkpoint on accelerators

The load generator shares the process (and its GIL) with the server: on a CPU-only machine that
understates the server slightly; the static reference pays no such cost.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import random
import sys
import time

import numpy as np

QUESTIONS = [
    lambda r: f"What is {r.randint(10, 99)}*{r.randint(10, 99)}?",
    lambda r: f"Convert {r.randint(2, 90)} km to miles.",
    lambda r: f"What is {r.randint(100, 999)} + {r.randint(100, 999)}?",
    lambda r: f"How many days are there between 2024-0{r.randint(1, 9)}-1{r.randint(0, 9)} and 2025-01-01?",
    lambda r: f"Convert {r.randint(30, 200)} pounds to kilograms.",
    lambda r: "Hello! What can you do?",
]
SYSTEM = ("You are a precise assistant. Use the tools for arithmetic, unit conversion, dates and lookups; "
          "answer briefly once you have the result.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="default: the bundled nano model")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--turns", type=int, default=4, help="requests each agent makes (default 4)")
    p.add_argument("--max-tokens", type=int, default=128, help="per request (default 128)")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=None, help="engine slots (default: the top concurrency)")
    p.add_argument("--static-steps", type=int, default=64, help="decode steps of the static-batch reference")
    p.add_argument("--page-size", type=int, default=None, help="cache tokens per page (default: the server's)")
    p.add_argument("--mesh")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculate", choices=("off", "ngram", "suffix"), help="speculative decoding (default: the server's)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 turns, 32 tokens, 32 static steps")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.quick:
        args.turns, args.max_tokens, args.static_steps = 2, 32, 32
    return args


class Agent:
    """One simulated client: a conversation it extends turn by turn."""

    def __init__(self, rng: random.Random, tools):
        self.rng, self.tools = rng, tools
        self.messages = [{"role": "system", "content": SYSTEM}, self._question()]

    def _question(self) -> dict:
        return {"role": "user", "content": self.rng.choice(QUESTIONS)(self.rng)}

    def extend(self, message: dict) -> None:
        """Append the assistant's reply and what the agent does next: run its calls, or ask again."""
        self.messages.append(message)
        calls = message.get("tool_calls") or []
        for call in calls:
            result = self.tools.call(call["function"]["name"], call["function"]["arguments"])
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result.content})
        if not calls:
            self.messages.append(self._question())


async def one_request(client, model, agent: Agent, specs, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    content, reasoning, calls, usage = "", "", {}, None
    stream = await client.chat.completions.create(model=model, messages=agent.messages, tools=specs,
                                                  max_tokens=max_tokens, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            d = choice.delta
            piece = (d.content or "") + (getattr(d, "reasoning_content", None) or "")
            if (piece or d.tool_calls) and first is None:
                first = time.perf_counter()
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for part in d.tool_calls or ():
                slot = calls.setdefault(part.index, {"id": "", "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                slot["id"] = part.id or slot["id"]
                if part.function:
                    slot["function"]["name"] = part.function.name or slot["function"]["name"]
                    slot["function"]["arguments"] += part.function.arguments or ""
    end = time.perf_counter()
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    agent.extend(message)
    n = usage.completion_tokens
    first = first or end
    return {"ttft": first - t0, "tpot": (end - first) / (n - 1) if n > 1 else None, "completion_tokens": n,
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens}


async def run_level(url, model, specs, tools, clients: int, args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    agents = [Agent(random.Random(args.seed * 1000 + i), tools) for i in range(clients)]

    async def drive(agent):
        return [await one_request(client, model, agent, specs, args.max_tokens) for _ in range(args.turns)]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(drive(a) for a in agents)) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = np.array([r["ttft"] for r in results])
    tpot = np.array([r["tpot"] for r in results if r["tpot"] is not None])
    out = sum(r["completion_tokens"] for r in results)
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    return {"concurrency": clients, "requests": len(results), "seconds": wall, "output_tokens": out,
            "output_tok_s": out / wall, "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99),
            "prompt_tokens": prompt, "cached_fraction": cached / prompt if prompt else 0.0}


def static_decode_tok_s(runtime, batch: int, steps: int, prompt_len: int = 64) -> float:
    """Decode tokens/s with every slot busy from start to end: `batch` prompts submitted together,
    `steps` tokens each, no stop tokens; timed from the last row's first token to the last row's end,
    when all rows step together through the same compiled decode program."""
    from kimi_jax.sampling import SamplingParams

    prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=steps, temperature=0.0)
    runtime.engine.generate(prompts, dataclasses.replace(params, max_new_tokens=2))  # compile
    runtime.engine.generate([[p[0] + 1, *p[1:]] for p in prompts], params)  # warm, nothing shared below
    done = runtime.engine.generate([[p[0] + 2, *p[1:]] for p in prompts], params)
    start, end = max(r.first_token_at for r in done), max(r.finished_at for r in done)
    return sum(len(r.tokens) - 1 for r in done) / (end - start)


def lone_request_tpot_ms(runtime, steps: int) -> dict:
    """Time per output token of one request alone: in the server's engine (every other slot idle)
    and in a 1-slot engine over the same weights. Idle slots should cost nothing."""
    from kimi_jax.engine import BatchEngine
    from kimi_jax.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=steps, temperature=0.0)
    alone = BatchEngine(runtime.model, max_batch=1, max_len=runtime.engine.max_len, chunk=runtime.engine.chunk,
                        mesh=runtime.mesh, page_size=runtime.engine.page_size, speculate=runtime.engine.speculate)
    out = {}
    for name, engine in (("one_slot_engine", alone), ("server_engine", runtime.engine)):
        engine.generate([[11, 12, 13]], dataclasses.replace(params, max_new_tokens=2))  # compile
        engine.generate([[21, 22, 23]], params)  # warm
        (r,) = engine.generate([[31, 32, 33]], params)
        out[name] = 1e3 * (r.finished_at - r.first_token_at) / (len(r.tokens) - 1)
    out["ratio"] = out["server_engine"] / out["one_slot_engine"]
    return out


def machine() -> str:
    import jax
    from bench_cpu import cpu_name  # scripts/ is on the path when a script runs

    device = jax.devices()[0]
    where = f"{cpu_name()}, {os.cpu_count()} cores"
    return where if device.platform == "cpu" else f"{jax.device_count()}x {device.device_kind} ({where})"


def main(argv=None) -> int:
    args = parse_args(argv)
    # The nano model's slips (stray tags, unclosed calls) are logged per request; not benchmark output.
    logging.getLogger("kimi_jax.serve").setLevel(logging.ERROR)
    from kimi_jax import serve
    from kimi_jax.server.app import create_app
    from kimi_jax.tools import builtin_tools

    serve_args = serve.build_parser().parse_args(
        [*(["--checkpoint", args.checkpoint] if args.checkpoint else []), "--dtype", args.dtype,
         "--max-batch", str(args.max_batch or max(args.levels)), "--max-queue", str(4 * max(args.levels)),
         *(["--max-len", str(args.max_len)] if args.max_len else []), *(["--mesh", args.mesh] if args.mesh else []),
         *(["--page-size", str(args.page_size)] if args.page_size else []),
         *(["--speculate", args.speculate] if args.speculate else [])])
    t0 = time.perf_counter()
    service, engine = serve.build_service(serve_args)
    print(f"server ready in {time.perf_counter() - t0:.1f}s: {service.runtime.checkpoint}", file=sys.stderr)
    tools = builtin_tools()
    specs = tools.specs()
    rows = []
    try:
        with serve.BackgroundServer(create_app(service)) as srv:
            for clients in args.levels:
                row = asyncio.run(run_level(srv.url, service.settings.model_name, specs, tools, clients, args))
                rows.append(row)
                print(f"concurrency {clients}: {row['output_tok_s']:.1f} output tok/s", file=sys.stderr)
    finally:
        engine.stop()
    batch = max(args.levels)
    static = static_decode_tok_s(service.runtime, batch, args.static_steps)
    lone = lone_request_tpot_ms(service.runtime, args.static_steps)
    top = rows[-1]
    engine_metrics = engine.metrics()
    report = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": " ".join(["python scripts/bench_serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "levels": rows, "static_batch": batch, "static_decode_tok_s": static,
        "ratio_at_top": top["output_tok_s"] / static, "lone_request_tpot_ms": lone,
        "prefix_cache_fraction": sum(r["cached_fraction"] * r["prompt_tokens"] for r in rows)
        / max(1, sum(r["prompt_tokens"] for r in rows)),
        "engine_metrics": engine_metrics,
    }
    print("| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
          "| prompt tokens cached |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | "
              f"{100 * r['cached_fraction']:.1f}% |")
    print(f"\nstatic-batch engine, batch {batch}: {static:.1f} decode tok/s; server at concurrency {top['concurrency']}: "
          f"{top['output_tok_s']:.1f} output tok/s = {100 * report['ratio_at_top']:.1f}% of it (goal >= 80%)")
    print(f"prompt tokens served from the prefix cache: {100 * report['prefix_cache_fraction']:.1f}% (goal >= 90%)")
    if engine_metrics["verify_steps"]:
        print(f"speculation: {engine_metrics['verify_steps']} verify steps, {engine_metrics['draft_tokens']} draft tokens, "
              f"{engine_metrics['draft_tokens_accepted']} accepted, {engine_metrics['tokens_per_verify_row']:.2f} tokens "
              "per verify step and request")
    print(f"one request alone: {lone['server_engine']:.1f} ms per token in the {batch}-slot engine, "
          f"{lone['one_slot_engine']:.1f} ms in a 1-slot engine: {lone['ratio']:.2f}x (goal <= 1.2x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
