"""Tool registry (schemas, validation, error results, timeouts) and the builtin demo tools."""

import datetime as dt
import json
import threading
import time
from typing import Literal, Optional

import pytest

from kimi_jax.tools import KVStore, ToolError, ToolRegistry, ToolResult, builtin_tools

FIXED = dt.datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=dt.timezone.utc)


def ok(result: ToolResult):
    assert not result.is_error, result.content
    return json.loads(result.content)


def err(result: ToolResult) -> str:
    assert result.is_error, result.content
    assert result.content.startswith("error: ")
    return result.content


@pytest.fixture
def tools():
    return builtin_tools(clock=lambda: FIXED)


# ---- schema --------------------------------------------------------------------------------------

def test_schema_comes_from_type_hints_and_google_docstring():
    reg = ToolRegistry()

    @reg.register
    def search(query: str, limit: int, ratio: float, exact: bool, tags: list[str],
               mode: Literal["fast", "slow"] = "fast", note: Optional[str] = None):  # noqa: UP045 - on purpose
        """Search the catalogue
        for items.

        Longer text that is not part of the description.

        Args:
            query (str): What to search for,
                spanning two lines.
            limit: Most results.
            mode: How hard to try.

        Returns:
            A list.
        """

    fn = reg.specs()[0]["function"]
    assert reg.specs()[0]["type"] == "function"
    assert fn["name"] == "search"
    assert fn["description"] == "Search the catalogue for items."
    assert fn["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to search for, spanning two lines."},
            "limit": {"type": "integer", "description": "Most results."},
            "ratio": {"type": "number"},
            "exact": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"type": "string", "enum": ["fast", "slow"], "description": "How hard to try."},
            "note": {"type": "string"},
        },
        "required": ["query", "limit", "ratio", "exact", "tags"],
    }


