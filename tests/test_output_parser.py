"""Output parser: one table of raw outputs (docs/k2-format.md §7.1 variants, §7.4 bugs), checked whole and streamed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_jax.chat import (
    ContentDelta,
    ParsedMessage,
    ReasoningDelta,
    StreamParser,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_output,
)
from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
END = "<|im_end|>"
R = "<think>r</think>"  # a finished reasoning block "r"
PARIS = '{"city": "Paris"}'
A1 = '{"a": 1}'
MULTILINE = '\n{\n  "h": "<b>[x]</b>"\n}'


def call(idx, name, args, prefix="functions."):
    return f"{CB}{prefix}{name}:{idx}{AB}{args}{CE}"


def tc(idx, name, args, prefix="functions."):
    return ToolCall(f"{prefix}{name}:{idx}", name, args)


# (case, raw output, thinking, reasoning, content, tool calls, expect warnings)
CASES = [
    ("think_then_answer", "<think>Let me think.</think>The answer is 4." + END, True,
     "Let me think.", "The answer is 4.", [], False),
    ("whitespace_before_think_is_dropped", "\n  <think>r</think>a", True, "r", "a", [], False),
    ("no_think_means_all_content", "Just an answer." + END, True, None, "Just an answer.", [], False),
    ("empty_think", "<think></think>Hi" + END, True, None, "Hi", [], False),
    ("content_is_verbatim_after_think", R + "\n\nA <b>x</b> [1]\n", True,
     "r", "\n\nA <b>x</b> [1]\n", [], False),
    ("no_close_think_everything_is_reasoning", "<think>still thinking about <|tool", True,
     "still thinking about <|tool", "", [], True),
    # §7.1 grammar and its observed variants.
    ("think_then_tool_call", "<think>Need weather.</think>" + SB + call(0, "get_weather", PARIS) + SE + END,
     True, "Need weather.", "", [tc(0, "get_weather", PARIS)], False),
    ("content_before_section", R + "Let me check." + SB + call(0, "get_weather", PARIS) + SE, True,
     "r", "Let me check.", [tc(0, "get_weather", PARIS)], False),
    ("text_after_section_end_is_content", R + SB + call(0, "f", "{}") + SE + "Done." + END, True,
     "r", "Done.", [tc(0, "f", "{}")], False),
    ("singular_section_markers",
     R + "<|tool_call_section_begin|>" + call(3, "f", "{}") + "<|tool_call_section_end|>", True,
     "r", "", [tc(3, "f", "{}")], False),
    ("whitespace_around_markers",
     f"{R}{SB}\n {CB} functions.f:0 \n{AB} \n{A1}\n {CE}\n {CB}functions.g:1{AB}{{}}{CE}\n{SE}", True,
     "r", "", [tc(0, "f", A1), tc(1, "g", "{}")], False),
    ("id_without_functions_prefix", R + SB + call(0, "get_weather", PARIS, prefix="") + SE, True,
     "r", "", [tc(0, "get_weather", PARIS, prefix="")], False),
    ("dotted_names_keep_their_dots",
     R + SB + call(0, "mcp.github.search", "{}") + call(1, "a.b", "{}", prefix="") + SE, True,
     "r", "", [tc(0, "mcp.github.search", "{}"), tc(1, "a.b", "{}", prefix="")], False),
    ("multiline_json_and_markup_in_arguments", R + SB + call(0, "f", MULTILINE) + SE, True,
     "r", "", [tc(0, "f", MULTILINE.strip())], False),
    # §7.4.4: a tool-call section inside unfinished thinking ends the reasoning and is still parsed.
    ("bug4_section_inside_think", "<think>I will call it." + SB + call(0, "get_weather", PARIS) + SE + END,
     True, "I will call it.", "", [tc(0, "get_weather", PARIS)], True),
    ("bug4_bare_call_inside_think", "<think>I will call it." + call(0, "f", "{}"), True,
     "I will call it.", "", [tc(0, "f", "{}")], True),
    # §7.4.5: special tokens never leak into reasoning or content.
    ("bug5_special_tokens_removed",
     "<think>a[EOS]b<|im_assistant|></think>c<|reserved_token_163600|>d[BOS]"
     + SB + call(0, "f", "{}") + SE + END + "[EOS]", True,
     "ab", "cd", [tc(0, "f", "{}")], False),
    # §7.4.6: consecutive calls must not merge.
    ("bug6_consecutive_calls_stay_separate",
     R + SB + call(0, "f", '{"x": 1}') + call(1, "g", '{"y": 2}') + call(2, "f", "{}") + SE, True,
     "r", "", [tc(0, "f", '{"x": 1}'), tc(1, "g", '{"y": 2}'), tc(2, "f", "{}")], False),
    # §7.4.3: ids the model was not taught still yield a call.
    ("bug3_nonstandard_id_without_index", f"{R}{SB}{CB}call_59adf{AB}{{}}{CE}{SE}", True,
     "r", "", [ToolCall("call_59adf", "call_59adf", "{}")], True),
    ("unterminated_section_keeps_the_call", f"{R}{SB}{CB}functions.f:0{AB}{A1} ", True,
     "r", "", [tc(0, "f", A1)], True),
    ("unterminated_call_id_becomes_content", f"{R}{SB}{CB}functions.get_wea", True,
     "r", "functions.get_wea", [], True),
    ("missing_call_end_closed_by_next_call", f"{R}{SB}{CB}f:0{AB}{{}}{CB}g:1{AB}{{}}{CE}{SE}", True,
     "r", "", [tc(0, "f", "{}", prefix=""), tc(1, "g", "{}", prefix="")], True),
    ("missing_call_end_closed_by_section_end", f"{R}{SB}{CB}f:0{AB}{{}}{SE}after", True,
     "r", "after", [tc(0, "f", "{}", prefix="")], True),
    ("call_without_arguments_marker", f"{R}{SB}{CB}functions.now:0{CE}{SE}", True,
     "r", "", [ToolCall("functions.now:0", "now", "")], True),
    ("overlong_id_becomes_content", f"{R}{SB}{CB} " + "x " * 200 + f"{AB}{{}}{CE}{SE}", True,
     "r", "x " * 200 + "{}", [], True),
    ("call_without_name_becomes_content", f"{R}{SB}{CB}{AB}{A1}{CE}{SE}", True,
     "r", A1, [], True),
    ("garbage_in_section_becomes_content", f"{R}{SB} blah {CB}f:0{AB}{{}}{CE}{SE}", True,
     "r", "blah ", [tc(0, "f", "{}", prefix="")], True),
    ("stray_markers_dropped", f"x{CE}}}}}{{{{{AB}y<think>z", True, None, "x}}{{yz", [], True),
    # A </think> with no opening <think> still ends reasoning (issue 12 item 5); without one, or
    # when a tool-call section comes first, the untagged text is content.
    ("close_without_open_ends_reasoning", "Let me think.</think>The answer is 4." + END, True,
     "Let me think.", "The answer is 4.", [], False),
    ("close_first_means_no_reasoning", "</think>Hi" + END, True, None, "Hi", [], False),
    ("close_without_open_after_stray_markers", f"x{CE}y</think>z", True, "xy", "z", [], True),
    ("untagged_text_before_a_section_is_content", "Let me check." + SB + call(0, "f", "{}") + SE + "</think>",
     True, None, "Let me check.", [tc(0, "f", "{}")], True),
    ("close_without_open_then_tool_call", "Need a tool.</think>" + SB + call(0, "f", "{}") + SE, True,
     "Need a tool.", "", [tc(0, "f", "{}")], False),
    ("whitespace_inside_ids_is_dropped", f"{R}{SB}{CB} functions. get_weather :\n0 {AB}{PARIS}{CE}{SE}", True,
     "r", "", [tc(0, "get_weather", PARIS)], False),
    ("nameless_id_is_a_call_for_the_caller_to_resolve", f"{R}{SB}{CB}functions.:0{AB}{{}}{CE}{CB}:1{AB}{A1}{CE}{SE}",
     True, "r", "", [ToolCall("functions.:0", "", "{}"), ToolCall(":1", "", A1)], True),
    ("think_tags_are_content_without_thinking", R + "c" + SB + call(0, "f", "{}") + SE, False,
     None, "<think>r</think>c", [tc(0, "f", "{}")], False),
]


@pytest.mark.parametrize("text, thinking, reasoning, content, calls, warns", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_parse_output(text, thinking, reasoning, content, calls, warns):
    parsed = parse_output(text, thinking=thinking)
    assert parsed.reasoning_content == reasoning
    assert parsed.content == content
    assert parsed.tool_calls == calls
    assert bool(parsed.warnings) == warns, parsed.warnings


@pytest.mark.parametrize("text, thinking", [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_character_by_character_streaming_matches_parse_output(text, thinking):
    parser = StreamParser(thinking=thinking)
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert ParsedMessage.from_events(events) == parse_output(text, thinking=thinking)


def test_stream_events_for_a_tool_call():
    parser = StreamParser()
    events = parser.feed(f"{R}ok{SB}{CB}functions.f:0{AB} {{\"a\"")
    events += parser.feed(": 1} " + CE + SE)
    assert events + parser.finish() == [
        ReasoningDelta("r"), ContentDelta("ok"), ToolCallStart(0, "functions.f:0", "f"),
        ToolCallArgumentsDelta(0, '{"a"'), ToolCallArgumentsDelta(0, ": 1}"), ToolCallEnd(0),
    ]


def test_stream_holds_back_only_possible_marker_prefixes():
    parser = StreamParser()
    assert parser.feed("<think>abc<") == [ReasoningDelta("abc")]
    assert parser.feed("/thi") == []
    assert parser.feed("nk>Hi [") == [ContentDelta("Hi ")]
    assert parser.feed("1] <|tool_ca") == [ContentDelta("[1] ")]
    assert parser.feed("t|>") == [ContentDelta("<|tool_cat|>")]
    assert parser.finish() == []


def test_untagged_text_is_held_until_a_close_tag_or_the_end_says_what_it_was():
    parser = StreamParser()
    assert parser.feed("Let me ") == [] and parser.feed("think.") == []
    assert parser.feed("</think>Answer") == [ReasoningDelta("Let me think."), ContentDelta("Answer")]
    parser = StreamParser()
    assert parser.feed("Just an answer.") == []
    assert parser.finish() == [ContentDelta("Just an answer.")]


def test_feed_after_finish_is_an_error():
    parser = StreamParser()
    parser.finish()
    with pytest.raises(ValueError):
        parser.feed("x")


def _chunked(text, cuts):
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]


def _stream(chunks, thinking):
    parser = StreamParser(thinking=thinking)
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    open_call = None
    for e in events:  # calls are well nested: start, argument deltas, end
        if isinstance(e, ToolCallStart):
            assert open_call is None
            open_call = e.index
        elif isinstance(e, ToolCallArgumentsDelta):
            assert e.index == open_call
        elif isinstance(e, ToolCallEnd):
            assert e.index == open_call
            open_call = None
    assert open_call is None
    return ParsedMessage.from_events(events)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_of_table_outputs_reassembles_to_parse_output(case, cuts):
    _, text, thinking, *_ = case
    assert _stream(_chunked(text, cuts), thinking) == parse_output(text, thinking=thinking)


MARKERS = ["<think>", "</think>", SB, SE, CB, AB, CE,
           "<|tool_call_section_begin|>", "<|tool_call_section_end|>",
           END, "[EOS]", "<|reserved_token_163700|>"]
WORDS = ["a", " b ", "\n", "  ", "{\"k\": 1}", "functions.f:0", "g.h:12", "}", "x y", "z " * 70]
PARTIALS = ["<", "<|", "[", "[EO", "<|tool_call", "|>", "]", "<thi", "<|reserved_token_1"]


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(MARKERS + WORDS + PARTIALS), max_size=25),
       cuts=st.lists(st.integers(0, 10_000), max_size=12), thinking=st.booleans())
def test_random_outputs_parse_the_same_streamed_and_whole(pieces, cuts, thinking):
    text = "".join(pieces)
    assert _stream(_chunked(text, cuts), thinking) == parse_output(text, thinking=thinking)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(MARKERS + WORDS), max_size=25))
def test_no_marker_reaches_reasoning_or_content(pieces):
    parsed = parse_output("".join(pieces))
    leaked = [t.name for t in K2_SPECIAL_TOKENS] + MARKERS
    for text in (parsed.reasoning_content or "", parsed.content):
        assert not [m for m in leaked if m in text]


# ---- format_output: the model-output grammar used for training targets ---------------------------

_LOOP = [
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": "", "reasoning_content": "Use the calculator.",
     "tool_calls": [{"id": "functions.calculator:0", "type": "function",
                     "function": {"name": "calculator", "arguments": "{\"expression\":\"6*7\"}"}}]},
    {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator", "content": "{\"result\":42}"},
]


def test_format_output_equals_the_templates_rendering_inside_a_tool_loop():
    from kimi_jax.chat import ChatTemplate, format_output

    template = ChatTemplate.default()
    before = template.render(_LOOP[:1], add_generation_prompt=True)
    after = template.render(_LOOP, add_generation_prompt=False)
    step = after[len(before):after.index("<|im_system|>calculator")]
    assert after.startswith(before)
    assert step == format_output(_LOOP[1])


def test_format_output_round_trips_through_parse_output():
    from kimi_jax.chat import format_output

    message = {"reasoning_content": "Think.", "content": "Answer: 42",
               "tool_calls": [{"id": "functions.f.g:3", "function": {"name": "f.g", "arguments": {"a": 1}}}]}
    parsed = parse_output(format_output(message))
    assert (parsed.reasoning_content, parsed.content) == ("Think.", "Answer: 42")
    assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == [("functions.f.g:3", "f.g", '{"a": 1}')]
