"""Which schemas strict decoding takes, and the errors for the ones it cannot: each names the function
(or the response format), the request field, and the reason."""

import json
import pathlib

import pytest

from kimi_jax.chat.constraint import output_constraint
from kimi_jax.chat.grammar import GrammarError, ToolChoice, check_schemas, output_grammar


def tools_with(parameters, name="lookup"):
    ok = {"type": "function", "function": {"name": "fine", "parameters": {"type": "object"}}}
    return [ok, {"type": "function", "function": {"name": name, "parameters": parameters}}]


def compile_error(tok, tools=None, **kw) -> GrammarError:
    with pytest.raises(GrammarError) as info:
        output_constraint(tok, vocab_size=tok.n_vocab, stop_ids=tok.stop_ids, tools=tools, **kw)
    return info.value


@pytest.mark.parametrize("parameters, reason", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "Invalid type: strin"),
    ({"type": "object", "properties": []}, "properties must be an object"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": "a"}}}, "Expected f64 for 'minimum'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]},
     "Unsatisfiable"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not exist"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}, "look-around"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "colour"}}}, "Unknown format: colour"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}, "oneOf"),
])
def test_a_schema_that_cannot_be_enforced_names_the_function_field_and_reason(byte_tokenizer, parameters, reason):
    error = compile_error(byte_tokenizer, tools_with(parameters))
    assert error.param == "tools[1].function.parameters"
    assert "function 'lookup'" in str(error) and reason in str(error)


def test_parameters_that_are_not_an_object_are_refused(byte_tokenizer):
    error = compile_error(byte_tokenizer, tools_with({"type": "string"}))
    assert error.param == "tools[1].function.parameters" and '"string"' in str(error)


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"<|tool_call_end|>": {"type": "string"}}},
    {"type": "object", "properties": {"a": {"enum": ["ok", "stop [EOS] here"]}}},
    {"type": "object", "properties": {"a": {"const": {"x": ["</think>"]}}}},
])
def test_a_schema_that_forces_a_control_token_spelling_is_refused(byte_tokenizer, parameters):
    error = compile_error(byte_tokenizer, tools_with(parameters))
    assert error.param == "tools[1].function.parameters" and "control token" in str(error)


def test_a_bad_response_format_schema_names_the_response_format(byte_tokenizer):
    error = compile_error(byte_tokenizer, content_schema={"type": "object", "not": {}},
                          content_param="response_format.json_schema.schema")
    assert error.param == "response_format.json_schema.schema" and "not" in str(error)


def test_without_strict_arguments_are_not_compiled(byte_tokenizer):
    tools = tools_with({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})
    assert output_grammar(byte_tokenizer, tools=tools, strict=False) is None
    check_schemas(tools, strict=False)  # nothing to check
    tools[1]["function"]["strict"] = False
    assert output_grammar(byte_tokenizer, tools=tools, tool_choice=ToolChoice("required")) is not None


def test_tool_choice_none_forbids_calls_whatever_the_schemas(byte_tokenizer):
    tools = tools_with({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})
    grammar = output_grammar(byte_tokenizer, tools=tools, tool_choice=ToolChoice("none"))
    assert "section" not in grammar and "uniqueItems" not in grammar


def _unsupported_rows():
    """(example schema, reason, as parameters?) of the table in docs/serving.md."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    table = text.split("<!-- unsupported-schemas:", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`{"):
            example = json.loads(cells[1].split("`")[1])
            rows.append((example, cells[2].strip("`"), "as `parameters`" in cells[1]))
    return rows


def test_the_documented_unsupported_features_give_the_documented_reasons(byte_tokenizer):
    rows = _unsupported_rows()
    assert len(rows) >= 15
    for example, reason, as_parameters in rows:
        if as_parameters:
            error = compile_error(byte_tokenizer, tools_with(example))
        else:
            error = compile_error(byte_tokenizer, content_schema=example)
        assert reason in str(error), (example, str(error))
