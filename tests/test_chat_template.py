"""Chat template: byte-exact renders of docs/k2-format.md §6.2-§6.5 and the rendering environment."""

import copy
import shutil
from importlib import resources

import pytest

from kimi_jax.chat import ChatTemplate, render_chat
from kimi_jax.errors import KimiError

DEFAULT_SYSTEM = (
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
)
GEN_PROMPT = "<|im_assistant|>assistant<|im_middle|>"

WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]

WEATHER_CALL = {"id": "functions.get_weather:0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

AGENTIC_TURN = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call the weather tool.",
     "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
     "content": '{"weather": "Sunny", "temp_c": 21}'},
]

TOOL_DECLARE = (
    '<|im_system|>tool_declare<|im_middle|>'
    '[{"function":{"description":"Get weather for a city","name":"get_weather",'
    '"parameters":{"properties":{"city":{"description":"City name","type":"string"}},"required":["city"],'
    '"type":"object"}},"type":"function"}]<|im_end|>'
)

# docs/k2-format.md §6.2, verbatim.
EXAMPLE_A = (
    TOOL_DECLARE + DEFAULT_SYSTEM
    + "<|im_user|>user<|im_middle|>What's the weather in Paris?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think>I should call the weather tool.</think>"
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
    '{"weather": "Sunny", "temp_c": 21}<|im_end|>'
    "<|im_assistant|>assistant<|im_middle|>"
)

# docs/k2-format.md §6.3, verbatim.
EXAMPLE_B = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
    "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think>Hello! How can I help?<|im_end|>"
    "<|im_user|>user<|im_middle|>What's the weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>"
)

# docs/k2-format.md §6.4 with its elided prefix filled in: the tools and default system prompt of §6.2.
EXAMPLE_C = (
    TOOL_DECLARE + DEFAULT_SYSTEM
    + "<|im_user|>user<|im_middle|>What's the weather in Paris?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|><|tool_call_begin|>"
    'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
    '{"weather": "Sunny", "temp_c": 21}<|im_end|>'
    "<|im_assistant|>assistant<|im_middle|><think></think>It is sunny, 21 C.<|im_end|>"
)


def test_tool_loop_keeps_current_reasoning_and_renders_spec_example_a():
    assert render_chat(AGENTIC_TURN, WEATHER_TOOLS) == EXAMPLE_A


def test_reasoning_of_a_finished_turn_is_dropped_spec_example_b():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "Greet back."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    assert render_chat(messages) == EXAMPLE_B


def test_completed_agentic_turn_drops_all_reasoning_spec_example_c():
    answer = {"role": "assistant", "content": "It is sunny, 21 C.", "reasoning_content": "Done."}
    messages = [*AGENTIC_TURN, answer]
    assert render_chat(messages, WEATHER_TOOLS, add_generation_prompt=False) == EXAMPLE_C


def test_empty_conversation_gets_default_system_prompt_and_generation_prompt():
    assert render_chat([]) == DEFAULT_SYSTEM + GEN_PROMPT


def test_tool_result_without_name_is_labelled_tool():
    messages = [{"role": "user", "content": "q"},
                {"role": "tool", "tool_call_id": "functions.f:0", "content": "42"}]
    assert render_chat(messages, add_generation_prompt=False).endswith(
        "<|im_system|>tool<|im_middle|>## Return of functions.f:0\n42<|im_end|>")


def test_dict_arguments_render_as_spaced_json_and_strings_verbatim():
    calls = [
        {"id": "functions.f:0", "type": "function",
         "function": {"name": "f", "arguments": {"a": 1, "é": [1, 2]}}},
        {"id": "functions.g:1", "type": "function", "function": {"name": "g", "arguments": '{"b":2}'}},
    ]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    out = render_chat(messages, add_generation_prompt=False)
    assert out.endswith(
        "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1, "é": [1, 2]}<|tool_call_end|>'
        '<|tool_call_begin|>functions.g:1<|tool_call_argument_begin|>{"b":2}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>")


@pytest.mark.parametrize("reasoning", [None, "absent"])
def test_null_or_missing_reasoning_renders_empty_think_not_none(reasoning):
    assistant = {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]}
    if reasoning != "absent":
        assistant["reasoning_content"] = reasoning
    out = render_chat([{"role": "user", "content": "q"}, assistant])
    assert "None" not in out
    assert "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>" in out


