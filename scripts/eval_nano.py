"""Evaluate kimi-k2-nano on the held-out agent tasks, through the real agent loop, greedy.

For each variant — the float weights in bf16, the same weights quantized after training (PTQ), and
the shipped QAT INT4 checkpoint — every eval conversation is replayed user turn by user turn with
the model's own replies; tools run for real (each item's clock and store, as in the data). Metrics:
  tool-call validity  every call the model made names a declared tool and has JSON-object arguments
                      that the tool accepted (no error result)
  right tools         the sequence of tools called equals the reference conversation's
  task success        the final answer contains the expected answer
and writes a markdown table (and --json).

    python scripts/eval_nano.py --qat checkpoints/kimi-k2-nano --float out/nano_float --data out/agent_data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_variants(args):
    from kimi_jax.engine import Engine
    from kimi_jax.export import quantize_experts
    from kimi_jax.runtime import Runtime

    variants = {}
    if args.float:
        rt = Runtime.load(args.float, dtype="bfloat16", max_len=args.max_len, progress=False)
        variants["bf16 (no quantization)"] = rt
        q = quantize_experts(rt.model)
        variants["INT4 PTQ"] = dataclasses.replace(
            rt, model=q, engine=Engine(q, max_len=rt.engine.max_len, chunk=rt.engine.chunk, pad_id=rt.engine.pad_id))
    variants["INT4 QAT (shipped)"] = Runtime.load(args.qat, dtype="bfloat16", max_len=args.max_len, progress=False)
    return variants


def evaluate_item(rt, item, max_steps):
    from make_agent_data import registry_for

    from kimi_jax.agent import Conversation

    messages = item["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    names = [t["function"]["name"] for t in item.get("tools") or []]
    conv = Conversation(rt, tools=registry_for(item["id"]), system=system, max_steps=max_steps,
                        tool_names=names or None)
    called, valid = [], True
    result = None
    for m in messages:
        if m["role"] != "user":
            continue
        result = conv.send(m["content"])
        for step in result.steps:
            for call, res in zip(step["tool_calls"], step["tool_results"]):
                name = call["function"]["name"]
                called.append(name)
                try:
                    args_ok = isinstance(json.loads(call["function"]["arguments"]), dict)
                except json.JSONDecodeError:
                    args_ok = False
                valid &= name in names and args_ok and not res["is_error"]
    expected = [c["function"]["name"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    success = result.stop_reason == "answer" and item["answer"].lower() in result.content.lower()
    return dict(id=item["id"], family=item["family"], valid=valid, right_tools=called == expected, success=success,
                answer=result.content, tokens=len(result.token_ids))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qat", default="checkpoints/kimi-k2-nano")
    ap.add_argument("--float", default="out/nano_float", help="pre-QAT float checkpoint ('' to skip bf16/PTQ)")
    ap.add_argument("--data", default="out/agent_data")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    with open(os.path.join(args.data, "eval.jsonl"), encoding="utf-8") as f:
        items = [json.loads(line) for line in f][:args.limit]
    rows, detail = [], {}
    for name, rt in load_variants(args).items():
        t0 = time.perf_counter()
        results = [evaluate_item(rt, item, args.max_steps) for item in items]
        n = len(results)
        tool_items = [r for r in results if r["family"] != "chat"]
        rows.append((name, sum(r["valid"] for r in tool_items) / max(1, len(tool_items)),
                     sum(r["right_tools"] for r in results) / n, sum(r["success"] for r in results) / n,
                     time.perf_counter() - t0))
        detail[name] = results
        print(f"{name}: success {rows[-1][3]:.1%} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    print(f"| weights | tool-call validity | right tools | task success ({len(items)} held-out tasks) |")
    print("|---|---|---|---|")
    for name, valid, right, success, _ in rows:
        print(f"| {name} | {valid:.1%} | {right:.1%} | {success:.1%} |")
    families = sorted({r["family"] for r in next(iter(detail.values()))})
    print("\n| weights | " + " | ".join(families) + " |\n|---|" + "---|" * len(families))
    for name, results in detail.items():
        cells = [sum(r["success"] for r in results if r["family"] == f) / sum(r["family"] == f for r in results)
                 for f in families]
        print(f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "detail": detail}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
