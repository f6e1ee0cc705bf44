"""The serving benchmark's simulated agent: it runs the calls it gets back and asks again after an answer."""

import json
import random

from scripts_loader import load_script

from kimi_jax.runtime import DEFAULT_CHECKPOINT, Runtime
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


def test_the_static_batch_reference_times_full_slots_of_the_engine():
    bench = load_script("bench_serve")
    runtime = Runtime.load(DEFAULT_CHECKPOINT, max_batch=2, max_len=128, progress=False)
    tok_s = bench.static_decode_tok_s(runtime, batch=2, steps=6, prompt_len=8)
    assert 0 < tok_s < float("inf")
    assert runtime.engine.metrics()["slots_busy"] == 0  # every request finished