def test_empty_string_content_renders_nothing():
    out = render_chat([{"role": "user", "content": ""}], add_generation_prompt=False)
    assert out == DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|><|im_end|>"


def test_empty_text_part_renders_nothing_not_its_repr():
    # docs/k2-format.md §7.4.2: vLLM turned "" into this list and the prompt showed the Python repr.
    assistant = {"role": "assistant", "content": [{"type": "text", "text": ""}], "tool_calls": [WEATHER_CALL]}
    out = render_chat([{"role": "user", "content": "q"}, assistant])
    assert "<think></think><|tool_calls_section_begin|>" in out and "type" not in out


def test_content_parts_concatenate_text_and_mark_images():
    content = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "x"}},
               {"type": "text", "text": "here"}]
    out = render_chat([{"role": "user", "content": content}], add_generation_prompt=False)
    image = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    assert out.endswith(f"<|im_middle|>look {image}\nhere<|im_end|>")


def test_name_field_replaces_role_in_the_header():
    system = {"role": "system", "name": "policy", "content": "Be brief."}
    out = render_chat([system], add_generation_prompt=False)
    assert out == "<|im_system|>policy<|im_middle|>Be brief.<|im_end|>"


def test_tools_are_sorted_at_every_depth_and_not_mutated():
    unsorted = [{"function": {"parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"}}}, "name": "get_weather",
        "description": "Get weather for a city"}, "type": "function"}]
    before = copy.deepcopy(unsorted)
    assert render_chat([], unsorted, add_generation_prompt=False) == TOOL_DECLARE + DEFAULT_SYSTEM
    assert unsorted == before and list(unsorted[0]) == ["function", "type"]


def test_non_ascii_tool_text_is_not_escaped():
    tools = [{"type": "function", "function": {"name": "天气", "description": "<b>&</b>"}}]
    out = render_chat([], tools, add_generation_prompt=False)
    assert '[{"function":{"description":"<b>&</b>","name":"天气"},"type":"function"}]' in out


def test_messages_are_not_mutated():
    messages = copy.deepcopy(AGENTIC_TURN)
    render_chat(messages, WEATHER_TOOLS)
    assert messages == AGENTIC_TURN


def test_checkpoint_template_is_used_instead_of_default(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{{ tools | tojson(indent=1, sort_keys=True) }}{{ strftime_now('%Y')|length }}")
    out = ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hé"}], [{"b": 1, "a": "é"}])
    assert out == '[user]hé[\n {\n  "a": "é",\n  "b": 1\n }\n]4'


def test_default_template_file_in_a_checkpoint_renders_identically(tmp_path):
    shutil.copy(resources.files("kimi_jax.chat") / "chat_template.jinja", tmp_path / "chat_template.jinja")
    assert ChatTemplate.from_dir(tmp_path).render(AGENTIC_TURN, WEATHER_TOOLS) == EXAMPLE_A
    assert render_chat(AGENTIC_TURN, WEATHER_TOOLS, template=ChatTemplate.from_dir(tmp_path)) == EXAMPLE_A


def test_missing_template_names_the_file(tmp_path):
    with pytest.raises(KimiError, match="chat_template.jinja: chat template not found"):
        ChatTemplate.from_dir(tmp_path)


def test_unparseable_template_names_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(KimiError, match="chat_template.jinja: cannot parse chat template"):
        ChatTemplate.from_dir(tmp_path)


@pytest.mark.parametrize("message", [{"role": "user", "content": {"text": "hi"}}, {"content": "no role"},
                                     {"role": "user", "content": [{"type": "audio"}]}])
def test_malformed_messages_raise_kimi_error(message):
    with pytest.raises(KimiError, match="chat_template.jinja: cannot render"):
        render_chat([message])
