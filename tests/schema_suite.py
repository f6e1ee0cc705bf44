"""Parameter schemas written for the strict-tool-call tests: each is declared as the `parameters` of a
function and a call is forced; every call made must validate under it (jsonschema).

They cover what users declare: nested objects and arrays, $defs/$ref (also recursive), anyOf and
disjoint oneOf, enum and const, integer and number bounds, string length, pattern and format,
required and optional keys, additionalProperties false, non-ASCII and escaped property names, and
the empty schema."""

_STR = {"type": "string"}
_INT = {"type": "integer"}

SCHEMAS = {
    # ---- flat objects ------------------------------------------------------------------------------
    "empty": {},
    "object_no_properties": {"type": "object"},
    "object_empty_properties_closed": {"type": "object", "properties": {}, "additionalProperties": False},
    "one_string": {"type": "object", "properties": {"city": _STR}, "required": ["city"]},
    "one_optional_string": {"type": "object", "properties": {"city": _STR}},
    "weather": {"type": "object", "properties": {"city": _STR, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": False},
    "all_scalars": {"type": "object", "properties": {"s": _STR, "i": _INT, "n": {"type": "number"},
                                                      "b": {"type": "boolean"}, "z": {"type": "null"}},
                    "required": ["s", "i", "n", "b", "z"], "additionalProperties": False},
    "some_required": {"type": "object", "properties": {"a": _STR, "b": _INT, "c": {"type": "boolean"}},
                      "required": ["b"], "additionalProperties": False},
    "required_not_in_properties": {"type": "object", "properties": {"a": _STR}, "required": ["a", "extra"]},
    "additional_typed": {"type": "object", "properties": {"id": _INT}, "required": ["id"],
                         "additionalProperties": {"type": "number"}},
    "map_of_strings": {"type": "object", "additionalProperties": _STR},
    "type_list_nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"]}},
                           "required": ["note"], "additionalProperties": False},
    "no_type_properties": {"properties": {"q": _STR}, "required": ["q"]},
    # ---- numbers -----------------------------------------------------------------------------------
    "int_range": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["n"], "additionalProperties": False},
    "int_exclusive": {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0,
                                                             "exclusiveMaximum": 100}}, "required": ["n"]},
    "int_large_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1000000,
                                                                "maximum": 1000500}}, "required": ["n"]},
    "int_multiple": {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0,
                                                            "maximum": 100}}, "required": ["n"]},
    "number_range": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.25}},
                     "required": ["x"], "additionalProperties": False},
    "number_positive": {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0}},
                        "required": ["price"]},
    "number_negative_only": {"type": "object", "properties": {"t": {"type": "number", "maximum": -273.15}},
                             "required": ["t"]},
    "latlon": {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"],
        "additionalProperties": False},
    # ---- strings -----------------------------------------------------------------------------------
    "string_lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4}},
                       "required": ["code"], "additionalProperties": False},
    "string_exact_length": {"type": "object", "properties": {"pin": {"type": "string", "minLength": 4,
                                                                     "maxLength": 4}}, "required": ["pin"]},
    "string_pattern_digits": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                              "required": ["zip"], "additionalProperties": False},
    "string_pattern_unanchored_end": {"type": "object", "properties": {"tag": {"type": "string",
                                                                             "pattern": "^[a-z]+-[0-9]+"}},
                                  "required": ["tag"]},
    "string_pattern_identifier": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,15}$"}}, "required": ["name"]},
    "format_date": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"], "additionalProperties": False},
    "format_date_time": {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
                         "required": ["at"]},
    "format_email": {"type": "object", "properties": {"to": {"type": "string", "format": "email"}},
                     "required": ["to"]},
    "format_uuid": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    "format_ipv4": {"type": "object", "properties": {"host": {"type": "string", "format": "ipv4"}},
                    "required": ["host"]},
    "format_time": {"type": "object", "properties": {"t": {"type": "string", "format": "time"}}, "required": ["t"]},
    # ---- enums and const ---------------------------------------------------------------------------
    "enum_strings": {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                     "required": ["color"], "additionalProperties": False},
    "enum_mixed": {"type": "object", "properties": {"v": {"enum": [1, "one", None, True, 2.5]}}, "required": ["v"]},
    "enum_with_quotes": {"type": "object", "properties": {"s": {"enum": ["say \"hi\"", "back\\slash", "tab\there"]}},
                         "required": ["s"]},
    "enum_unicode": {"type": "object", "properties": {"city": {"enum": ["Zürich", "東京", "São Paulo"]}},
                     "required": ["city"]},
    "const_string": {"type": "object", "properties": {"version": {"const": "v2"}, "q": _STR},
                     "required": ["version", "q"], "additionalProperties": False},
    "const_object": {"type": "object", "properties": {"cfg": {"const": {"a": 1, "b": [True, None]}}},
                     "required": ["cfg"]},
    "enum_integers": {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3, 5, 8]}},
                      "required": ["level"]},
    # ---- arrays ------------------------------------------------------------------------------------
    "array_of_strings": {"type": "object", "properties": {"tags": {"type": "array", "items": _STR}},
                         "required": ["tags"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"ids": {"type": "array", "items": _INT, "minItems": 2,
                                                              "maxItems": 4}}, "required": ["ids"]},
    "array_nonempty_enums": {"type": "object", "properties": {
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "minItems": 1}}, "required": ["days"]},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"]},
    "tuple_prefix_items": {"type": "object", "properties": {"point": {
        "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": False}},
        "required": ["point"]},
    "matrix": {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "number"}}}}, "required": ["rows"]},
    "array_any_items": {"type": "object", "properties": {"xs": {"type": "array", "maxItems": 3}}, "required": ["xs"]},
    # ---- nesting -----------------------------------------------------------------------------------
    "nested_object": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name"],
        "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    "deeply_nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "object", "properties": {"d": {"enum": ["x", "y"]}},
                                               "required": ["d"]}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"]},
    "search_request": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 1},
        "filters": {"type": "object", "properties": {
            "lang": {"enum": ["en", "de", "fr"]}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
            "additionalProperties": False},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50}}, "required": ["query"], "additionalProperties": False},
    # ---- $defs and $ref ----------------------------------------------------------------------------
    "defs_ref": {"$defs": {"money": {"type": "object", "properties": {
        "amount": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD"]}},
        "required": ["amount", "currency"], "additionalProperties": False}},
        "type": "object", "properties": {"price": {"$ref": "#/$defs/money"}, "fee": {"$ref": "#/$defs/money"}},
        "required": ["price"]},
    "definitions_ref": {"definitions": {"id": {"type": "string", "pattern": "^[a-f0-9]{8}$"}},
                        "type": "object", "properties": {"ids": {"type": "array", "maxItems": 2,
                                                                  "items": {"$ref": "#/definitions/id"}}},
                        "required": ["ids"]},
    "recursive_tree": {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 8},
        "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
        "required": ["label"], "additionalProperties": False}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]},
    "root_ref": {"$ref": "#/$defs/args", "$defs": {"args": {"type": "object", "properties": {"k": _INT},
                                                            "required": ["k"], "additionalProperties": False}}},
    # ---- anyOf / oneOf / allOf ---------------------------------------------------------------------
    "anyof_scalar": {"type": "object", "properties": {"v": {"anyOf": [_STR, _INT]}}, "required": ["v"]},
    "anyof_objects": {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"}, "h": {"type": "number"}},
         "required": ["kind", "w", "h"], "additionalProperties": False}]}}, "required": ["shape"]},
    "oneof_disjoint_types": {"type": "object", "properties": {"id": {"oneOf": [_STR, _INT]}}, "required": ["id"]},
    "oneof_tagged": {"type": "object", "properties": {"event": {"oneOf": [
        {"type": "object", "properties": {"type": {"const": "click"}, "x": _INT}, "required": ["type", "x"],
         "additionalProperties": False},
        {"type": "object", "properties": {"type": {"const": "key"}, "key": {"type": "string", "maxLength": 1,
                                                                            "minLength": 1}},
         "required": ["type", "key"], "additionalProperties": False}]}}, "required": ["event"]},
    "allof_merge": {"type": "object", "allOf": [
        {"properties": {"a": _STR}, "required": ["a"]},
        {"properties": {"b": _INT}, "required": ["b"]}]},
    "nullable_anyof": {"type": "object", "properties": {"when": {"anyOf": [{"type": "string", "format": "date"},
                                                                          {"type": "null"}]}},
                       "required": ["when"], "additionalProperties": False},
    # ---- property names ----------------------------------------------------------------------------
    "unicode_property_names": {"type": "object", "properties": {"город": _STR, "数量": _INT, "ñandú": {"type": "boolean"}},
                               "required": ["город", "数量"], "additionalProperties": False},
    "escaped_property_names": {"type": "object", "properties": {
        "with \"quote\"": _STR, "back\\slash": _INT, "new\nline": {"type": "boolean"}, "tab\tkey": {"type": "null"}},
        "required": ["with \"quote\"", "back\\slash", "new\nline"], "additionalProperties": False},
    "odd_property_names": {"type": "object", "properties": {
        "": _STR, " ": _INT, "$ref-like": _STR, "a.b.c": _STR, "1st": _INT, "<b>": _STR, "[x]": _INT,
        "<|not_a_marker|>": _STR},
        "required": ["", "$ref-like", "a.b.c"], "additionalProperties": False},
    "pattern_properties": {"type": "object", "patternProperties": {"^x-[a-z]+$": _STR}, "additionalProperties": False},
    # ---- descriptions and other annotations are ignored ---------------------------------------------
    "annotated": {"type": "object", "title": "Args", "description": "Arguments.", "properties": {
        "path": {"type": "string", "description": "A file path.", "examples": ["/tmp/x"], "default": "/tmp"}},
        "required": ["path"], "$schema": "https://json-schema.org/draft/2020-12/schema"},
    "bounded_map": {"type": "object", "additionalProperties": _INT, "maxProperties": 3},
}
