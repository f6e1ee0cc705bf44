"""Speculative decoding behind the server: a verify step hands a stream several tokens at once, and
the streamed message must be the one a whole response gives; /metrics counts the drafts; bad
settings are refused before any weight is read."""

import pytest
from served import MODEL, client_for, metrics, nano_server

from kimi_jax import generate, serve
from kimi_jax.speculation import FixedCosts

# A finished tool round: the answer quotes the question and the tool's result, text the drafts find.
COPY = [
    {"role": "user", "content": "What is 128 * 47?"},
    {"role": "assistant", "content": "", "reasoning_content": "The user wants 128 * 47. I will use the calculator.",
     "tool_calls": [{"id": "functions.calculator:0", "type": "function",
                     "function": {"name": "calculator", "arguments": "{\"expression\":\"128 * 47\"}"}}]},
    {"role": "tool", "tool_call_id": "functions.calculator:0", "content": "{\"result\":6016}"},
]


@pytest.fixture(scope="module")
def server():
    with nano_server("--max-batch", "2", "--speculate", "suffix", "--draft-tokens", "4") as srv:
        srv.engine.scheduler.spec.costs = FixedCosts(1.0)  # verify whenever a draft exists: no timing here
        yield srv


@pytest.mark.slow
def test_a_streamed_answer_with_verified_drafts_equals_the_whole_answer(server):
    client = client_for(server, timeout=120)
    whole = client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=60)
    content, reasoning = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=COPY, max_tokens=60, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
    message = whole.choices[0].message
    assert content == (message.content or "") and reasoning == (getattr(message, "reasoning_content", None) or "")
    assert "6016" in content + reasoning
    m = metrics(server)
    assert m["verify_steps"] > 0 and 0 < m["draft_tokens_accepted"] <= m["draft_tokens"]
    assert m["tokens_per_verify_row"] > 1


@pytest.mark.parametrize("argv, message", [
    (["--draft-tokens", "0"], "draft tokens per step must be an integer >= 1, got 0"),
])
def test_bad_speculation_settings_give_one_error_line(capsys, argv, message):
    assert generate.main(["--prompt-ids", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"
    assert serve.main([*argv]) == 2
    assert message in capsys.readouterr().err
