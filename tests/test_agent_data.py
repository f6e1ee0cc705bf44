"""The synthetic agent data: replayable tool calls, K2 ids, copyable arguments, honest no-tool
replies, real recoveries and chains, and evaluation sets kept apart from training."""

import inspect
import itertools
import json
import re

import pytest
from scripts_loader import load_script

from kimi_jax.tools import TABLES, builtin_tools

mad = load_script("make_agent_data")
tasks = load_script("nano_tasks")
eval_phrasings = load_script("nano_eval_phrasings")

SIZES = {"train": 1500, "heldout": 45, "multistep": 24, "paraphrase": 33, "ood": 36, "followup": 12}
ALL_SPECS = builtin_tools().specs()
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


@pytest.fixture(scope="module")
def sets():
    return mad.generate(seed=3, sizes=SIZES)


def every_item(sets):
    return [item for items in sets.values() for item in items]


def user_texts(item):
    return mad.user_text(item)


def steps(item):
    """(assistant message, its tool result message) for every tool call."""
    ms = item["messages"]
    return [(m, ms[i + 1]) for i, m in enumerate(ms) if m["role"] == "assistant" and m.get("tool_calls")]


def call_args(m):
    return json.loads(m["tool_calls"][0]["function"]["arguments"])


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    args = ["--n-train", "200", "--n-heldout", "18", "--n-multistep", "12", "--n-paraphrase", "11", "--n-ood", "6",
            "--n-followup", "4"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert mad.main(["--out", str(tmp_path / name), "--seed", seed, *args]) == 0
    for split in ("train", "heldout", "multistep", "paraphrase", "followup"):
        a, b, c = ((tmp_path / n / f"{split}.jsonl").read_bytes() for n in "abc")
        assert a == b and a != c, split
    lines = (tmp_path / "a" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and list(json.loads(lines[0])) == ["id", "family", "tools", "messages", "answer"]


def test_every_recorded_tool_result_is_a_fresh_execution_including_errors(sets):
    for item in every_item(sets):
        tools = mad.registry_for(item["id"])
        for m, result in steps(item):
            call = m["tool_calls"][0]
            fresh = tools.call(call["function"]["name"], call["function"]["arguments"])
            assert result["tool_call_id"] == call["id"] and result["name"] == call["function"]["name"]
            assert result["content"] == fresh.content, item["id"]


def test_tool_call_ids_count_calls_across_the_whole_conversation(sets):
    for item in every_item(sets):
        calls = [m["tool_calls"][0] for m, _ in steps(item)]
        assert [c["id"] for c in calls] == [f"functions.{c['function']['name']}:{i}" for i, c in enumerate(calls)]
        assert all(len(m["tool_calls"]) == 1 for m, _ in steps(item))


def test_messages_have_the_openai_agent_shape_and_declare_the_tools_they_call(sets):
    for name, items in sets.items():
        for item in items:
            messages = item["messages"]
            assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
            assert "tool_calls" not in messages[-1] and messages[-1]["reasoning_content"]
            assert item["answer"] in messages[-1]["content"], item["id"]
            for m, nxt in itertools.pairwise(messages):
                if m["role"] == "assistant" and m.get("tool_calls"):
                    assert m["content"] == "" and m["reasoning_content"] and nxt["role"] == "tool"
            declared = [s["function"]["name"] for s in item["tools"]]
            called = {m["tool_calls"][0]["function"]["name"] for m, _ in steps(item)}
            assert called <= set(declared)
            if name == "train":
                assert item["tools"] == ALL_SPECS or len(declared) - len(called) <= 2
            else:  # evaluated as `--tools builtin` runs: every builtin tool declared
                assert item["tools"] == ALL_SPECS


def test_first_calls_copy_every_argument_verbatim_from_the_conversation(sets):
    # From the user's questions, or in a follow-up turn ("Now add 50 to that.") from the answers
    # the assistant gave before.
    for item in every_item(sets):
        if item["family"] in ("date_chain",):  # its first call, current_time, has no argument
            continue
        seen_text = ""
        for m in item["messages"]:
            if m["role"] == "user":
                seen_text += m["content"] + "\n"
                fresh_turn = True
            elif m["role"] == "assistant" and not m.get("tool_calls") and item["family"] in mad.FOLLOW_UP:
                seen_text += m["content"] + "\n"
            elif m["role"] == "assistant" and m.get("tool_calls") and fresh_turn:
                fresh_turn = False
                for key, value in call_args(m).items():
                    if key == "table":
                        continue
                    text = value if isinstance(value, str) else json.dumps(value)
                    if key == "days":  # "96 days before" is days=-96: the digits are copied
                        text = text.lstrip("-")
                    if key == "expression" and item["family"] in (*mad.MULTI_STEP, *mad.FOLLOW_UP):  # x+y, r + 50
                        assert all(n in seen_text for n in NUMBER.findall(text.replace("+", " "))), item["id"]
                        continue
                    assert text in seen_text, (item["id"], key, text)


def test_later_calls_in_a_chain_copy_numbers_from_the_question_or_earlier_results(sets):
    for item in sets["multistep"] + [i for i in sets["train"] if i["family"] in mad.MULTI_STEP]:
        sources = " ".join(user_texts(item))
        for k, (m, result) in enumerate(steps(item)):
            if k:
                args = m["tool_calls"][0]["function"]["arguments"]
                strings = [v for key, v in json.loads(args).items() if isinstance(v, str) and key != "expression"]
                numbers = NUMBER.findall(args.replace("*", " * ").replace("/", " / "))
                constants = {"2", "7", "g", "km"}  # diameter = 2 * radius, weeks = days / 7, masses in g, radii in km
                assert all(v in sources or v in constants for v in strings), (item["id"], args)
                assert all(n in sources or n in constants for n in numbers), (item["id"], args)
                if numbers:  # the value that chains: taken from the previous call's result
                    assert any(n in steps(item)[k - 1][1]["content"] for n in numbers), item["id"]
            sources += " " + result["content"]
        assert len(steps(item)) >= 2 and item["answer"] in steps(item)[-1][1]["content"]


def test_no_tool_items_are_answered_without_a_call(sets):
    no_tool = sets["ood"] + [i for i in every_item(sets) if i["family"] in mad.NO_TOOL]
    assert len(sets["ood"]) == SIZES["ood"] and {i["family"] for i in no_tool} >= {"chat", "out_of_scope"}
    for item in no_tool:
        assert not steps(item) and [m["role"] for m in item["messages"]] == ["user", "assistant"]


def test_recovery_items_read_a_tool_error_then_make_the_corrected_call(sets):
    items = [i for i in every_item(sets) if i["family"] in mad.RECOVERY]
    assert {i["family"] for i in items} == set(mad.RECOVERY)
    for item in items:
        results = [(m["tool_calls"][0]["function"]["name"], r["content"]) for m, r in steps(item)]
        errors = [k for k, (_, content) in enumerate(results) if content.startswith("error:")]
        assert len(errors) == 1 and errors[0] == len(results) - 2, item["id"]
        (name, _), (fixed_name, fixed) = results[-2:]
        assert fixed_name == name and not fixed.startswith("error:")


def test_answers_copy_the_last_tool_result(sets):
    for item in every_item(sets):
        if not steps(item):
            continue
        last = steps(item)[-1][1]["content"]
        if item["answer"] in ("could not find", "not saved"):  # the honest reply to a lookup that failed
            assert last.startswith("error:")
        elif steps(item)[-1][0]["tool_calls"][0]["function"]["name"] == "kv_list":
            assert item["answer"] == ", ".join(json.loads(last)["result"])
        else:
            assert item["answer"] in last, item["id"]


def test_training_holds_no_held_out_value_and_the_heldout_sets_each_hold_one(sets):
    def held(item):
        found = []
        for m, _ in steps(item):
            args = call_args(m)
            name = m["tool_calls"][0]["function"]["name"]
            if name == "lookup" and args["key"] in TABLES[args["table"]]:
                found.append(mad.held_out(tasks.KEY_KIND[args["table"]], args["key"]))
            if name == "date_diff":
                found += [mad.held_out("date", args["start"]), mad.held_out("date", args["end"])]
            if name == "calculator" and item["family"] == "calculator":
                operands = NUMBER.findall(re.sub(r"\*\*\s*\d+", "", args["expression"]).replace("-", " "))
                found += [mad.held_out("n", x) for x in operands]
        return found

    assert not any(any(held(i)) for i in sets["train"])
    checked = [i for i in sets["heldout"] if i["family"] == "calculator"]  # every value of these is a number slot
    assert checked and all(any(held(i)) for i in checked)


def test_eval_prompts_are_unseen_in_training_and_distinct(sets):
    seen = {mad.user_text(i) for i in sets["train"]}
    evals = sets["heldout"] + sets["multistep"] + sets["paraphrase"] + sets["ood"] + sets["followup"]
    assert not [i["id"] for i in evals if mad.user_text(i) in seen]
    assert len({mad.user_text(i) for i in evals}) == len(evals)
    assert {i["family"] for i in sets["multistep"]} == set(mad.MULTI_STEP)


def test_paraphrase_and_out_of_domain_wordings_never_reach_the_training_generator(sets):
    paraphrases = [t for templates in eval_phrasings.PARAPHRASE_ASK.values() for t in templates]
    questions = [q for q, _ in eval_phrasings.OUT_OF_DOMAIN]
    assert set(eval_phrasings.PARAPHRASE_ASK) <= set(tasks.ASK)  # same tasks, other words
    source = inspect.getsource(tasks) + inspect.getsource(mad)
    for text in paraphrases + questions:
        assert text not in source, text
    patterns = [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$") for t in paraphrases]
    train_texts = {t for i in sets["train"] for t in user_texts(i)}
    assert not train_texts & set(questions)
    for text in train_texts:
        assert not any(p.match(text) for p in patterns), text
    para = [t for i in sets["paraphrase"] for t in user_texts(i)]
    assert all(any(p.match(t) for p in patterns) for t in para)


def test_values_are_drawn_widely_not_from_short_lists(sets):
    calc = [call_args(steps(i)[0][0])["expression"] for i in sets["train"] if i["family"] == "calculator"]
    operands = [n for e in calc for n in NUMBER.findall(e)]
    assert len(set(operands)) > 0.6 * len(operands)
    assert {len(n.lstrip("-").split(".")[0]) for n in operands} >= {1, 2, 3, 4, 5, 6}
    assert any("(" in e for e in calc) and any("." in e for e in calc) and any(" " not in e for e in calc)
    keys = [call_args(m)["key"] for i in sets["train"] for m, _ in steps(i)
            if m["tool_calls"][0]["function"]["name"] == "kv_set"]
    assert len(set(keys)) > 0.5 * len(keys)


def test_follow_up_turns_compute_on_the_previous_answer(sets):
    items = sets["followup"] + [i for i in sets["train"] if i["family"] in mad.FOLLOW_UP]
    assert len(sets["followup"]) == SIZES["followup"] and len(items) > 20
    for item in items:
        users = [i for i, m in enumerate(item["messages"]) if m["role"] == "user"]
        assert len(users) == 2, item["id"]
        first_answer = item["messages"][users[1] - 1]["content"]
        (call, _), = [s for s in steps(item) if item["messages"].index(s[0]) > users[1]]
        args = json.loads(call["tool_calls"][0]["function"]["arguments"])
        previous = str(args.get("value", args.get("date", args.get("expression", "").split(" ")[0])))
        assert previous in first_answer and previous not in item["messages"][users[1]]["content"], item["id"]


def test_training_never_asks_an_evaluation_question_or_an_everyday_prompt(sets):
    asked = {t for i in sets["train"] for t in user_texts(i)}
    everyday = {t for turns, _, _ in eval_phrasings.EVERYDAY for t in turns}
    assert everyday and not asked & everyday and not asked & {q for q, _ in eval_phrasings.OUT_OF_DOMAIN}
