"""Constrained decoding through the engine: the mask applied inside the compiled steps, on a
random-weight K2 checkpoint sampled at temperature 1 (nothing but the mask makes its calls valid)
and with constrained and free rows in one batch."""

import json

import jsonschema
import numpy as np
import pytest
from schema_suite import SCHEMAS

from kimi_jax.chat import parse_output
from kimi_jax.chat.constraint import output_constraint
from kimi_jax.chat.grammar import ToolChoice
from kimi_jax.config import TINY
from kimi_jax.engine import QueueFull
from kimi_jax.runtime import Runtime
from kimi_jax.sampling import SamplingParams

# The model's vocabulary runs 32 ids past the byte tokenizer's 512, which the mask must rule out.
RANDOM_K2 = TINY.replace(vocab_size=544, max_position_embeddings=4096)
MAX_NEW = 2500


@pytest.fixture(scope="module")
def random_k2(fixture_dir):
    return Runtime.load(str(fixture_dir("strict_random_k2", RANDOM_K2)), dtype="float32", max_len=3072,
                        max_batch=8, progress=False)


def forced(rt, schema):
    return output_constraint(rt.tokenizer, vocab_size=rt.cfg.vocab_size, stop_ids=rt.stop_ids(), thinking=False,
                             tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}],
                             tool_choice=ToolChoice("function", "f"))


def submit_all(rt, jobs):
    """Submit (prompt, sampling, constraint) jobs, stepping the oldest while the queue is full."""
    requests = []
    for prompt, sampling, constraint in jobs:
        while True:
            try:
                requests.append(rt.engine.submit(prompt, sampling, constraint=constraint))
                break
            except QueueFull:
                rt.engine.wait([next(r for r in requests if not r.done.is_set())])
    rt.engine.wait(requests)
    return requests


@pytest.mark.slow
def test_forced_calls_of_a_random_model_at_temperature_one_fit_every_schema(random_k2):
    rt = random_k2
    tok = rt.tokenizer
    prompt = tok.encode("Call f.<think></think>", allow_special=True)
    names = [name for name in sorted(SCHEMAS) for _ in range(2)]
    constraints = [forced(rt, SCHEMAS[name]) for name in names]
    samplings = [SamplingParams(temperature=1.0, seed=seed % 2, max_new_tokens=MAX_NEW, stop_ids=rt.stop_ids())
                 for seed in range(len(names))]
    requests = submit_all(rt, zip([prompt] * len(names), samplings, constraints))
    for name, constraint, request in zip(names, constraints, requests, strict=True):
        assert request.finish_reason == "stop", (name, request.finish_reason, len(request.tokens))
        assert constraint.failure is None and max(request.tokens) < tok.n_vocab
        message = parse_output(tok.decode(request.tokens), thinking=False)
        assert [c.id for c in message.tool_calls] == ["functions.f:0"], (name, message)
        jsonschema.validate(json.loads(message.tool_calls[0].arguments), SCHEMAS[name])


def test_a_free_row_decodes_the_same_beside_a_constrained_one(random_k2):
    rt = random_k2
    tok = rt.tokenizer
    free_prompt = tok.encode("The quick brown fox")
    greedy = SamplingParams(max_new_tokens=40, stop_ids=rt.stop_ids())
    alone = rt.engine.generate([free_prompt], greedy)[0].tokens
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=MAX_NEW, stop_ids=rt.stop_ids())
    constraint = forced(rt, SCHEMAS["weather"])
    masked = rt.engine.submit(tok.encode("Call f.<think></think>", allow_special=True), sampled,
                              constraint=constraint)
    beside = rt.engine.submit(free_prompt, greedy)
    rt.engine.wait([masked, beside])
    assert beside.tokens == alone
    message = parse_output(tok.decode(masked.tokens), thinking=False)
    jsonschema.validate(json.loads(message.tool_calls[0].arguments), SCHEMAS["weather"])


def test_the_reasoning_runs_free_until_it_ends_then_the_grammar_holds(random_k2):
    """With thinking, the constraint leaves the reasoning alone: a random model never closes it,
    so the prompt opens and closes it and the first generated token must be the section."""
    rt = random_k2
    tok = rt.tokenizer
    constraint = output_constraint(tok, vocab_size=rt.cfg.vocab_size, stop_ids=rt.stop_ids(),
                                   tools=[{"type": "function", "function": {"name": "f",
                                                                            "parameters": SCHEMAS["weather"]}}],
                                   tool_choice=ToolChoice("required"))
    for t in tok.encode("<think>plan</think>", allow_special=True):
        constraint.accept(t)
    sampling = SamplingParams(temperature=1.0, seed=5, max_new_tokens=MAX_NEW, stop_ids=rt.stop_ids())
    request = rt.engine.submit(tok.encode("Go.<think>plan</think>", allow_special=True), sampling,
                               constraint=constraint)
    rt.engine.wait([request])
    assert request.tokens[0] == tok.token_id("<|tool_calls_section_begin|>")
    message = parse_output("<think>plan</think>" + tok.decode(request.tokens))
    assert message.reasoning_content == "plan" and message.tool_calls
    for call in message.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS["weather"])
    assert np.all(np.asarray(request.tokens) < tok.n_vocab)
