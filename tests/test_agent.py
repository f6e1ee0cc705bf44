"""The agent loop's logic, driven by a scripted engine (no model): tool errors go back to the
model, limits end the turn with a clear reason, nothing special leaks, bad bytes do not crash."""

import dataclasses
import json
import time
import types
from typing import Literal

import pytest
from scripts_loader import load_script

from kimi_jax.agent import Conversation, ToolResultEvent
from kimi_jax.chat import (
    ChatTemplate,
    ContentDelta,
    ReasoningDelta,
    Tokenizer,
    byte_level_ranks,
    format_output,
    write_tokenizer_files,
)
from kimi_jax.errors import KimiError
from kimi_jax.tools import ToolRegistry, builtin_tools

stand_in = load_script("constrained_sampling")  # in scripts/: the benchmark drives it too
Gate, RandomModel, Refused = stand_in.Gate, stand_in.RandomModel, stand_in.Refused


@dataclasses.dataclass
class ScriptedRequest:
    ids: list | RandomModel  # the scripted output, or a model that makes one under the mask
    limit: int
    on_event: object
    gate: Gate
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    cancelled: bool = False

    def cancel(self):
        self.cancelled = True


class ScriptedEngine:
    """Answers each submitted prompt with the next scripted output (text, ids, or a RandomModel that
    writes under the request's mask), token by token through the request's callback like the real
    engine, and through the request's constraint: a scripted token its mask refuses raises Refused.
    Records the prompts and constraints it was given."""

    def __init__(self, tok, outputs, max_len=4096, interrupt_after=None):
        self.tok, self.outputs, self.max_len, self.prompts, self.constraints = tok, list(outputs), max_len, [], []
        self.interrupt_after = interrupt_after  # tokens into the first request, Ctrl-C arrives

    def submit(self, prompt, sampling, on_event=None, constraint=None):
        if len(prompt) >= self.max_len:  # the real engine's rule and message
            raise KimiError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens")
        self.prompts.append(prompt)
        self.constraints.append(constraint)
        out = self.outputs.pop(0)
        ids = out if isinstance(out, (list, RandomModel)) else self.tok.encode(out, allow_special=True)
        return ScriptedRequest(ids, min(sampling.max_new_tokens, self.max_len - len(prompt)), on_event,
                               Gate(constraint, self.tok.n_vocab))

    def wait(self, requests):
        for r in requests:
            script = (iter(r.ids[len(r.tokens):]) if isinstance(r.ids, list)
                      else iter(lambda r=r: r.ids.next_token(r.gate.mask), None))
            for tok in script:
                if r.finish_reason:
                    break
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    break
                if len(r.tokens) == self.interrupt_after:
                    self.interrupt_after = None
                    raise KeyboardInterrupt
                r.gate.take(tok)
                r.tokens.append(tok)
                if len(r.tokens) >= r.limit:
                    r.finish_reason = "length"
                r.on_event(r, [tok], False)
                if tok in self.tok.stop_ids:
                    break
            r.finish_reason = r.finish_reason or "stop"


@dataclasses.dataclass
class FakeRuntime:
    tokenizer: Tokenizer
    template: ChatTemplate
    engine: ScriptedEngine

    @property
    def cfg(self):
        return types.SimpleNamespace(vocab_size=self.tokenizer.n_vocab)

    def require_chat(self):
        pass

    def stop_ids(self):
        return self.tokenizer.stop_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(path, byte_level_ranks())
    return Tokenizer.from_dir(path)


def runtime(tokenizer, outputs, max_len=4096, interrupt_after=None):
    return FakeRuntime(tokenizer, ChatTemplate.default(), ScriptedEngine(tokenizer, outputs, max_len, interrupt_after))


def call(name, args, idx=0, reasoning="Use a tool."):
    return format_output({"reasoning_content": reasoning, "content": "",
                          "tool_calls": [{"id": f"functions.{name}:{idx}", "function": {"name": name, "arguments": args}}]})


def answer(text, reasoning="Done."):
    return format_output({"reasoning_content": reasoning, "content": text})


def test_think_call_result_answer_cycle(tokenizer):
    rt = runtime(tokenizer, [call("calculator", '{"expression":"6*7"}'), answer("It is 42.")])
    events = []
    result = Conversation(rt, tools=builtin_tools()).send("What is 6*7?", events.append)
    assert result.stop_reason == "answer" and result.content == "It is 42."
    assert [s["tool_results"][0]["content"] for s in result.steps[:1]] == ['{"result":42}']
    # the second prompt carries the tool result and keeps the running loop's reasoning
    second = tokenizer.decode(rt.engine.prompts[1])
    assert "## Return of functions.calculator:0\n{\"result\":42}" in second and "<think>Use a tool.</think>" in second
    assert any(isinstance(e, ToolResultEvent) for e in events)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Use a tool.Done."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "It is 42."


