"""The synthetic agent data: deterministic, replayable tool calls, K2 ids, a clean held-out split."""

import itertools
import json
import re

import pytest
from scripts_loader import load_script

from kimi_jax.chat import ChatTemplate, format_output
from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS
from kimi_jax.tools import TABLES, builtin_tools

mad = load_script("make_agent_data")


@pytest.fixture(scope="module")
def data():
    return mad.generate(seed=3, n_train=1200, n_eval=80)


def all_items(data):
    return data[0] + data[1]


def tool_calls(item):
    return [call for m in item["messages"] if m["role"] == "assistant" for call in m.get("tool_calls", [])]


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    args = ["--n-train", "300", "--n-eval", "24"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert mad.main(["--out", str(tmp_path / name), "--seed", seed, *args]) == 0
    for split in ("train.jsonl", "eval.jsonl"):
        a, b, c = ((tmp_path / n / split).read_bytes() for n in "abc")
        assert a == b and a != c
    lines = (tmp_path / "a" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300 and list(json.loads(lines[0])) == ["id", "family", "tools", "messages", "answer"]


def test_every_recorded_tool_result_is_a_fresh_execution(data):
    for item in all_items(data):
        tools = mad.registry_for(item["id"])
        results = {m["tool_call_id"]: m for m in item["messages"] if m["role"] == "tool"}
        for call in tool_calls(item):
            fresh = tools.call(call["function"]["name"], call["function"]["arguments"])
            assert not fresh.is_error, (item["id"], fresh.content)
            recorded = results[call["id"]]
            assert recorded["name"] == call["function"]["name"]
            assert recorded["content"] == fresh.content, item["id"]


def test_tool_call_ids_count_calls_across_the_whole_conversation(data):
    for item in all_items(data):
        calls = tool_calls(item)
        expected = [f"functions.{c['function']['name']}:{i}" for i, c in enumerate(calls)]
        assert [c["id"] for c in calls] == expected
        assert all(c["type"] == "function" for c in calls)


def test_messages_have_the_openai_agent_shape(data):
    specs = {s["function"]["name"]: s for s in builtin_tools().specs()}
    for item in all_items(data):
        messages = item["messages"]
        assert messages[0]["role"] == "user"
        final = messages[-1]
        assert final["role"] == "assistant" and "tool_calls" not in final
        assert final["reasoning_content"] and item["answer"] in final["content"]
        for m, nxt in itertools.pairwise(messages):
            if m["role"] == "assistant" and m.get("tool_calls"):
                assert m["content"] == "" and m["reasoning_content"]
                assert nxt["role"] == "tool" and nxt["tool_call_id"] == m["tool_calls"][0]["id"]
        declared = [s["function"]["name"] for s in item["tools"]]
        assert all(specs[name] == spec for name, spec in zip(declared, item["tools"]))
        called = {c["function"]["name"] for c in tool_calls(item)}
        assert called <= set(declared) and len(declared) - len(called) <= 1  # at most one distractor


def test_arguments_are_compact_json_copied_from_the_user(data):
    for item in all_items(data):
        users = " ".join(mad.user_text(item))
        for call in tool_calls(item):
            args = json.loads(call["function"]["arguments"])
            assert call["function"]["arguments"] == json.dumps(args, separators=(",", ":"))
            copied = [v for k, v in args.items() if isinstance(v, str) and k not in ("table", "expression")]
            if item["family"] == "calculator":
                copied.append(args["expression"])
            assert all(v in users for v in copied), (item["id"], args)


def test_answers_copy_the_last_tool_result(data):
    for item in all_items(data):
        results = [m["content"] for m in item["messages"] if m["role"] == "tool"]
        if item["family"] == "chat":
            assert not results
        elif tool_calls(item)[-1]["function"]["name"] == "kv_list":
            assert item["answer"] == ", ".join(json.loads(results[-1])["result"])
        else:
            assert item["answer"] in results[-1], item["id"]


def test_every_family_is_in_both_splits_and_eval_is_even(data):
    train, evals = data
    assert {i["family"] for i in train} == set(mad.FAMILIES)
    counts = [sum(i["family"] == f for i in evals) for f in mad.FAMILIES]
    assert counts == [10] * len(mad.FAMILIES)


def test_eval_prompts_are_unseen_in_train_and_distinct(data):
    train, evals = data
    seen = {mad.user_text(i) for i in train}
    assert not [i["id"] for i in evals if mad.user_text(i) in seen]
    assert len({mad.user_text(i) for i in evals}) == len(evals)


def test_the_split_rule_puts_held_out_keys_pairs_and_values_only_in_eval(data):
    train, evals = data
    canonical = {word: unit for unit, word in mad.UNIT_WORDS.items()} | {u: u for u in mad.UNIT_WORDS}

    def has_held_out_slot(item):
        args = json.loads(tool_calls(item)[0]["function"]["arguments"])
        if item["family"] == "lookup":
            row = TABLES[args["table"]][args["key"]]
            field = next(f for f, v in row.items() if mad.show(v) == item["answer"])
            return mad.held_out(mad.KEY_KIND[args["table"]], args["key"]) or \
                mad.held_out("fact", f"{args['key']}/{field}")
        v = args["value"]
        return mad.held_out("n", v if isinstance(v, int) else str(v)) or \
            mad.held_out("pair", f"{canonical[args['from_unit']]}>{canonical[args['to_unit']]}")

    for items, expected in ((train, False), (evals, True)):
        checked = [i for i in items if i["family"] in ("lookup", "convert")]
        assert checked and all(has_held_out_slot(i) == expected for i in checked)


def test_conversations_fit_the_nano_context(data):
    """Rendered as training sees them (tool declarations and default system prompt included)."""
    template = ChatTemplate.default()
    marker = re.compile("|".join(re.escape(t.name) for t in K2_SPECIAL_TOKENS))
    lengths = []
    for item in all_items(data):
        prompt = template.render(item["messages"][:-1], item["tools"] or None)
        text = prompt + format_output(item["messages"][-1])
        lengths.append(len(marker.sub("#", text)))  # a special token is one token: count it as one char
    assert max(lengths) < 1200
    assert sum(lengths) / len(lengths) < 800
