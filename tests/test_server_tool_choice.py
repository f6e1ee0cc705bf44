"""tool_choice, parallel_tool_calls and stop strings of the chat service, on a scripted engine (no
model): which engine requests are made, what prompt each continues, and what the client gets."""

import asyncio
import threading
import types

import pytest

from kimi_jax.chat import ChatTemplate
from kimi_jax.runtime import Runtime
from kimi_jax.server.requests import parse_chat
from kimi_jax.server.service import Service, Settings

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {key: {"type": "string"}}, "required": [key]}}}
    for name, key in (("get_weather", "city"), ("get_time", "tz"))]


class ScriptedRequest:
    def __init__(self, prompt_ids, sampling):
        self.prompt_ids, self.sampling = prompt_ids, sampling
        self.tokens, self.finish_reason, self.cached_tokens = [], None, 0

    def cancel(self):
        pass


class ScriptedEngine:
    """Answers each submit with the next scripted output, stopping as the real engine does: at the
    first stop id (included) or after max_new_tokens."""

    max_len = 4096

    def __init__(self, tokenizer, outputs):
        self.tok, self.outputs, self.requests = tokenizer, list(outputs), []

    def submit(self, prompt_ids, sampling, on_event=None):
        request = ScriptedRequest(list(prompt_ids), sampling)
        self.requests.append(request)
        for t in self.tok.encode(self.outputs.pop(0), allow_special=True):
            request.tokens.append(t)
            if t in sampling.stop_ids or len(request.tokens) >= sampling.max_new_tokens:
                break
        done = request.tokens[-1:] and request.tokens[-1] in sampling.stop_ids
        request.finish_reason = "stop" if done else "length"
        # Delivered from another thread, in two events, as the engine's thread would.
        half = len(request.tokens) // 2
        threading.Thread(target=lambda: (on_event(request, request.tokens[:half], False),
                                         on_event(request, request.tokens[half:], True))).start()
        return request


@pytest.fixture
def tokenizer(byte_tokenizer):
    return byte_tokenizer


def chat(tokenizer, outputs, **body):
    """Run one chat request; returns (message, finish_reason, run, engine)."""
    engine = ScriptedEngine(tokenizer, outputs)
    cfg = types.SimpleNamespace(vocab_size=tokenizer.n_vocab, eos_token_id=None)
    rt = Runtime(cfg, None, None, tokenizer, ChatTemplate.default(), "scripted")
    service = Service(rt, engine, Settings(model_name="m", max_tokens=1000))
    run = service.chat(parse_chat({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **body}))

    async def consume():
        run.start()
        return [e async for events in run.events() for e in events]

    asyncio.run(consume())
    return run.output.message(), run.finish_reason, run, engine


def test_named_function_writes_the_call_header_where_the_model_would_start_a_call(tokenizer):
    choice = {"type": "function", "function": {"name": "get_time"}}
    message, finish, run, engine = chat(tokenizer, [
        "<think>plan</think>Sure." + SB + CB + "functions.get_weather:0" + AB + "{}" + CE + SE,
        '{"tz": "UTC"}' + CE + "<|im_end|>",
    ], tool_choice=choice)
    assert (message.reasoning_content, message.content) == ("plan", "Sure.")
    assert [(c.id, c.name, c.arguments) for c in message.tool_calls] == [("functions.get_time:0", "get_time",
                                                                          '{"tz": "UTC"}')]
    assert finish == "tool_calls"
    first, second = engine.requests
    before_call = tokenizer.encode("<think>plan</think>Sure.", allow_special=True)
    header = tokenizer.encode(SB + CB + "functions.get_time:0" + AB, allow_special=True)
    assert second.prompt_ids == first.prompt_ids + before_call + header


def test_named_function_is_called_even_when_the_model_just_answers(tokenizer):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    message, finish, _, _ = chat(tokenizer, ["<think>r</think>Hello!<|im_end|>", '{"city": "Oslo"}' + CE],
                                 tool_choice=choice)
    assert message.content == "Hello!" and [c.name for c in message.tool_calls] == ["get_weather"]
    assert finish == "tool_calls"