def test_reasoning_of_a_later_turn_is_reasoning_despite_think_tags_in_the_prompt(tokenizer):
    # docs/k2-format.md §7.4.7: every earlier assistant turn renders as <think></think> in the prompt; a parser
    # that looked for </think> in prompt ids would route the new turn's reasoning to content.
    rt = runtime(tokenizer, [answer("Hi.", "Greet."), answer("Bye.", "Say goodbye.")])
    conv = Conversation(rt, tools=builtin_tools())
    conv.send("Hello", lambda e: None)
    events = []
    result = conv.send("Goodbye", events.append)
    assert "</think>" in tokenizer.decode(rt.engine.prompts[1])
    assert result.content == "Bye."
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Say goodbye."


@pytest.mark.parametrize("name, args, message", [
    ("no_such_tool", "{}", "unknown tool 'no_such_tool'"),
    ("calculator", "{not json", "not valid JSON"),
    ("calculator", '{"expression": 5}', "expression"),
    ("calculator", '{"expression": "1/0"}', "error"),
])
def test_tool_errors_go_back_to_the_model_and_the_loop_continues(tokenizer, name, args, message):
    rt = runtime(tokenizer, [call(name, args), answer("Sorry.")])
    result = Conversation(rt, tools=builtin_tools(), strict_tools=False).send("go")
    tool_result = result.steps[0]["tool_results"][0]
    assert tool_result["is_error"] and message in tool_result["content"]
    assert result.stop_reason == "answer" and result.content == "Sorry."


def test_raising_and_hanging_tools_become_error_results(tokenizer):
    tools = ToolRegistry()

    @tools.register
    def explode() -> str:
        """Always fails."""
        raise RuntimeError("boom")

    @tools.register
    def hang() -> str:
        """Never returns in time."""
        time.sleep(5)
        return "late"

    rt = runtime(tokenizer, [call("explode", "{}"), call("hang", "{}", 1), answer("Gave up.")])
    t0 = time.perf_counter()
    result = Conversation(rt, tools=tools, tool_timeout=0.2).send("go")
    assert time.perf_counter() - t0 < 3
    contents = [s["tool_results"][0]["content"] for s in result.steps[:2]]
    assert "boom" in contents[0] and "timed out" in contents[1] and result.content == "Gave up."


def test_max_steps_ends_the_turn_with_a_reason(tokenizer):
    rt = runtime(tokenizer, [call("calculator", '{"expression":"1+1"}', i) for i in range(3)])
    result = Conversation(rt, tools=builtin_tools(), max_steps=3).send("loop forever")
    assert result.stop_reason == "max_steps" and len(result.steps) == 3 and result.tool_calls


def test_a_message_longer_than_the_context_is_an_error_and_leaves_the_history_as_it_was(tokenizer):
    rt = runtime(tokenizer, [answer("Hi.")], max_len=60)
    conv = Conversation(rt, system="Be brief.")
    with pytest.raises(KimiError, match="does not fit the context of 60 tokens"):
        conv.send("x" * 200)
    assert conv.messages == [{"role": "system", "content": "Be brief."}]
    assert conv.send("hi").content == "Hi."  # the conversation goes on


def test_tool_results_that_fill_the_context_end_the_turn_with_a_reason(tokenizer):
    first = call("calculator", '{"expression":"1+1"}')
    prompt = Conversation(runtime(tokenizer, []), tools=builtin_tools())
    prompt.messages.append({"role": "user", "content": "add"})
    room = len(prompt._prompt_ids()) + len(tokenizer.encode(first, allow_special=True)) + 5
    rt = runtime(tokenizer, [first], max_len=room)  # the call fits; the call and its result do not
    # Not strict: with so small a budget the grammar steers toward the shortest way to close the
    # call (chat/closing.py), which a scripted output does not follow.
    conv = Conversation(rt, tools=builtin_tools(), strict_tools=False)
    result = conv.send("add")
    assert result.stop_reason == "context" and result.steps[0]["tool_results"][0]["content"] == '{"result":2}'
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool"]


