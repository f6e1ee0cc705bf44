"""tools, tool_choice, parallel_tool_calls, response_format and stop strings of the chat service, on an
engine double (no model) that keeps the engine's contract with a constraint: a scripted output must
pass the mask token by token, or random tokens are drawn under it. What the client gets, and which
requests are refused with a 400."""

import asyncio
import json
import threading
import types

import jsonschema
import pytest
from schema_suite import SCHEMAS
from scripts_loader import load_script

from kimi_jax.chat import ChatTemplate
from kimi_jax.runtime import Runtime
from kimi_jax.server.errors import APIError
from kimi_jax.server.requests import parse_chat
from kimi_jax.server.service import Service, Settings

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {key: {"type": "string"}}, "required": [key], "additionalProperties": False}}}
    for name, key in (("get_weather", "city"), ("get_time", "tz"))]
SCHEMA = {name: t["function"]["parameters"] for name, t in ((t["function"]["name"], t) for t in TOOLS)}

stand_in = load_script("constrained_sampling")  # in scripts/: the benchmark drives it too
Gate, RandomModel, Refused = stand_in.Gate, stand_in.RandomModel, stand_in.Refused


class MaskedRequest:
    def __init__(self, prompt_ids, sampling, constraint):
        self.prompt_ids, self.sampling, self.constraint = prompt_ids, sampling, constraint
        self.tokens, self.finish_reason, self.cached_tokens = [], None, 0

    def cancel(self):
        pass


class MaskedEngine:
    """Each submit makes its tokens as the engine does: the next scripted output (every token must
    be allowed wherever there is a mask; the script may stop early, the model goes on from there)
    or random tokens under the mask, the reasoning being `reasoning` then `</think>`."""

    max_len = 4096

    def __init__(self, tokenizer, outputs=(), seed=0, reasoning="plan"):
        self.tok, self.outputs, self.seed, self.requests = tokenizer, list(outputs), seed, []
        self.reasoning = tokenizer.encode(reasoning) + [tokenizer.think_end_id]

    def submit(self, prompt_ids, sampling, on_event=None, constraint=None):
        request = MaskedRequest(list(prompt_ids), sampling, constraint)
        self.requests.append(request)
        script = self.tok.encode(self.outputs.pop(0), allow_special=True) if self.outputs else []
        model = RandomModel(self.tok, self.tok.n_vocab, self.seed, free_text=self.reasoning)
        gate = Gate(constraint, self.tok.n_vocab)
        while len(request.tokens) < sampling.max_new_tokens:
            token = script.pop(0) if script else model.next_token(gate.mask)
            if not gate.allows(token):
                raise Refused(f"the grammar refuses {self.tok.decode([token])!r} after "
                              f"{self.tok.decode(request.tokens)!r}")
            gate.take(token)
            request.tokens.append(token)
            if token in sampling.stop_ids:
                break
        request.finish_reason = "stop" if request.tokens[-1] in sampling.stop_ids else "length"
        # Delivered from another thread, in two events, as the engine's thread would.
        half = len(request.tokens) // 2
        threading.Thread(target=lambda: (on_event(request, request.tokens[:half], False),
                                         on_event(request, request.tokens[half:], True))).start()
        return request


@pytest.fixture
def tokenizer(byte_tokenizer):
    return byte_tokenizer


def chat(tokenizer, outputs=(), *, seed=0, strict=True, **body):
    """Run one chat request; returns (message, finish_reason, run, engine)."""
    engine = MaskedEngine(tokenizer, outputs, seed)
    cfg = types.SimpleNamespace(vocab_size=tokenizer.n_vocab, eos_token_id=None)
    rt = Runtime(cfg, None, None, tokenizer, ChatTemplate.default(), "scripted")
    service = Service(rt, engine, Settings(model_name="m", max_tokens=3000, strict_tools=strict))
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    run = service.chat(parse_chat({"tools": TOOLS, **body}))

    async def consume():
        run.start()
        return [e async for events in run.events() for e in events]

    asyncio.run(consume())
    return run.output.message(), run.finish_reason, run, engine


