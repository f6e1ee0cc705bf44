"""Evaluate kimi-k2-nano through the real agent loop, greedy, on five sets that cannot flatter it.

    python scripts/eval_nano.py --qat checkpoints/kimi-k2-nano --float out/nano_float --data out/agent_data
    python scripts/eval_nano.py --limit 8      # a quick look: the first 8 items of each set

Sets (written by scripts/make_agent_data.py): `heldout` (training families, unseen values),
`paraphrase` (questions worded by templates training never saw), `ood` (questions no tool answers
and greetings: the reply must come without a tool call), `multistep` (two or three calls, a
result feeding the next call) and `followup` (a second turn that works on the first turn's answer,
"Now add 50 to that."; both turns must be right). Variants: the float weights before QAT served in bf16, the same
weights quantized after training (INT4 PTQ), and the QAT checkpoint (INT4 QAT).

Every item is replayed user turn by user turn with the model's own replies; tools run for real
with each item's clock and an empty store, as when the data was made. An item succeeds when the
turn ends in an answer that contains the expected answer and
  - for a tool task: the model's successful tool calls returned exactly the reference results, in
    order, and its last call returned what the reference's last call returned (so a task that ends
    in a tool error — an unknown name — needs that call made, not guessed); retries after an error
    are allowed, a skipped or wrong call or an answer without the tool is not
  - for a no-tool item: the model made no tool call at all.
Also reported: tool-call validity (a declared tool name, and arguments valid under that tool's
schema) and right tools (the names of the successful calls match the reference). Each variant runs
with strict tool calls (the agent loop's default: the engine holds every call to the schemas) and,
with `--strict-tools both`, also without.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jsonschema

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SETS = ("heldout", "paraphrase", "ood", "multistep", "followup")
SET_TITLES = {"heldout": "held-out", "paraphrase": "paraphrase", "ood": "out-of-domain", "multistep": "multi-step",
              "followup": "second turn"}
# For the shipped INT4 QAT model (issue 18).
TARGETS = {"heldout": 0.90, "paraphrase": 0.80, "ood": 0.80, "multistep": 0.75, "followup": 0.80}


# ---- scoring (pure: transcripts in, verdicts out) ---------------------------------------------------

def tool_steps(messages: list[dict]) -> list[tuple[str, str, str]]:
    """(name, arguments, result) of every tool call in an OpenAI-style message list, in order.
    Results pair with calls by position, not by id: a weak model may give two calls one id."""
    calls = [c for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    results += [""] * (len(calls) - len(results))
    return [(c["function"]["name"], c["function"]["arguments"], r) for c, r in zip(calls, results)]


def _is_error(result: str) -> bool:
    return result.startswith("error:")  # how ToolRegistry.call words every failure


def score(item: dict, messages: list[dict], stop_reason: str) -> dict:
    """Verdicts on one model transcript (`messages`, the turn's `stop_reason`) against `item`."""
    made, expected = tool_steps(messages), tool_steps(item["messages"])
    declared = {t["function"]["name"]: t["function"].get("parameters") or {} for t in item.get("tools") or []}

    def args_ok(name, arguments):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and jsonschema.Draft202012Validator(declared[name]).is_valid(value)

    def succeeded(steps):
        return [(name, result) for name, _, result in steps if not _is_error(result)]

    final = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "assistant"), "")
    answered = stop_reason == "answer" and item["answer"].lower() in final.lower()
    if expected:
        grounded = succeeded(made) == succeeded(expected) and bool(made) and made[-1][::2] == expected[-1][::2]
    else:
        grounded = not made
    return {"id": item["id"], "family": item["family"], "success": answered and grounded,
            "valid": all(name in declared and args_ok(name, arguments) for name, arguments, _ in made),
            "right_tools": [n for n, _ in succeeded(made)] == [n for n, _ in succeeded(expected)] and
            (bool(made) == bool(expected)), "answer": final, "calls": [list(s) for s in made]}


def summarize(results: list[dict]) -> dict:
    n = max(1, len(results))
    return {k: sum(r[k] for r in results) / n for k in ("success", "valid", "right_tools")} | {"n": len(results)}


# ---- running the model ------------------------------------------------------------------------

def run_item(rt, item: dict, max_steps: int, strict: bool = True) -> tuple[list[dict], str]:
    """The model's transcript of `item`: every user turn sent through the agent loop."""
    from make_agent_data import registry_for

    from kimi_jax.agent import Conversation

    names = [t["function"]["name"] for t in item.get("tools") or []]
    conv = Conversation(rt, tools=registry_for(item["id"]), max_steps=max_steps, tool_names=names or None,
                        strict_tools=strict)
    stop = "answer"
    for m in item["messages"]:
        if m["role"] == "user":
            stop = conv.send(m["content"]).stop_reason
    return conv.messages, stop


