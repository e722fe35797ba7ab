"""A small JSON Schema validator for the ``json`` reward (no dependency): the keywords structured outputs use.

Supported: ``type`` (a name or a list of names), ``enum``, ``const``, ``properties``, ``required``,
``additionalProperties`` (a boolean or a schema), ``items``, ``minItems`` / ``maxItems``, ``minLength`` /
``maxLength``, ``pattern``, ``minimum`` / ``maximum``. A schema using any other keyword is refused
(:func:`schema_errors`), so nothing is silently left unchecked. As in JSON Schema, a boolean is not a number,
an integer is a number with no fraction, and ``pattern`` searches (it is not anchored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer(),
}
KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "title",
        "description",
        "$schema",
    }
)


def schema_errors(schema: Any, where: str = "#") -> list[str]:
    """What is wrong with ``schema`` itself (an empty list: it can be used), each naming the path inside it."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, Mapping):
        return [f"{where} must be an object or a boolean, not {type(schema).__name__}"]
    problems = [f"{where} uses '{key}', which this validator does not check" for key in schema if key not in KEYWORDS]
    types = schema.get("type", [])
    for name in [types] if isinstance(types, str) else types:
        if name not in TYPES:
            problems.append(f"{where}: type '{name}' is not a JSON Schema type ({', '.join(TYPES)})")
    for name, sub in (schema.get("properties") or {}).items():
        problems += schema_errors(sub, f"{where}/properties/{name}")
    for key in ("items", "additionalProperties"):
        if key in schema:
            problems += schema_errors(schema[key], f"{where}/{key}")
    return problems


def validates(value: Any, schema: Any) -> bool:
    """Whether ``value`` (parsed JSON) is valid against ``schema`` (one :func:`schema_errors` accepts)."""
    if isinstance(schema, bool):
        return schema
    types = schema.get("type")
    if types is not None and not any(TYPES[t](value) for t in ([types] if isinstance(types, str) else types)):
        return False
    if "enum" in schema and not any(same_json(value, option) for option in schema["enum"]):
        return False
    if "const" in schema and not same_json(value, schema["const"]):
        return False
    if isinstance(value, dict):
        return object_validates(value, schema)
    if isinstance(value, list):
        items = schema.get("items", True)
        return schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)) and all(
            validates(item, items) for item in value
        )
    if isinstance(value, str):
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)) and (
            "pattern" not in schema or re.search(schema["pattern"], value) is not None
        )
    if TYPES["number"](value):
        return schema.get("minimum", value) <= value <= schema.get("maximum", value)
    return True


def object_validates(value: dict, schema: Mapping[str, Any]) -> bool:
    properties = schema.get("properties") or {}
    if any(key not in value for key in schema.get("required", [])):
        return False
    extra = schema.get("additionalProperties", True)
    return all(validates(item, properties.get(key, extra)) for key, item in value.items())


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
