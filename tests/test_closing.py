"""Ending within the budget: a model that would never close a string or stop writing digits still
ends a valid call (or JSON answer) before its max_tokens, while answers in plain text are left alone."""

import json
import pathlib

import jsonschema
import numpy as np
import pytest
from schema_suite import SCHEMAS
from scripts_loader import load_script

from kimi_jax.chat import parse_output
from kimi_jax.chat.constraint import output_constraint
from kimi_jax.chat.grammar import ToolChoice

allowed = load_script("constrained_sampling").allowed
NANO = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "kimi-k2-nano"


class Rambler:
    """Always the allowed token it likes best: letters, then digits, then anything but punctuation,
    so it never closes a string or ends a number of its own accord."""

    def __init__(self, tok):
        def liking(i):
            if i >= tok.num_base_tokens:
                return 0.0
            text = tok.token_bytes(i).decode("latin-1")
            return 3.0 * any(c.isalpha() for c in text) + 2.0 * any(c.isdigit() for c in text) + \
                (0.0 if text.strip("\"'[]{},:") == "" else 1.0) + len(text) / 100
        self.liking = np.array([liking(i) for i in range(tok.n_vocab)])

    def run(self, tok, constraint, limit):
        tokens = []
        while len(tokens) < limit:
            ok = allowed(constraint.mask(), tok.n_vocab)
            token = int(np.argmax(np.where(ok, self.liking, -np.inf)))
            tokens.append(token)
            constraint.accept(token)
            if token in tok.stop_ids:
                break
        return tokens


@pytest.mark.parametrize("name", ["one_string", "all_scalars", "array_of_strings", "format_email", "format_uuid",
                                  "format_date_time", "string_pattern_digits", "deeply_nested", "empty",
                                  "map_of_strings", "string_lengths", "escaped_property_names"])
def test_a_model_that_never_closes_anything_still_ends_a_valid_call_in_its_budget(tokenizer, name):
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMAS[name]}}]
    budget = 240
    constraint = output_constraint(tokenizer, vocab_size=tokenizer.n_vocab, stop_ids=tokenizer.stop_ids,
                                   thinking=False, max_tokens=budget, tools=tools,
                                   tool_choice=ToolChoice("function", "f"))
    tokens = Rambler(tokenizer).run(tokenizer, constraint, budget)
    assert tokens[-1] in tokenizer.stop_ids and len(tokens) <= budget and constraint.failure is None
    call = parse_output(tokenizer.decode(tokens), thinking=False).tool_calls[0]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[name])


def test_the_same_model_without_a_budget_runs_on(byte_tokenizer):
    tok = byte_tokenizer
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMAS["one_string"]}}]
    constraint = output_constraint(tok, vocab_size=tok.n_vocab, stop_ids=tok.stop_ids, thinking=False, tools=tools,
                                   tool_choice=ToolChoice("function", "f"))
    assert Rambler(tok).run(tok, constraint, 300)[-1] not in tok.stop_ids


def test_a_json_answer_closes_too(nano_tokenizer):
    tok = nano_tokenizer
    constraint = output_constraint(tok, vocab_size=tok.n_vocab, stop_ids=tok.stop_ids, thinking=False,
                                   max_tokens=100, content_schema=SCHEMAS["search_request"])
    tokens = Rambler(tok).run(tok, constraint, 100)
    assert tokens[-1] in tok.stop_ids
    jsonschema.validate(json.loads(parse_output(tok.decode(tokens), thinking=False).content),
                        SCHEMAS["search_request"])


def test_text_answers_are_not_cut_short_and_no_call_opens_at_the_end(nano_tokenizer):
    tok = nano_tokenizer
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMAS["weather"]}}]
    constraint = output_constraint(tok, vocab_size=tok.n_vocab, stop_ids=tok.stop_ids, thinking=False,
                                   max_tokens=16, tools=tools)
    for t in tok.encode("It is sunny"):
        constraint.accept(t)
    for _ in range(10):  # the last stretch of the budget: text may go on, a call may not start
        ok = allowed(constraint.mask(), tok.n_vocab)
        assert ok[tok.encode(" and")[0]] and ok[list(tok.stop_ids)].all()
        assert not ok[tok.token_id("<|tool_calls_section_begin|>")]
        constraint.accept(tok.encode(" and")[0])
