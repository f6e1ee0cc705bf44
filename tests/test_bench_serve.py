"""The serving benchmark's simulated agent: it runs the calls it gets back and asks again after an answer."""

import json
import random

from scripts_loader import load_script

from kimi_jax.tools import builtin_tools


def test_an_agent_runs_returned_calls_then_asks_its_next_question():
    bench = load_script("bench_serve")
    agent = bench.Agent(random.Random(0), builtin_tools())
    assert [m["role"] for m in agent.messages] == ["system", "user"]
    call = {"id": "functions.calculator:0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "6*7"})}}
    agent.extend({"role": "assistant", "content": "", "reasoning_content": "use it", "tool_calls": [call]})
    assert agent.messages[-1]["role"] == "tool" and "42" in agent.messages[-1]["content"]
    assert agent.messages[-1]["tool_call_id"] == "functions.calculator:0"
    agent.extend({"role": "assistant", "content": "42", "reasoning_content": "done"})
    assert [m["role"] for m in agent.messages[-2:]] == ["assistant", "user"]
    assert agent.messages[-1]["content"].strip()
