"""Constrained decoding without a model: random tokens under the mask of an OutputConstraint, fed back
through accept(), must always make output that the project's parser turns into calls to declared
functions whose arguments validate (jsonschema) — for every schema of tests/schema_suite.py, on the
bundled model's K2-layout tokenizer and on the byte tokenizer."""

import json
import pathlib

import jsonschema
import numpy as np
import pytest
from schema_suite import SCHEMAS
from scripts_loader import load_script

from kimi_jax.chat import ParsedMessage, StreamParser, Tokenizer, byte_level_ranks, write_tokenizer_files
from kimi_jax.chat.constraint import OutputConstraint, output_constraint, vocabulary
from kimi_jax.chat.grammar import ToolChoice
from kimi_jax.chat.parser import REASONING_END_MARKERS, parse_output
from kimi_jax.chat.tool_calls import ToolCallResolver

NANO = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "kimi-k2-nano"
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
EXTRA_IDS = 40  # the model's vocabulary runs past the tokenizer's, not to a multiple of 32

stand_in = load_script("constrained_sampling")  # in scripts/: the benchmark drives it too
RandomModel, allowed, generate = stand_in.RandomModel, stand_in.allowed, stand_in.generate


def tool(name, parameters):
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def constrain(tok, **kw):
    kw.setdefault("thinking", False)
    return output_constraint(tok, vocab_size=tok.n_vocab + EXTRA_IDS, stop_ids=tok.stop_ids, **kw)


def run(tok, constraint, seed, **model_kw):
    model = RandomModel(tok, tok.n_vocab + EXTRA_IDS, seed, **model_kw)
    tokens = generate(constraint, model, tok.stop_ids)
    assert tokens[-1] in tok.stop_ids, "the output did not end"
    assert constraint.failure is None
    return tokens


def parse(tok, tokens, tools, *, first_index=0, thinking=False) -> ParsedMessage:
    """What a client gets: the parser's events through the resolver of the declared tools."""
    parser, resolver = StreamParser(thinking=thinking), ToolCallResolver(tools, first_index)
    return ParsedMessage.from_events(resolver.process(parser.feed(tok.decode(tokens)) + parser.finish()))


def assert_valid(message: ParsedMessage, tools, first_index=0):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for k, call in enumerate(message.tool_calls):
        assert call.id == f"functions.{call.name}:{first_index + k}"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert not message.warnings


# ---- the guarantee ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_forced_call_fits_its_schema(tokenizer, name):
    tools = [tool("f", SCHEMAS[name])]
    for seed in range(3):
        constraint = constrain(tokenizer, tools=tools, tool_choice=ToolChoice("function", "f"), first_index=seed)
        message = parse(tokenizer, run(tokenizer, constraint, seed), tools, first_index=seed)
        assert [c.name for c in message.tool_calls] == ["f"] and message.content == ""
        assert_valid(message, tools, seed)


MANY = [tool(name, SCHEMAS[name]) for name in ("weather", "defs_ref", "anyof_objects", "escaped_property_names",
                                               "array_bounds", "empty", "format_date")]


def test_required_makes_at_least_one_call_and_every_call_fits(tokenizer):
    counts = set()
    for seed in range(12):
        constraint = constrain(tokenizer, tools=MANY, tool_choice=ToolChoice("required"), first_index=5)
        message = parse(tokenizer, run(tokenizer, constraint, seed), MANY, first_index=5)
        assert message.tool_calls and message.content == ""
        assert_valid(message, MANY, 5)
        counts.add(len(message.tool_calls))
    assert len(counts) > 1  # parallel calls happen


def test_auto_lets_the_output_answer_or_call(tokenizer):
    outcomes = set()
    for seed in range(16):
        constraint = constrain(tokenizer, tools=MANY, tool_choice=ToolChoice("auto"))
        message = parse(tokenizer, run(tokenizer, constraint, seed), MANY)
        assert_valid(message, MANY)
        outcomes.add(bool(message.tool_calls))
    assert outcomes == {True, False}