def test_required_lets_the_model_pick_the_function_when_it_answered_without_one(tokenizer):
    message, finish, _, engine = chat(tokenizer, [
        "<think>r</think>Hello!<|im_end|>", " get_time :0" + AB, '{"tz": "CET"}' + CE + SE + "<|im_end|>",
    ], tool_choice="required")
    assert message.content == "Hello!"
    assert [(c.id, c.name, c.arguments) for c in message.tool_calls] == [("functions.get_time:0", "get_time",
                                                                          '{"tz": "CET"}')]
    assert finish == "tool_calls" and len(engine.requests) == 3


def test_required_without_a_declared_name_returns_the_answer_and_none_of_the_servers_text(tokenizer):
    message, finish, run, engine = chat(tokenizer, ["<think>r</think>Hello!<|im_end|>", "search_web:0" + AB],
                                        tool_choice="required")
    assert (message.content, message.tool_calls, finish) == ("Hello!", [], "stop")
    assert any("named no declared function" in w for w in run.warnings)


def test_required_is_satisfied_by_the_models_own_call(tokenizer):
    message, finish, _, engine = chat(tokenizer, [
        "<think>r</think>" + SB + CB + "functions.get_weather:0" + AB + '{"city": "Rome"}' + CE + SE + "<|im_end|>",
    ], tool_choice="required")
    assert [c.name for c in message.tool_calls] == ["get_weather"] and finish == "tool_calls"
    assert len(engine.requests) == 1


def test_none_ends_the_answer_where_a_call_would_begin(tokenizer):
    message, finish, _, engine = chat(tokenizer, [
        "<think>r</think>Let me check." + SB + CB + "functions.get_weather:0" + AB + "{}" + CE + SE,
    ], tool_choice="none")
    assert (message.content, message.tool_calls, finish) == ("Let me check.", [], "stop")
    # The tools are still declared, so the prompt is the one `auto` uses.
    assert b"tool_declare" in tokenizer.decode(engine.requests[0].prompt_ids).encode()


def test_parallel_tool_calls_false_returns_the_first_call_only(tokenizer):
    two = SB + CB + "get_weather:0" + AB + '{"city": "A"}' + CE + CB + "get_time:1" + AB + '{"tz": "B"}' + CE + SE
    message, finish, run, _ = chat(tokenizer, ["<think>r</think>" + two], parallel_tool_calls=False)
    assert [c.name for c in message.tool_calls] == ["get_weather"] and finish == "tool_calls"
    assert not [w for w in run.warnings if "ended inside" in w]  # the section was closed cleanly


def test_calls_are_numbered_after_those_in_the_history(tokenizer):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "reasoning_content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    message, _, run, engine = chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_time:0" + AB + "{}" + CE + SE],
                                   messages=history)
    assert message.tool_calls[0].id == "functions.get_time:1"
    prompt = tokenizer.decode(engine.requests[0].prompt_ids)
    assert "functions.get_time:0" in prompt and "call_1" not in prompt
    assert "None" not in prompt  # reasoning_content: null renders as an empty think block


def test_a_stop_string_ends_the_text_and_counts_tokens_to_its_end(tokenizer):
    message, finish, run, _ = chat(tokenizer, ["<think>plan</think>one two three<|im_end|>"], stop=["two"])
    assert (message.reasoning_content, message.content, finish) == ("plan", "one ", "stop")
    assert run.usage()["completion_tokens"] == 1 + 4 + 1 + len("one two")


def test_max_tokens_ends_the_answer_with_length(tokenizer):
    message, finish, run, _ = chat(tokenizer, ["<think>plan</think>one two three<|im_end|>"], max_tokens=8)
    # <think>, four letters, </think>, then two of the content's
    assert (message.reasoning_content, message.content, finish) == ("plan", "on", "length")
    assert run.usage()["completion_tokens"] == 8
