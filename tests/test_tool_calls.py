"""Tool calls as clients need them (issue 12 item 5): K2 ids numbered over the whole conversation,
only declared functions called, and streamed deltas that reassemble into the non-streamed message."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_jax.chat import ParsedMessage, StreamParser, ToolCallResolver, normalize_history, parse_output
from kimi_jax.chat.tool_calls import arguments_fit
from kimi_jax.server.responses import chat_deltas, chat_message

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def tool(name, required=(), properties=None):
    props = {k: {"type": "string"} for k in (properties or required)}
    return {"type": "function", "function": {"name": name, "description": name,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": list(required)}}}


TOOLS = [tool("get_weather", ["city"]), tool("get_time", ["tz"]), tool("ping")]


def call(call_id, args):
    return f"{CB}{call_id}{AB}{args}{CE}"


def resolve(text, tools=TOOLS, first_index=0) -> ParsedMessage:
    parser, resolver = StreamParser(), ToolCallResolver(tools, first_index)
    return ParsedMessage.from_events(resolver.process(parser.feed(text) + parser.finish()))


def assistant(*calls, reasoning=None):
    message = {"role": "assistant", "content": "",
               "tool_calls": [{"id": i, "type": "function", "function": {"name": n, "arguments": "{}"}} for i, n in calls]}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


# ---- the history a client sends back -----------------------------------------------------------

def test_history_ids_are_renumbered_over_the_conversation_and_results_follow_them():
    messages = [
        {"role": "user", "content": "hi"},
        assistant(("call_a", "get_weather"), ("call_b", "get_time")),
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "name": "clock", "content": "noon"},
        assistant(("call_a", "ping")),  # a client reusing an id: the latest call wins
        {"role": "tool", "tool_call_id": "call_a", "content": "pong"},
    ]
    original = json.dumps(messages)
    out, count = normalize_history(messages)
    assert count == 3
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.get_weather:0", "functions.get_time:1"]
    assert out[4]["tool_calls"][0]["id"] == "functions.ping:2"
    assert [(m["tool_call_id"], m.get("name")) for m in out if m["role"] == "tool"] == [
        ("functions.get_weather:0", "get_weather"), ("functions.get_time:1", "clock"), ("functions.ping:2", "ping")]
    assert json.dumps(messages) == original


def test_history_already_in_k2_form_is_left_as_it_is():
    messages = [{"role": "user", "content": "hi"}, assistant(("functions.ping:0", "ping")),
                {"role": "tool", "tool_call_id": "functions.ping:0", "name": "ping", "content": "pong"}]
    assert normalize_history(messages) == (messages, 1)


# ---- calls in a new output ----------------------------------------------------------------------

def test_calls_to_declared_functions_are_numbered_on_from_the_history():
    text = "<think>r</think>" + SB + call("functions.get_weather:0", '{"city": "Oslo"}') + call("ping:7", "{}") + SE
    parsed = resolve(text, first_index=3)
    assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == [
        ("functions.get_weather:3", "get_weather", '{"city": "Oslo"}'), ("functions.ping:4", "ping", "{}")]
    assert parsed.content == "" and not parsed.warnings


def test_an_id_naming_no_declared_function_takes_the_one_tool_its_arguments_fit():
    text = SB + call("call_59adf", '{"tz": "UTC"}') + call(":1", '{"city": "Rome"}') + call("getweather:2", '{"city": "X"}') + SE
    parsed = resolve(text)
    assert [(c.id, c.name) for c in parsed.tool_calls] == [
        ("functions.get_time:0", "get_time"), ("functions.get_weather:1", "get_weather"),
        ("functions.get_weather:2", "get_weather")]
    assert parsed.content == ""


def test_a_call_no_declared_function_fits_stays_content_with_a_warning():
    # {} fits only `ping` (no required keys) -> resolved; {"q": 1} fits none; {"city", "tz"} fits none.
    text = "<think>r</think>" + SB + call("search:0", '{"q": 1}') + call("x:1", "{}") + call("y:2", "not json") + SE
    parsed = resolve(text)
    assert [c.name for c in parsed.tool_calls] == ["ping"]
    assert parsed.tool_calls[0].id == "functions.ping:0"
    assert parsed.content == 'search:0{"q": 1}y:2not json'
    assert len([w for w in parsed.warnings if "no declared function" in w]) == 2


def test_without_declared_tools_every_call_is_content():
    parsed = resolve(SB + call("functions.get_weather:0", '{"city": "Oslo"}') + SE, tools=None)
    assert parsed.tool_calls == []
    assert parsed.content == 'functions.get_weather:0{"city": "Oslo"}'
    assert any("no function is declared" in w for w in parsed.warnings)


def test_arguments_fit_a_schema_by_its_required_and_listed_keys():
    params = TOOLS[0]["function"]["parameters"]
    assert arguments_fit(params, '{"city": "x"}')
    assert not arguments_fit(params, "{}")  # required key missing
    assert not arguments_fit(params, '{"city": "x", "zip": 1}')  # a key the schema does not list
    assert not arguments_fit(params, "[1]") and not arguments_fit(params, "{oops")
    assert arguments_fit(None, '{"anything": 1}') and arguments_fit({"type": "object"}, "")


NAMES = ["get_weather", "get_time", "ping", "search", "", "functions."]
ARGS = ['{"city": "a"}', '{"tz": "b"}', "{}", '{"q": 1}', "oops", ""]


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 9), st.sampled_from(ARGS)), max_size=5),
       first=st.integers(0, 20))
def test_no_call_to_an_undeclared_function_ever_comes_back(calls, first):
    text = "<think>r</think>" + SB + "".join(call(f"{n}:{i}", a) for n, i, a in calls) + SE
    parsed = resolve(text, first_index=first)
    declared = {t["function"]["name"] for t in TOOLS}
    assert all(c.name in declared for c in parsed.tool_calls)
    assert [c.id for c in parsed.tool_calls] == [f"functions.{c.name}:{first + k}" for k, c in enumerate(parsed.tool_calls)]


# ---- streaming ----------------------------------------------------------------------------------

def client_reassembly(deltas) -> dict:
    """What an OpenAI client does with a stream of deltas."""
    message = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for delta in deltas:
        message["content"] += delta.get("content") or ""
        message["reasoning_content"] += delta.get("reasoning_content") or ""
        for part in delta.get("tool_calls") or ():
            slot = message["tool_calls"].setdefault(part["index"], {"function": {"arguments": ""}})
            if "id" in part:
                slot.update(id=part["id"], type=part["type"], function={"name": part["function"]["name"], "arguments": ""})
            slot["function"]["arguments"] += part["function"].get("arguments", "")
    return {"content": message["content"], "reasoning_content": message["reasoning_content"] or None,
            "tool_calls": [message["tool_calls"][i] for i in sorted(message["tool_calls"])]}


def whole_message(text, first_index) -> dict:
    message = chat_message(resolve(text, first_index=first_index))
    return {"content": message["content"] or "", "reasoning_content": message["reasoning_content"],
            "tool_calls": message.get("tool_calls", [])}


OUTPUTS = [
    "<think>Need the weather.</think>Checking." + SB + call(" functions.get_weather :0", '{"city": "Paris"}')
    + call("call_x", '{"tz": "CET"}') + SE + "<|im_end|>",
    "Untagged reasoning</think>" + SB + call(":0", "{}") + call("nope:1", '{"q": "<b>"}') + SE,
    "<think>thinking " + SB + call("functions.ping:0", "") + "<|tool_call_section_end|>after",
    "<think>r</think>" + SB + call("functions.get_time:0", '\n{\n "tz": "UTC"\n}\n') + SE + "[EOS]",
]


@settings(max_examples=400, deadline=None)
@given(which=st.integers(0, len(OUTPUTS) - 1), cuts=st.lists(st.integers(0, 10_000), max_size=20),
       first=st.integers(0, 5))
def test_streamed_tool_call_deltas_reassemble_into_exactly_the_non_streamed_calls(which, cuts, first):
    text = OUTPUTS[which]
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    parser, resolver = StreamParser(), ToolCallResolver(TOOLS, first)
    deltas = [d for chunk in chunks for d in chat_deltas(resolver.process(parser.feed(chunk)))]
    deltas += chat_deltas(resolver.process(parser.finish()))
    assert client_reassembly(deltas) == whole_message(text, first)


def test_parse_output_and_the_resolver_agree_on_text_without_calls():
    text = "<think>a</think>b<|im_end|>"
    assert resolve(text) == parse_output(text)