def test_register_works_as_decorator_with_name_override_and_keeps_the_function():
    reg = ToolRegistry()

    @reg.register(name="add_numbers")
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    def noargs():
        """Nothing."""
        return "x"

    assert reg.register(noargs) is noargs
    assert add(1, 2) == 3
    assert reg.names() == ["add_numbers", "noargs"]
    assert "add_numbers" in reg and "add" not in reg and len(reg) == 2
    assert reg.specs()[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert [s["function"]["name"] for s in reg.specs(["noargs", "add_numbers"])] == ["noargs", "add_numbers"]
    with pytest.raises(KeyError):
        reg.specs(["nope"])


def test_register_rejects_what_json_cannot_call():
    reg = ToolRegistry()
    reg.register(lambda: 1, name="one")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(lambda: 1, name="one")
    with pytest.raises(ValueError, match="must match"):
        reg.register(lambda: 1, name="bad-name")

    def star(*args):
        """x"""

    def weird(x: set):
        """x"""

    def union(x: int | str):
        """x"""

    def drift(x: int):
        """Doc out of date.

        Args:
            y: gone
        """

    for fn in (star, weird, union, drift):
        with pytest.raises(TypeError):
            reg.register(fn)


# ---- call: every way model output can be wrong ---------------------------------------------------

@pytest.fixture
def reg():
    reg = ToolRegistry()

    @reg.register
    def scale(value: float, times: int, unit: Literal["m", "s"] = "m", tags: list[int] | None = None) -> dict:
        """Scale a value."""
        return {"value": value * times, "unit": unit, "types": [type(value).__name__, type(times).__name__],
                "tags": tags}

    @reg.register
    def echo(text: str) -> str:
        """Echo."""
        return text

    @reg.register
    def boom() -> None:
        """Raise."""
        raise ValueError("kaput")

    @reg.register
    def refuse() -> None:
        """Refuse."""
        raise ToolError("not today")

    return reg


def test_unknown_tool_lists_the_available_ones(reg):
    assert err(reg.call("foo", "{}")) == "error: unknown tool 'foo'; available: scale, echo, boom, refuse"


@pytest.mark.parametrize("arguments, message", [
    ('{"value": 1', "not valid JSON"),
    ("value=1", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got array"),
    ('"x"', "must be a JSON object, got string"),
    ("3", "must be a JSON object, got integer"),
    ("null", "must be a JSON object, got null"),
])
def test_arguments_that_are_not_a_json_object_are_an_error(reg, arguments, message):
    assert message in err(reg.call("scale", arguments))


@pytest.mark.parametrize("args, message", [
    ({"times": 2}, "missing required parameter 'value' for scale"),
    ({"value": 1, "times": 2, "x": 3}, "unexpected parameter 'x' for scale; parameters: value, times,"),
    ({"value": "1", "times": 2}, "parameter 'value' must be a number, got string"),
    ({"value": 1, "times": 2.5}, "parameter 'times' must be an integer, got number"),
    ({"value": 1, "times": True}, "parameter 'times' must be an integer, got boolean"),
    ({"value": None, "times": 2}, "parameter 'value' must be a number, got null"),
    ({"value": 1, "times": 2, "unit": "km"}, 'parameter \'unit\' must be one of "m", "s"; got "km"'),
    ({"value": 1, "times": 2, "tags": [1, "x"]}, "parameter 'tags'[1] must be an integer, got string"),
])
def test_wrong_parameters_are_an_error_naming_the_parameter(reg, args, message):
    assert message in err(reg.call("scale", json.dumps(args)))


def test_ints_pass_for_floats_and_whole_floats_for_ints(reg):
    out = ok(reg.call("scale", '{"value": 2, "times": 3.0, "tags": null}'))
    assert out == {"value": 6.0, "unit": "m", "types": ["float", "int"], "tags": None}
    assert ok(reg.call("scale", {"value": 1.5, "times": 2, "unit": "s", "tags": [1]}))["unit"] == "s"


def test_empty_arguments_mean_no_arguments(reg, tools):
    assert err(reg.call("boom", "")) == "error: boom failed: ValueError: kaput"
    assert ok(tools.call("kv_list", " ")) == {"result": []}


def test_a_raising_tool_becomes_an_error_result(reg):
    assert err(reg.call("boom", "{}")) == "error: boom failed: ValueError: kaput"
    assert err(reg.call("refuse", "{}")) == "error: not today"

    @reg.register
    def leave() -> None:
        """Exit."""
        raise SystemExit(3)

    @reg.register
    def own_timeout() -> None:
        """Raise TimeoutError."""
        raise TimeoutError("upstream slow")

    assert err(reg.call("leave", "{}")) == "error: leave failed: RuntimeError: the tool raised SystemExit"
    assert err(reg.call("own_timeout", "{}")) == "error: own_timeout failed: TimeoutError: upstream slow"


def test_results_are_strings_compact_json_and_long_ones_are_truncated(reg):
    assert reg.call("echo", '{"text": "héllo"}') == ToolResult("héllo", False)
    assert reg.call("scale", '{"value": 1, "times": 2}').content == \
        '{"value":2.0,"unit":"m","types":["float","int"],"tags":null}'
    reg.max_result_chars = 10
    assert reg.call("echo", json.dumps({"text": "x" * 11})).content == "x" * 10 + "...[truncated]"


def test_a_tool_past_its_timeout_is_reported_without_blocking():
    reg = ToolRegistry()
    release = threading.Event()

    @reg.register
    def slow() -> str:
        """Hang."""
        release.wait(30)
        return "late"

    t0 = time.perf_counter()
    try:
        assert err(reg.call("slow", "{}", timeout=0.2)) == "error: slow timed out after 0.2s"
    finally:
        release.set()
    assert time.perf_counter() - t0 < 5


# ---- builtin tools -------------------------------------------------------------------------------

def test_builtin_tools_are_the_safe_demo_set(tools):
    assert tools.names() == ["calculator", "convert_units", "lookup", "date_add", "date_diff", "current_time",
                             "kv_set", "kv_get", "kv_list"]
    for spec in tools.specs():
        assert spec["type"] == "function" and spec["function"]["description"]
        assert spec["function"]["parameters"]["type"] == "object"


@pytest.mark.parametrize("expression, value", [
    ("17*23", 391), ("(2 + 3) * 4", 20), ("-5 + 2", -3), ("+-3", -3), ("7/2", 3.5), ("10/2", 5), ("7//2", 3),
    ("-7//2", -4), ("7 % 3", 1), ("2**10", 1024), ("2**-1", 0.5), ("1.5*2", 3), ("0.1+0.2", 0.3),
    ("1/3", 0.3333333333), ("123456789*987654321", 121932631112635269), ("((1))", 1),
])
def test_calculator_evaluates_arithmetic(tools, expression, value):
    assert ok(tools.call("calculator", json.dumps({"expression": expression}))) == {"result": value}


@pytest.mark.parametrize("expression, message", [
    ("pi * 2", "unknown name 'pi'"),
    ("__import__('os').system('ls')", "only numbers"),
    ("(1).real", "only numbers"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("[1, 2]", "only numbers"),
    ("2 ^ 3", "use **"),
    ("1 << 100", "only numbers"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("10**10**10", "exponent too large"),
    ("9**200", "result too large"),
    ("1e300*1e300", "result too large"),
    ("10.0**400", "result too large"),
    ("(-8)**0.5", "not a real number"),
    ("2 +", "cannot parse"),
    ("1" * 201, "longer than 200"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(tools, expression, message):
    assert message in err(tools.call("calculator", json.dumps({"expression": expression})))


@pytest.mark.parametrize("value, a, b, result, unit", [
    (5, "km", "mi", 3.10686, "mi"), (100, "C", "F", 212, "F"), (32, "fahrenheit", "celsius", 0, "C"),
    (0, "K", "C", -273.15, "C"), (10, "lb", "kg", 4.53592, "kg"), (1, "gal", "l", 3.78541, "l"),
    (2.5, "hours", "min", 150, "min"), (3, "feet", "inches", 36, "in"), (1, "week", "day", 7, "day"),
    (1, "t", "g", 1000000, "g"), (212, "degrees Fahrenheit", "Celsius", 100, "C"),
])
def test_convert_units_across_dimensions_and_aliases(tools, value, a, b, result, unit):
    args = {"value": value, "from_unit": a, "to_unit": b}
    assert ok(tools.call("convert_units", json.dumps(args))) == {"result": result, "unit": unit}


def test_convert_units_explains_impossible_conversions(tools):
    def convert(a, b, value=1):
        return err(tools.call("convert_units", json.dumps({"value": value, "from_unit": a, "to_unit": b})))

    assert convert("km", "kg") == "error: cannot convert km (length) to kg (mass)"
    assert convert("C", "m") == "error: cannot convert C (temperature) to m (length)"
    assert convert("parsec", "m").startswith("error: unknown unit 'parsec'; known: m, km,")
    assert "absolute zero" in convert("C", "K", value=-300)


def test_lookup_reads_the_fact_tables(tools):
    assert ok(tools.call("lookup", '{"table":"countries","key":"France"}')) == \
        {"capital": "Paris", "continent": "Europe", "currency": "EUR"}
    assert ok(tools.call("lookup", '{"table":"elements","key":"Iron"}')) == {"symbol": "Fe", "number": 26,
                                                                            "mass": 55.845}
    assert ok(tools.call("lookup", '{"table":"elements","key":"au"}'))["number"] == 79
    assert ok(tools.call("lookup", '{"table":"planets","key":"mars"}')) == {"order": 4, "radius_km": 3389.5}
    missing = err(tools.call("lookup", '{"table":"countries","key":"Atlantis"}'))
    assert missing == "error: no key 'Atlantis' in countries; e.g. Argentina, Australia, Austria"
    assert "must be one of" in err(tools.call("lookup", '{"table":"cities","key":"Paris"}'))


def test_date_add_and_date_diff_use_iso_dates(tools):
    assert ok(tools.call("date_add", '{"date":"2024-02-28","days":1}')) == {"result": "2024-02-29"}
    assert ok(tools.call("date_add", '{"date":"2024-03-01","days":-366}')) == {"result": "2023-03-01"}
    assert ok(tools.call("date_diff", '{"start":"2024-01-01","end":"2024-03-01"}')) == {"result": 60}
    assert ok(tools.call("date_diff", '{"start":"2024-03-01","end":"2024-01-01"}')) == {"result": -60}
    assert "not a date like" in err(tools.call("date_add", '{"date":"2023-02-29","days":1}'))
    assert "not a date like" in err(tools.call("date_diff", '{"start":"03/15/2024","end":"2024-01-01"}'))
    assert err(tools.call("date_add", '{"date":"9999-12-30","days":5}')) == "error: date out of range"


@pytest.mark.parametrize("timezone, result", [
    (None, "2025-03-14T09:26:53+00:00"), ("UTC", "2025-03-14T09:26:53+00:00"),
    ("+05:30", "2025-03-14T14:56:53+05:30"), ("UTC-8", "2025-03-14T01:26:53-08:00"),
    ("-03:00", "2025-03-14T06:26:53-03:00"), ("GMT+0545", "2025-03-14T15:11:53+05:45"),
])
def test_current_time_reads_the_injected_clock(tools, timezone, result):
    args = {} if timezone is None else {"timezone": timezone}
    assert ok(tools.call("current_time", json.dumps(args))) == {"result": result}


def test_current_time_treats_a_naive_clock_as_utc_and_refuses_named_zones():
    tools = builtin_tools(clock=lambda: dt.datetime(2020, 1, 1, 12, 0))
    assert ok(tools.call("current_time", '{"timezone":"+01:00"}')) == {"result": "2020-01-01T13:00:00+01:00"}
    assert "unknown timezone 'Europe/Paris'" in err(tools.call("current_time", '{"timezone":"Europe/Paris"}'))
    assert "unknown timezone" in err(tools.call("current_time", '{"timezone":"+25:00"}'))


def test_kv_store_round_trips_and_is_injectable(tools):
    store = KVStore(max_keys=2, max_value_chars=10)
    tools = builtin_tools(store=store)
    assert ok(tools.call("kv_set", '{"key":"color","value":"blue"}')) == {"result": "ok"}
    assert ok(tools.call("kv_get", '{"key":"color"}')) == {"result": "blue"}
    assert store.get("color") == "blue"
    assert err(tools.call("kv_get", '{"key":"size"}')) == "error: no key 'size'; keys: color"
    assert ok(tools.call("kv_set", '{"key":"city","value":"Lima"}')) == {"result": "ok"}
    assert ok(tools.call("kv_list", "{}")) == {"result": ["city", "color"]}
    assert err(tools.call("kv_set", '{"key":"pet","value":"cat"}')) == "error: store is full (2 keys)"
    assert ok(tools.call("kv_set", '{"key":"city","value":"Quito"}')) == {"result": "ok"}  # overwrite fits
    assert "value longer than 10" in err(tools.call("kv_set", '{"key":"city","value":"' + "x" * 11 + '"}'))
    assert "must not be empty" in err(tools.call("kv_set", '{"key":" ","value":"x"}'))


def test_each_builtin_registry_has_its_own_store():
    a, b = builtin_tools(), builtin_tools()
    ok(a.call("kv_set", '{"key":"k","value":"v"}'))
    assert ok(b.call("kv_list", "{}")) == {"result": []}