def calls(message):
    return [(c.id, c.name, json.loads(c.arguments)) for c in message.tool_calls]


def assert_valid(message):
    for _, name, arguments in calls(message):
        jsonschema.validate(arguments, SCHEMA[name])


# ---- tool_choice ---------------------------------------------------------------------------------

def test_auto_takes_the_models_own_call(tokenizer):
    message, finish, _, engine = chat(tokenizer, [
        "<think>plan</think>Checking." + SB + CB + "functions.get_weather:0" + AB + '{"city": "Rome"}' + CE + SE
        + "<|im_end|>"])
    assert (message.reasoning_content, message.content) == ("plan", "Checking.")
    assert calls(message) == [("functions.get_weather:0", "get_weather", {"city": "Rome"})]
    assert finish == "tool_calls" and engine.requests[0].constraint is not None


@pytest.mark.parametrize("bad_call", [
    "functions.get_wether:0" + AB + '{"city": "Rome"}',  # an undeclared name
    "functions.get_weather:1" + AB + '{"city": "Rome"}',  # not the conversation's next index
    "functions.get_weather:0" + AB + '{"town": "Rome"}',  # arguments outside the schema
    "functions.get_weather:0" + AB + '{"city": 3}',
])
def test_a_call_outside_the_grammar_cannot_be_written(tokenizer, bad_call):
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>plan</think>" + SB + CB + bad_call + CE + SE + "<|im_end|>"])


def test_auto_answers_or_calls_and_every_call_fits(tokenizer):
    outcomes = set()
    for seed in range(10):
        message, finish, run, _ = chat(tokenizer, seed=seed)
        assert_valid(message)
        assert finish == ("tool_calls" if message.tool_calls else "stop") and not run.warnings
        outcomes.add(bool(message.tool_calls))
    assert outcomes == {True, False}


def test_named_function_is_called_exactly_once_whatever_the_model_wanted(tokenizer):
    choice = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(Refused):  # neither an answer nor another function
        chat(tokenizer, ["<think>r</think>Hello!<|im_end|>"], tool_choice=choice)
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_weather:0"], tool_choice=choice)
    for seed in range(6):
        message, finish, _, _ = chat(tokenizer, seed=seed, tool_choice=choice)
        assert [name for _, name, _ in calls(message)] == ["get_time"] and finish == "tool_calls"
        assert message.content == "" and message.reasoning_content in ("plan", None)
        assert_valid(message)


def test_required_calls_at_least_once(tokenizer):
    for seed in range(8):
        message, finish, _, _ = chat(tokenizer, seed=seed, tool_choice="required")
        assert message.tool_calls and finish == "tool_calls" and message.content == ""
        assert_valid(message)


def test_none_answers_with_the_tools_still_declared(tokenizer):
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>r</think>Let me check." + SB], tool_choice="none")
    for seed in range(4):
        message, finish, _, engine = chat(tokenizer, seed=seed, tool_choice="none")
        assert message.tool_calls == [] and finish == "stop"
    # The tools are still declared, so the prompt is the one `auto` uses.
    assert b"tool_declare" in tokenizer.decode(engine.requests[0].prompt_ids).encode()


def test_parallel_tool_calls_false_allows_one_call(tokenizer):
    two = SB + CB + "functions.get_weather:0" + AB + '{"city": "A"}' + CE + CB
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>r</think>" + two], parallel_tool_calls=False)
    for seed in range(6):
        message, _, _, _ = chat(tokenizer, seed=seed, tool_choice="required", parallel_tool_calls=False)
        assert len(message.tool_calls) == 1


def test_calls_are_numbered_after_those_in_the_history(tokenizer):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "reasoning_content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    message, _, run, engine = chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_time:1" + AB
                                               + '{"tz": "CET"}' + CE + SE + "<|im_end|>"], messages=history)
    assert message.tool_calls[0].id == "functions.get_time:1"
    prompt = tokenizer.decode(engine.requests[0].prompt_ids)
    assert "functions.get_time:0" in prompt and "call_1" not in prompt
    assert "None" not in prompt  # reasoning_content: null renders as an empty think block