def test_without_parallel_calls_there_is_exactly_one(tokenizer):
    for seed in range(6):
        constraint = constrain(tokenizer, tools=MANY, tool_choice=ToolChoice("required"), parallel=False)
        message = parse(tokenizer, run(tokenizer, constraint, seed), MANY)
        assert len(message.tool_calls) == 1
        assert_valid(message, MANY)


def test_none_never_calls(tokenizer):
    section = tokenizer.token_id(SB)
    for seed in range(6):
        constraint = constrain(tokenizer, tools=MANY, tool_choice=ToolChoice("none"))
        assert not allowed(constraint.mask(), tokenizer.n_vocab)[section]
        message = parse(tokenizer, run(tokenizer, constraint, seed), MANY)
        assert message.tool_calls == [] and not message.warnings


@pytest.mark.parametrize("name", ["search_request", "recursive_tree", "enum_unicode", "empty"])
def test_response_format_content_fits_its_schema(tokenizer, name):
    for seed in range(3):
        constraint = constrain(tokenizer, content_schema=SCHEMAS[name])
        message = parse(tokenizer, run(tokenizer, constraint, seed), None)
        jsonschema.validate(json.loads(message.content), SCHEMAS[name])
        assert message.tool_calls == []


def test_response_format_with_tools_is_the_json_or_calls(tokenizer):
    schema = SCHEMAS["weather"]
    outcomes = set()
    for seed in range(12):
        constraint = constrain(tokenizer, tools=MANY, content_schema=schema)
        message = parse(tokenizer, run(tokenizer, constraint, seed), MANY)
        assert_valid(message, MANY)
        if message.tool_calls:
            assert message.content == ""
        else:
            jsonschema.validate(json.loads(message.content), schema)
        outcomes.add(bool(message.tool_calls))
    assert outcomes == {True, False}


def test_stop_tokens_are_allowed_exactly_where_the_output_may_end(nano_tokenizer):
    tok = nano_tokenizer
    tools = [tool("f", SCHEMAS["nested_object"])]
    constraint = constrain(tok, tools=tools, tool_choice=ToolChoice("function", "f"))
    model = RandomModel(tok, tok.n_vocab + EXTRA_IDS, seed=1)
    stops = list(tok.stop_ids)
    while True:
        ok = allowed(constraint.mask(), tok.n_vocab + EXTRA_IDS)
        token = model.next_token(constraint.mask())
        constraint.accept(token)
        if token in stops:
            break
        assert not ok[stops].any()  # the call is not complete until the section ends
    assert ok[stops].all() and ok.sum() == len(stops)
    assert constrain(tok, tools=tools).mask()[0] != 0  # auto: an empty answer may end at once
    assert allowed(constrain(tok, tools=tools).mask(), tok.n_vocab)[stops].all()