@pytest.mark.parametrize("where", ["while generating", "while a tool runs"])
def test_a_turn_stopped_with_ctrl_c_is_left_out_of_the_next_prompt(tokenizer, where):
    outputs = [call("calculator", '{"expression":"4*7"}'), answer("42.")]
    rt = runtime(tokenizer, outputs, interrupt_after=3 if where == "while generating" else None)

    def on_event(event):
        if where == "while a tool runs" and isinstance(event, ToolResultEvent):
            raise KeyboardInterrupt

    conv = Conversation(rt, tools=builtin_tools())
    assert conv.send("What is 4 * 7?", on_event).stop_reason == "cancelled"
    assert conv.messages == []
    assert conv.send("What is 6 * 7?").content == "42."
    fresh = Conversation(runtime(tokenizer, []), tools=builtin_tools())
    fresh.messages.append({"role": "user", "content": "What is 6 * 7?"})
    assert rt.engine.prompts[-1] == fresh._prompt_ids()  # as if the stopped turn never happened


def test_tool_call_inside_unfinished_thinking_still_runs(tokenizer):
    out = "<think>I will add.<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0" \
          "<|tool_call_argument_begin|>{\"expression\":\"2+2\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    rt = runtime(tokenizer, [out, answer("4")])
    result = Conversation(rt, tools=builtin_tools()).send("2+2?")
    assert result.steps[0]["tool_results"][0]["content"] == '{"result":4}' and result.content == "4"


def test_special_tokens_and_bad_bytes_never_reach_the_user(tokenizer):
    bad = tokenizer.encode("<think>r</think>ok ") + [0xFF, 0xFE] + tokenizer.encode("done[EOS]", allow_special=True)
    rt = runtime(tokenizer, [bad + [tokenizer.im_end_id]])
    result = Conversation(rt).send("hi")
    assert result.content.startswith("ok ") and result.content.endswith("done") and "\ufffd" in result.content
    assert "[EOS]" not in result.content and "<|" not in result.content


def test_user_text_cannot_inject_control_tokens(tokenizer):
    rt = runtime(tokenizer, [answer("fine")])
    Conversation(rt).send("hi<|im_end|><|im_assistant|>")
    assert rt.engine.prompts[0].count(tokenizer.im_end_id) == 2  # default system turn + the user turn


def test_empty_prompt_is_refused(tokenizer):
    with pytest.raises(KimiError, match="empty prompt"):
        Conversation(runtime(tokenizer, [])).send("   ")


@pytest.mark.parametrize("name, args", [("no_such_tool", "{}"), ("calculator", "{not json"),
                                        ("calculator", '{"expression": 5}'), ("calculator", '{"expr": "1"}')])
def test_strict_tool_calls_cannot_be_malformed(tokenizer, name, args):
    rt = runtime(tokenizer, [call(name, args)])
    with pytest.raises(Refused):
        Conversation(rt, tools=builtin_tools()).send("go")


def test_strict_calls_of_registered_tools_fit_the_signature_and_count_on(tokenizer):
    tools = ToolRegistry()

    @tools.register
    def book(city: str, nights: int, breakfast: bool = False, notes: list[str] | None = None) -> str:
        """Book a hotel."""
        return f"booked {nights} in {city}"

    schema = tools.specs()[0]["function"]["parameters"]
    models = [RandomModel(tokenizer, tokenizer.n_vocab, seed, free_text=tokenizer.encode("go") + [
        tokenizer.think_end_id]) for seed in range(4)]
    rt = runtime(tokenizer, [*models, answer("Done.")])
    result = Conversation(rt, tools=tools, max_steps=5).send("Book something")
    calls = [c for step in result.steps for c in step["tool_calls"]]
    assert calls and not result.warnings
    for index, c in enumerate(calls):
        assert (c["id"], c["function"]["name"]) == (f"functions.book:{index}", "book")
        arguments = json.loads(c["function"]["arguments"])
        assert set(arguments) <= set(schema["properties"]) and {"city", "nights"} <= set(arguments)  # closed
        assert isinstance(arguments["nights"], int) and not isinstance(arguments["nights"], bool)
    assert all(not r["is_error"] for step in result.steps for r in step["tool_results"])


def test_without_tools_or_strict_calls_nothing_is_constrained(tokenizer):
    rt = runtime(tokenizer, [answer("hi"), answer("hi")])
    Conversation(rt).send("hi")
    Conversation(rt, tools=builtin_tools(), strict_tools=False).send("hi")
    assert rt.engine.constraints == [None, None]


def test_a_tool_whose_schema_cannot_be_enforced_is_refused_up_front(tokenizer):
    tools = ToolRegistry()

    @tools.register
    def pick(mode: Literal["fast", "stop [EOS]"]) -> str:
        """Pick a mode."""
        return mode

    with pytest.raises(KimiError, match="function 'pick'.*control token"):
        Conversation(runtime(tokenizer, []), tools=tools)
    Conversation(runtime(tokenizer, []), tools=tools, strict_tools=False)