def test_without_strict_tools_auto_is_not_constrained_and_named_leaves_arguments_free(tokenizer):
    _, _, _, engine = chat(tokenizer, ["<think>r</think>Hello!<|im_end|>"], strict=False)
    assert engine.requests[0].constraint is None
    choice = {"type": "function", "function": {"name": "get_weather"}}
    message, _, _, _ = chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_weather:0" + AB + '{"town": 1}'
                                        + CE + SE + "<|im_end|>"], strict=False, tool_choice=choice)
    assert calls(message) == [("functions.get_weather:0", "get_weather", {"town": 1})]


def test_a_function_may_opt_out_of_strict_arguments(tokenizer):
    tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": False}}, TOOLS[1]]
    message, _, _, _ = chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_weather:0" + AB + '{"town": 1}'
                                        + CE + SE + "<|im_end|>"], tools=tools)
    assert calls(message) == [("functions.get_weather:0", "get_weather", {"town": 1})]
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>r</think>" + SB + CB + "functions.get_time:0" + AB + '{"zone": 1}'], tools=tools)


# ---- response_format -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["weather", "search_request", "recursive_tree"])
def test_json_schema_response_format_content_validates(tokenizer, name):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMAS[name]}}
    for seed in range(3):
        message, finish, _, _ = chat(tokenizer, seed=seed, response_format=fmt, tool_choice="none")
        jsonschema.validate(json.loads(message.content), SCHEMAS[name])
        assert finish == "stop" and message.reasoning_content in ("plan", None)


def test_json_object_response_format_is_an_object(tokenizer):
    with pytest.raises(Refused):
        chat(tokenizer, ["<think>r</think>Sure: {}"], response_format={"type": "json_object"}, tools=None)
    message, _, _, _ = chat(tokenizer, seed=2, response_format={"type": "json_object"}, tools=None)
    assert isinstance(json.loads(message.content), dict)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]},
     "tools[0].function.parameters", ("function 'f'", "uniqueItems")),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]},
     "tools[1].function.parameters", ("function 'g'", "Invalid type: strng")),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", ("function 'f'", "object")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format.json_schema.schema", ("look-around",)),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", ("name",)),
    ({"response_format": {"type": "xml"}}, "response_format.type", ("json_schema",)),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0].function.strict", ("boolean",)),
])
def test_a_request_whose_schema_cannot_be_enforced_is_a_400_naming_it(tokenizer, body, param, words):
    with pytest.raises(APIError) as info:
        chat(tokenizer, **body)
    error = info.value
    assert error.status == 400 and error.param == param
    assert all(w in error.message for w in words), error.message


def test_a_schema_that_cannot_be_enforced_is_fine_without_strict_tools(tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]
    message, _, _, _ = chat(tokenizer, ["<think>r</think>ok<|im_end|>"], tools=tools, strict=False)
    assert message.content == "ok"


# ---- stop strings and limits ---------------------------------------------------------------------

def test_a_stop_string_ends_the_text_and_counts_tokens_to_its_end(tokenizer):
    message, finish, run, _ = chat(tokenizer, ["<think>plan</think>one two three<|im_end|>"], stop=["two"])
    assert (message.reasoning_content, message.content, finish) == ("plan", "one ", "stop")
    assert run.usage()["completion_tokens"] == 1 + 4 + 1 + len("one two")


def test_max_tokens_ends_the_answer_with_length(tokenizer):
    message, finish, run, _ = chat(tokenizer, ["<think>plan</think>one two three<|im_end|>"], max_tokens=8)
    # <think>, four letters, </think>, then two of the content's
    assert (message.reasoning_content, message.content, finish) == ("plan", "on", "length")
    assert run.usage()["completion_tokens"] == 8


def test_the_stop_token_counts_as_a_completion_token(tokenizer):
    _, finish, run, _ = chat(tokenizer, ["<think>plan</think>ok<|im_end|>"])
    assert finish == "stop" and run.usage()["completion_tokens"] == 1 + 4 + 1 + 2 + 1
