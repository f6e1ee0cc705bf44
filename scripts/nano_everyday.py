"""The everyday prompts a new user tries first with the bundled model (issue 18), one line each.

    PYTHONPATH=. python scripts/nano_everyday.py [--checkpoint checkpoints/kimi-k2-nano]

Every prompt but the last runs as `python -m kimi_jax.generate --tools builtin` runs it: the agent
loop, greedy, all nine builtin tools declared, the real clock and an empty note store (a two-turn
prompt is one conversation). The last goes through the OpenAI-compatible server, as a client
uses it: the client runs the tool the model calls and sends the result back, and the answer must
copy that result exactly.

A line is marked ✔ when the model's successful tool calls are exactly the expected tools, in
order, and the answer contains the expected text (for "What time is it?", the time the tool
returned); for a question no tool answers, when it answered without any call. The prompts and
their expectations are `nano_eval_phrasings.EVERYDAY`, which training never sees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_nano import tool_steps  # noqa: E402 - sibling scripts
from nano_eval_phrasings import EVERYDAY  # noqa: E402


def verdict(turns, expected: str, tools: tuple, calls: list[tuple[str, str, str]], answer: str,
            answered: bool) -> tuple[bool, str]:
    """(right, one-line account) of one prompt's transcript: calls are (name, arguments, result)."""
    ok_calls = [(n, a, r) for n, a, r in calls if not r.startswith("error:")]
    right = answered and tuple(n for n, _, _ in ok_calls) == tools
    if right and expected:
        right = expected in answer
    elif right and tools:  # the answer must carry what the last tool returned
        result = json.loads(ok_calls[-1][2]).get("result")
        right = str(result) in answer
    elif right:
        right = not calls and bool(answer.strip())
    shown = "; ".join(f"{n}({a}) -> {r}" for n, a, r in calls) or "no tool call"
    asked = " / ".join(f'"{t}"' for t in turns)
    return right, f"{'✔' if right else '✘'} {asked} → {shown} → {json.dumps(answer, ensure_ascii=False)}"


def run_agent(rt, turns) -> tuple[list, str, bool]:
    """The CLI's path: Conversation with every builtin tool declared."""
    from kimi_jax import Conversation, builtin_tools

    conv = Conversation(rt, tools=builtin_tools())
    result = None
    for text in turns:
        result = conv.send(text)
    return tool_steps(conv.messages), result.content or "", result.stop_reason == "answer"


def run_server(checkpoint: str, turns, max_rounds: int = 4) -> tuple[list, str, bool]:
    """The server's path: chat completions with the nine tool specs; the client runs the tools."""
    from kimi_jax import serve
    from kimi_jax.server.app import create_app
    from kimi_jax.tools import builtin_tools

    tools = builtin_tools()
    args = serve.build_parser().parse_args(["--checkpoint", checkpoint, "--max-len", "1024", "--max-batch", "1",
                                            "--mesh", "data=1"])
    service, engine = serve.build_service(args)
    calls, messages = [], [{"role": "user", "content": t} for t in turns]
    try:
        with serve.BackgroundServer(create_app(service)) as srv:
            for _ in range(max_rounds):
                body = json.dumps({"model": os.path.basename(os.path.normpath(checkpoint)), "messages": messages,
                                   "tools": tools.specs(), "temperature": 0}).encode()
                request = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=300) as r:
                    choice = json.loads(r.read())["choices"][0]
                message = choice["message"]
                if not message.get("tool_calls"):
                    return calls, message.get("content") or "", choice["finish_reason"] == "stop"
                messages.append({k: message[k] for k in ("role", "content", "tool_calls") if k in message})
                for call in message["tool_calls"]:
                    result = tools.call(call["function"]["name"], call["function"]["arguments"]).content
                    calls.append((call["function"]["name"], call["function"]["arguments"], result))
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    finally:
        engine.stop()
    return calls, "", False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/kimi-k2-nano")
    args = ap.parse_args(argv)
    from kimi_jax import Runtime

    rt = Runtime.load(args.checkpoint, max_len=1024, progress=False)
    lines = []
    for k, (turns, expected, tools) in enumerate(EVERYDAY):
        last = k == len(EVERYDAY) - 1
        calls, answer, answered = run_server(args.checkpoint, turns) if last else run_agent(rt, turns)
        right, line = verdict(turns, expected, tools, calls, answer, answered)
        lines.append(right)
        print(("(server) " if last else "") + line, flush=True)
    print(f"{sum(lines)} of {len(lines)} right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
