"""The server's output pipeline: stop strings found across any split of the text, and the chat
output parsed from token ids the way the model produced them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_jax.chat import format_output
from kimi_jax.server.output import ChatOutput, StopMatcher, TextOutput


def run_matcher(stops, chunks):
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(c) for c in chunks)
    return out + ("" if matcher.matched else matcher.flush()), matcher.matched


def test_a_stop_string_split_across_pieces_is_found_and_cut():
    assert run_matcher(["END"], ["abc E", "N", "Dxyz"]) == ("abc ", True)
    assert run_matcher(["xx", "b"], ["a", "xb"]) == ("ax", True)  # the earliest match wins
    assert run_matcher(["D", "EDD"], ["EDD"]) == ("E", True)  # the first to complete, however split


def test_held_text_that_never_becomes_a_stop_string_comes_out():
    assert run_matcher(["END"], ["abc E", "NX"]) == ("abc ENX", False)
    assert run_matcher(["END"], ["abc EN"]) == ("abc EN", False)


@settings(max_examples=400, deadline=None)
@given(text=st.text("abE ND", max_size=40), stops=st.lists(st.text("abEND", min_size=1, max_size=4), max_size=4),
       cuts=st.lists(st.integers(0, 100), max_size=10))
def test_any_split_cuts_before_the_match_that_completes_first(text, stops, cuts):
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert run_matcher(stops, chunks) == ((text[:min(hits)[1]], True) if hits else (text, False))


@pytest.fixture
def tokenizer(byte_tokenizer):
    return byte_tokenizer


def test_chat_output_counts_tokens_up_to_the_stop_string(tokenizer):
    ids = tokenizer.encode(format_output({"reasoning_content": "plan", "content": "one two three"}),
                           allow_special=True)
    out = ChatOutput(tokenizer, stops=["two"])
    events = []
    for tok in ids:
        events += out.feed([tok])
    events += out.finish()
    message = out.message()
    assert (message.reasoning_content, message.content) == ("plan", "one ")
    # byte-level vocabulary: <think>, 4 bytes, </think>, then "one two" up to the stop's last byte
    assert out.stopped and out.n_tokens == 1 + 4 + 1 + len("one two")


def test_text_output_drops_control_tokens_and_keeps_think_tags(tokenizer):
    ids = tokenizer.encode("<think>a</think>b<|im_end|>", allow_special=True)
    out = TextOutput(tokenizer)
    assert out.feed(ids) + out.finish() == "<think>a</think>b"