def test_ids_past_the_tokenizer_are_never_allowed(nano_tokenizer):
    tok = nano_tokenizer
    for choice in ("auto", "required"):
        constraint = constrain(tok, tools=MANY, tool_choice=ToolChoice(choice))
        mask = constraint.mask()
        assert mask.dtype == np.int32 and mask.shape == (-(-(tok.n_vocab + EXTRA_IDS) // 32),)
        assert not allowed(mask, tok.n_vocab + EXTRA_IDS)[tok.n_vocab:].any()


def test_nothing_to_constrain_gives_no_constraint(nano_tokenizer):
    assert constrain(nano_tokenizer) is None
    assert constrain(nano_tokenizer, tools=MANY, strict=False) is None
    lax = [{**t, "function": {**t["function"], "strict": False}} for t in MANY]
    assert constrain(nano_tokenizer, tools=lax) is None
    assert constrain(nano_tokenizer, tools=lax, tool_choice=ToolChoice("required")) is not None


def test_free_arguments_without_strict_still_follow_the_call_format(nano_tokenizer):
    tok = nano_tokenizer
    text = tok.encode('{"city": 3}')  # not valid under "weather"; strict=False lets it through
    constraint = constrain(tok, tools=MANY, tool_choice=ToolChoice("function", "weather"), strict=False)
    for t in tok.encode(SB + CB + "functions.weather:0" + AB, allow_special=True) + text:
        assert allowed(constraint.mask(), tok.n_vocab)[t]
        constraint.accept(t)
    assert allowed(constraint.mask(), tok.n_vocab)[tok.token_id(CE)]


# ---- reasoning -------------------------------------------------------------------------------------

def test_reasoning_is_free_until_it_ends_then_the_grammar_holds(tokenizer):
    tok = tokenizer
    tools = [tool("f", SCHEMAS["weather"])]
    for end in ("</think>", SB, CB):
        constraint = constrain(tok, tools=tools, tool_choice=ToolChoice("required"), thinking=True)
        assert allowed(constraint.mask(), tok.n_vocab)[tok.think_start_id]
        constraint.accept(tok.think_start_id)
        assert constraint.mask() is None
        free = tok.encode("I should call f. [EOS] <b>") + [tok.token_id(end)]
        tokens = [tok.think_start_id] + run(tok, constraint, seed=3, free_text=free)
        message = parse_output(tok.decode(tokens))
        assert message.reasoning_content == "I should call f.  <b>" and message.tool_calls
        for call in message.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS["weather"])


def test_the_first_token_may_skip_reasoning(nano_tokenizer):
    tok = nano_tokenizer
    constraint = constrain(tok, tools=MANY, tool_choice=ToolChoice("required"), thinking=True)
    ok = allowed(constraint.mask(), tok.n_vocab)
    assert ok[tok.think_start_id] and ok[tok.token_id(SB)] and ok.sum() == 2


def test_breaks_are_the_control_tokens_that_end_the_reasoning(nano_tokenizer, byte_tokenizer):
    for tok in (nano_tokenizer, byte_tokenizer):
        breaks = constrain(tok, tools=MANY, thinking=True).breaks
        assert breaks == {tok.token_id(m) for m in ("</think>", SB, CB)}
        assert constrain(tok, tools=MANY).breaks == frozenset()  # no reasoning, nothing to watch


def test_reasoning_ended_in_plain_text_hands_over_to_the_grammar_there(byte_tokenizer):
    tok = byte_tokenizer
    tools = [tool("f", SCHEMAS["one_string"])]
    for free, fits in (("ok</think>", True), ("ok</think>sure", False)):
        constraint = constrain(tok, tools=tools, tool_choice=ToolChoice("required"), thinking=True)
        constraint.accept(tok.think_start_id)
        # The engine does not ask for a mask until the next control token (here the section).
        for t in tok.encode(free) + [tok.token_id(SB)]:
            constraint.accept(t)
        assert constraint.phase == ("grammar" if fits else "failed")
        if fits:
            tokens = tok.encode("<think>" + free + SB, allow_special=True) + run(tok, constraint, seed=0)
            message = parse_output(tok.decode(tokens))
            assert message.reasoning_content == "ok" and message.tool_calls
        else:  # required allows no text before the call: the output is cut short
            assert np.flatnonzero(allowed(constraint.mask(), tok.n_vocab)).tolist() == sorted(tok.stop_ids)


def test_a_section_inside_the_reasoning_ends_the_output_when_no_call_is_allowed(nano_tokenizer):
    tok = nano_tokenizer
    constraint = constrain(tok, tools=MANY, tool_choice=ToolChoice("none"), thinking=True)
    for t in [tok.think_start_id, *tok.encode("hmm"), tok.token_id(SB)]:
        constraint.accept(t)
    assert constraint.failure and "reasoning ended at" in constraint.failure
    assert np.flatnonzero(allowed(constraint.mask(), tok.n_vocab)).tolist() == sorted(tok.stop_ids)


def test_reasoning_end_markers_are_the_parsers():
    from kimi_jax.chat.parser import _MARKERS

    for marker in _MARKERS:
        parser = StreamParser()
        parser.feed("<think>a" + marker + "b")
        assert (not parser.in_reasoning) == (marker in REASONING_END_MARKERS), marker


# ---- markers spelled out in text -------------------------------------------------------------------

@pytest.mark.parametrize("marker", [CE, "</think>", "[EOS]", "<|im_end|>", "<|reserved_token_7|>",
                                    "<|tool_call_section_end|>"])
def test_text_under_the_grammar_cannot_spell_a_control_token(byte_tokenizer, marker):
    tok = byte_tokenizer
    for tools, choice in ((MANY, "none"), ([tool("f", SCHEMAS["one_string"])], "function")):
        constraint = constrain(tok, tools=tools, tool_choice=ToolChoice(choice, "f" if choice == "function" else None))
        head = "" if choice == "none" else SB + CB + "functions.f:0" + AB + '{"city": "'
        for t in tok.encode(head, allow_special=True) + tok.encode("x" + marker[:-1]):
            assert allowed(constraint.mask(), tok.n_vocab)[t]
            constraint.accept(t)
        ok = allowed(constraint.mask(), tok.n_vocab)
        assert not ok[tok.token_id(marker[-1])] and ok[tok.token_id("z")]


def test_a_token_holding_a_whole_marker_ends_the_reasoning_and_is_masked_after(tmp_path):
    ranks = byte_level_ranks()
    for piece in ("</", "</t", "</th", "</thi", "</thin", "</think", "</think>"):
        ranks[piece.encode()] = len(ranks)
    write_tokenizer_files(tmp_path, ranks)
    tok = Tokenizer.from_dir(tmp_path)
    whole = ranks[b"</think>"]
    tools = [tool("f", SCHEMAS["one_string"])]
    constraint = constrain(tok, tools=tools, thinking=True)
    for t in tok.encode("<think>x", allow_special=True) + [whole]:
        constraint.accept(t)
    assert constraint.phase == "grammar"
    assert not allowed(constraint.mask(), tok.n_vocab)[whole]


# ---- misuse ----------------------------------------------------------------------------------------

def test_a_token_outside_the_mask_fails_the_output_and_leaves_only_stop_tokens(nano_tokenizer):
    tok = nano_tokenizer
    constraint = constrain(tok, tools=MANY, tool_choice=ToolChoice("required"))
    constraint.accept(tok.encode("hello")[0])
    assert constraint.failure and "does not fit the grammar" in constraint.failure
    assert np.flatnonzero(allowed(constraint.mask(), tok.n_vocab)).tolist() == sorted(tok.stop_ids)


def test_the_vocabulary_is_built_once_per_tokenizer(nano_tokenizer):
    assert vocabulary(nano_tokenizer) is vocabulary(nano_tokenizer)


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused(nano_tokenizer):
    with pytest.raises(Exception, match="smaller than the tokenizer"):
        OutputConstraint(nano_tokenizer, "start: \"a\"\n", vocab_size=100, stop_ids=nano_tokenizer.stop_ids)


def test_a_section_holds_at_most_the_parallel_call_limit(byte_tokenizer):
    from kimi_jax.chat.grammar import MAX_PARALLEL_CALLS

    tok = byte_tokenizer
    tools = [tool("f", {"type": "object", "properties": {}, "additionalProperties": False})]
    constraint = constrain(tok, tools=tools, tool_choice=ToolChoice("required"), first_index=9)
    text = SB + "".join(f"{CB}functions.f:{9 + k}{AB}{{}}{CE}" for k in range(MAX_PARALLEL_CALLS))
    for t in tok.encode(text, allow_special=True):
        assert allowed(constraint.mask(), tok.n_vocab)[t]
        constraint.accept(t)
    ok = allowed(constraint.mask(), tok.n_vocab)
    assert ok[tok.token_id(SE)] and not ok[tok.token_id(CB)]