def load_variants(args) -> dict:
    from kimi_jax.engine import BatchEngine
    from kimi_jax.export import quantize_experts
    from kimi_jax.runtime import Runtime

    variants = {}
    if args.float:
        rt = Runtime.load(args.float, dtype="bfloat16", max_len=args.max_len, progress=False)
        variants["bf16 (no quantization)"] = rt
        q = quantize_experts(rt.model)
        engine = BatchEngine(q, max_batch=1, max_len=rt.engine.max_len, chunk=rt.engine.chunk,
                             page_size=rt.engine.page_size, mesh=rt.mesh)
        variants["INT4 PTQ"] = dataclasses.replace(rt, model=q, engine=engine)
    if args.qat:
        variants["INT4 QAT"] = Runtime.load(args.qat, dtype="bfloat16", max_len=args.max_len, progress=False)
    if not variants:
        raise SystemExit("error: nothing to evaluate: --qat and --float are both empty")
    return variants


def read_set(data_dir: str, name: str, limit: int | None) -> list[dict]:
    path = os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found (run scripts/make_agent_data.py --out {data_dir})")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f][:limit]


def markdown(summary: dict, sets: list[str]) -> str:
    """Task success per set and variant, then tool-call validity and right tools over all sets."""
    counts = {s: next(iter(summary.values()))[s]["n"] for s in sets}
    lines = ["| weights | " + " | ".join(f"{SET_TITLES[s]} ({counts[s]})" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for name, per_set in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{per_set[s]['success']:.1%}" for s in sets) + " |")
    lines.append("| target (INT4 QAT) | " + " | ".join(f"≥ {TARGETS[s]:.0%}" for s in sets) + " |")
    lines += ["", "| weights | tool-call validity | right tools |", "|---|---|---|"]
    for name, per_set in summary.items():
        all_n = sum(per_set[s]["n"] for s in sets)
        valid = sum(per_set[s]["valid"] * per_set[s]["n"] for s in sets) / all_n
        right = sum(per_set[s]["right_tools"] * per_set[s]["n"] for s in sets) / all_n
        lines.append(f"| {name} | {valid:.1%} | {right:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qat", default="checkpoints/kimi-k2-nano", help="INT4 checkpoint ('' to skip it)")
    ap.add_argument("--float", default="out/nano_float", help="pre-QAT float checkpoint ('' to skip bf16 and PTQ)")
    ap.add_argument("--data", default="out/agent_data")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each set")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-steps", type=int, default=6, help="model steps per user turn")
    ap.add_argument("--strict-tools", choices=("on", "off", "both"), default="on",
                    help="strict tool calls (the agent loop's default), free ones, or each variant both ways")
    ap.add_argument("--json", help="write every transcript verdict here")
    ap.add_argument("--solved-sample", metavar="JSONL",
                    help="write the first item of each family that the first variant solved (the bundled "
                         "model's regression set is tests/data/nano_heldout.jsonl)")
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = set(sets) - set(SETS)
    if unknown:
        ap.error(f"--sets: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SETS)}")

    items = {s: read_set(args.data, s, args.limit) for s in sets}
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.strict_tools]
    summary, detail = {}, {}
    for (weights, rt), strict in ((v, m) for v in load_variants(args).items() for m in modes):
        name = weights if len(modes) == 1 else f"{weights}, {'strict' if strict else 'free'} calls"
        t0 = time.perf_counter()
        detail[name] = {s: [score(item, *run_item(rt, item, args.max_steps, strict)) for item in items[s]]
                        for s in sets}
        summary[name] = {s: summarize(detail[name][s]) for s in sets}
        print(f"{name}: " + ", ".join(f"{s} {summary[name][s]['success']:.1%}" for s in sets) +
              f" ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    print(markdown(summary, sets))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "detail": detail}, f, indent=1)
    if args.solved_sample:
        write_solved_sample(args.solved_sample, items, next(iter(detail.values())))
    return 0


def write_solved_sample(path: str, items: dict, verdicts: dict) -> None:
    """The first solved item of each family, sets in order: a regression set the model is known to pass."""
    by_id = {item["id"]: item for per_set in items.values() for item in per_set}
    chosen = {}
    for per_set in verdicts.values():
        for verdict in per_set:
            if verdict["success"]:
                chosen.setdefault(verdict["family"], by_id[verdict["id"]])
    with open(path, "w", encoding="utf-8") as f:
        for item in chosen.values():
            f.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    sys.exit(main())
