"""The bundled default model: loads through the INT4 path and solves held-out tasks end to end."""

import json
import os

import pytest
from flax import nnx
from scripts_loader import load_script

from kimi_jax import generate
from kimi_jax.agent import Conversation
from kimi_jax.chat.prompt import encode_chat
from kimi_jax.quant import Int4Weight, is_routed_expert
from kimi_jax.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = os.path.join(ROOT, "checkpoints", "kimi-k2-nano")
# One evaluation item per family that the shipped model solved (written by `scripts/eval_nano.py
# --solved-sample`; the success rates over the whole sets are in checkpoints/kimi-k2-nano/README.md).
with open(os.path.join(ROOT, "tests", "data", "nano_heldout.jsonl"), encoding="utf-8") as f:
    HELDOUT = [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def nano():
    return Runtime.load(NANO, max_len=1024, progress=False)


def test_shipped_checkpoint_is_small_int4_in_the_official_layout(nano):
    size = sum(os.path.getsize(os.path.join(NANO, f)) for f in os.listdir(NANO))
    assert size <= 30e6
    assert nano.cfg.quantization is not None and nano.cfg.quantization.group_size == 32
    experts = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(nano.model))
               if is_routed_expert(p, v)]
    assert experts and all(isinstance(w, Int4Weight) for w in experts)
    rendered = nano.template.render([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>")


@pytest.mark.parametrize("item", HELDOUT, ids=[i["family"] for i in HELDOUT])
def test_greedy_agent_loop_solves_a_task_it_solved_in_its_evaluation(nano, item):
    eval_nano = load_script("eval_nano")
    verdict = eval_nano.score(item, *eval_nano.run_item(nano, item, max_steps=6))
    assert verdict["success"], (verdict["calls"], verdict["answer"])


def test_tool_steps_reuse_the_cache_instead_of_prefilling_the_history(nano):
    conv = Conversation(nano, tools=__import__("kimi_jax.tools", fromlist=["x"]).builtin_tools(),
                        tool_names=["calculator"])
    result = conv.send("What is 12 * 34?")
    assert len(result.steps) == 2 and "408" in result.content
    # The second step re-renders the whole conversation, but every full page of the first step's
    # prompt and reply comes from the prefix cache: only the tail and the tool result are prefilled.
    specs = conv.tools.specs(conv.tool_names)
    first, second = (len(encode_chat(nano.tokenizer, nano.template, conv.messages[:k], specs)) for k in (1, 3))
    page = nano.engine.page_size
    assert result.usage["prompt_tokens"] + result.usage["cached_tokens"] == first + second
    assert result.usage["cached_tokens"] >= first // page * page
    assert result.usage["prompt_tokens"] <= first + (second - first) + page


def test_default_cli_thinks_calls_a_tool_and_answers(capsys):
    assert generate.main(["--tools", "builtin", "--prompt", "What is 17 * 23?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"reasoning_content", "content", "tool_calls", "steps", "token_ids", "usage"}
    assert out["steps"][0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert out["steps"][0]["tool_results"][0]["content"] == '{"result":391}'
    assert "391" in out["content"] and out["steps"][0]["reasoning_content"]


def test_cli_streams_thinking_tool_calls_and_answer_apart(capsys):
    assert generate.main(["--tools", "builtin", "--prompt", "What is 17 * 23?"]) == 0
    out = capsys.readouterr().out
    assert "thinking: The user wants 17 * 23" in out
    assert '-> calculator({"expression":"17 * 23"})' in out and '<- {"result":391}' in out
    assert out.rstrip().endswith("391.")
    hidden = generate.main(["--tools", "builtin", "--prompt", "What is 17 * 23?", "--hide-thinking"])
    assert hidden == 0 and "thinking:" not in capsys.readouterr().out
