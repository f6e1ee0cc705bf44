"""scripts/eval_nano.py's verdicts on hand-made transcripts: a model that does the task right scores
100%; one that calls the wrong tool, skips the tool, fabricates an answer or calls a tool where none
is wanted scores 0."""

import copy
import json

import pytest
from scripts_loader import load_script

mad = load_script("make_agent_data")
ev = load_script("eval_nano")


@pytest.fixture(scope="module")
def items():
    sets = mad.generate(seed=5, sizes={"train": 0, "heldout": 27, "multistep": 12, "paraphrase": 12, "ood": 8,
                                       "followup": 2})
    by_family = {}
    for item in sets["heldout"] + sets["multistep"] + sets["paraphrase"] + sets["ood"] + sets["followup"]:
        by_family.setdefault(item["family"], item)
    return by_family


def replayed(item):
    """The transcript of a model that does exactly what the reference conversation does."""
    return copy.deepcopy(item["messages"]), "answer"


def with_answer(messages, text):
    messages[-1] = {"role": "assistant", "content": text}
    return messages


def tool_call(name, arguments, result, idx=0):
    call_id = f"functions.{name}:{idx}"
    return [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": result}]


def test_a_model_that_replays_the_reference_scores_100_percent_on_every_family(items):
    results = [ev.score(item, *replayed(item)) for item in items.values()]
    assert len(results) >= 15
    assert ev.summarize(results) == {"success": 1.0, "valid": 1.0, "right_tools": 1.0, "n": len(results)}


def test_a_wrong_tool_scores_zero(items):
    item = items["calculator"]
    user = item["messages"][0]
    messages = [user, *tool_call("convert_units", '{"value":1,"from_unit":"m","to_unit":"km"}',
                                 '{"result":0.001,"unit":"km"}'),
                {"role": "assistant", "content": f"The answer is {item['answer']}."}]
    verdict = ev.score(item, messages, "answer")
    assert not verdict["success"] and not verdict["right_tools"] and verdict["valid"]


def test_an_answer_without_the_tool_is_fabricated_and_scores_zero(items):
    for family in ("calculator", "lookup", "memory", "lookup_calc"):
        item = items[family]
        messages = [m for m in item["messages"] if m["role"] == "user"][:1] + [
            {"role": "assistant", "content": f"It is {item['answer']}."}]
        assert not ev.score(item, messages, "answer")["success"], family


def test_the_right_answer_after_a_call_with_other_arguments_scores_zero(items):
    item = items["calculator"]
    messages = [item["messages"][0], *tool_call("calculator", '{"expression":"1+1"}', '{"result":2}'),
                {"role": "assistant", "content": f"The answer is {item['answer']}."}]
    assert not ev.score(item, messages, "answer")["success"]


def test_a_chain_that_stops_after_its_first_call_scores_zero(items):
    item = items["three_step"]
    messages, _ = replayed(item)
    cut = [i for i, m in enumerate(messages) if m["role"] == "tool"][0] + 1
    messages = with_answer(messages[:cut + 1], f"The result is {item['answer']}.")
    assert not ev.score(item, messages, "answer")["success"]


def test_a_tool_call_on_an_out_of_domain_question_scores_zero_even_with_a_good_reply(items):
    item = items["out_of_domain"]
    messages = [item["messages"][0], *tool_call("lookup", '{"table":"countries","key":"Japan"}', '{"capital":"Tokyo"}'),
                item["messages"][-1]]
    assert not ev.score(item, messages, "answer")["success"]
    assert ev.score(item, *replayed(item))["success"]


def test_a_turn_that_runs_out_of_steps_or_misses_the_answer_scores_zero(items):
    item = items["convert"]
    assert not ev.score(item, replayed(item)[0], "max_steps")["success"]
    assert not ev.score(item, with_answer(replayed(item)[0], "I do not know."), "answer")["success"]


def test_recovery_passes_with_the_retry_or_with_the_corrected_call_straight_away(items):
    item = items["recovery"]
    assert ev.score(item, *replayed(item))["success"]
    direct = [m for m in item["messages"] if m["role"] == "user"]
    fixed = [m for m in item["messages"] if m["role"] == "assistant" and m.get("tool_calls")][-1]
    name, args = fixed["tool_calls"][0]["function"]["name"], fixed["tool_calls"][0]["function"]["arguments"]
    result = [m for m in item["messages"] if m["role"] == "tool"][-1]["content"]
    messages = direct + tool_call(name, args, result) + [item["messages"][-1]]
    assert ev.score(item, messages, "answer")["success"]


def test_an_honest_not_found_needs_the_failing_lookup_made(items):
    sets = mad.generate(seed=11, sizes={"train": 0, "heldout": 90, "multistep": 6, "paraphrase": 11, "ood": 1})
    item = next(i for i in sets["heldout"] if i["answer"] == "could not find")
    assert ev.score(item, *replayed(item))["success"]
    guessed = [item["messages"][0], item["messages"][-1]]
    assert not ev.score(item, guessed, "answer")["success"]


def test_undeclared_tools_and_arguments_outside_the_schema_are_invalid_calls(items):
    item = items["calculator"]
    for name, arguments in (("shell", '{"cmd":"ls"}'), ("calculator", '"2+2"'), ("calculator", "{not json"),
                            ("calculator", '{"expression": 5}'), ("calculator", "{}")):
        messages = [item["messages"][0], *tool_call(name, arguments, "error: bad call"), item["messages"][-1]]
        assert not ev.score(item, messages, "answer")["valid"], (name, arguments)


def test_the_markdown_table_shows_every_set_and_the_targets():
    summary = {"INT4 QAT": {s: {"success": 0.5, "valid": 1.0, "right_tools": 0.75, "n": 4} for s in ev.SETS}}
    table = ev.markdown(summary, list(ev.SETS))
    assert "| INT4 QAT | 50.0% | 50.0% | 50.0% | 50.0% |" in table
    assert "≥ 90%" in table and "| INT4 QAT | 100.0% | 75.0% |" in table
    assert json.dumps(summary)  # what --json writes


def test_results_pair_with_calls_in_order_even_when_a_model_repeats_a_call_id():
    messages = tool_call("calculator", '{"expression":"2*3"}', '{"result":6}') + \
        tool_call("calculator", '{"expression":"6+1"}', '{"result":7}')  # both calls get id ...:0
    assert ev.tool_steps(messages) == [("calculator", '{"expression":"2*3"}', '{"result":6}'),
                                       ("calculator", '{"expression":"6+1"}', '{"result":7}')]


def test_a_follow_up_counts_only_when_both_turns_are_right(items):
    item = items["follow_up"]
    assert ev.score(item, *replayed(item))["success"]
    messages = copy.deepcopy(item["messages"])  # the first turn's call went wrong; the second is as expected
    next(m for m in messages if m["role"] == "tool")["content"] = '{"result":-1}'
    assert not ev.score(item, messages, "answer")["success"]
