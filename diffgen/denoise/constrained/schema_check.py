"""The subset of JSON Schema that ``--schema`` lays out, checked before anything is tokenised.

Parsing (:func:`load_schema`), the one-line refusal of anything outside the subset
(:func:`check_schema`), and the facts about a node that the layout reads too (its kind, an
integer's or number's bounds, a bound's digit count). What the subset means on the canvas is
:mod:`diffgen.denoise.constrained.schema`'s docstring.
"""

from __future__ import annotations

import json
import math
from typing import Any

from diffgen.errors import UsageError

#: Positions of a string slot without ``maxLength`` (and the most any string slot gets).
DEFAULT_STRING = 16
MAX_STRING = 256
#: Positions of an integer / number slot without both bounds.
DEFAULT_INTEGER = 8
DEFAULT_NUMBER = 10
#: Most items an array may lay out.
MAX_ITEMS = 64
#: Most nesting a schema may have (objects and arrays inside each other), and most positions its
#: skeleton may take (an estimate from the schema, checked before anything is laid out).
MAX_DEPTH = 32
MAX_POSITIONS = 8192
#: A slot whose mean entropy (nats) ends above this is resampled by a retry.

_COMMON = {"type", "title", "description", "$schema", "$id", "$comment", "examples"}
_ALLOWED = {
    "object": _COMMON | {"properties", "required", "additionalProperties"},
    "string": _COMMON | {"maxLength", "enum"},
    "integer": _COMMON | {"minimum", "maximum"},
    "number": _COMMON | {"minimum", "maximum"},
    "boolean": _COMMON,
    "null": _COMMON,
    "array": _COMMON | {"items", "minItems", "maxItems"},
    "enum": _COMMON | {"enum"},
}
_HINT = ("supported: objects (all properties required, additionalProperties false), strings (maxLength, enum), "
         "integers and numbers (minimum, maximum), booleans, null, arrays (items with minItems/maxItems)")



def load_schema(text: str, name: str = "the schema") -> dict:
    """Parse and check a schema file's text; anything outside the subset is one :class:`UsageError`."""
    def no_constant(word: str) -> Any:
        raise ValueError(f"{word} is not a JSON number")

    try:
        schema = json.loads(text, parse_constant=no_constant)
    except RecursionError as exc:
        raise UsageError(f"{name} nests deeper than {MAX_DEPTH} levels", _HINT) from exc
    except ValueError as exc:
        raise UsageError(f"{name} is not JSON: {exc}", "give a JSON Schema file") from exc
    check_schema(schema, name)
    return schema


def check_schema(schema: Any, name: str = "the schema", what: str = "--schema") -> None:
    """Raise :class:`UsageError` (one line) unless ``schema`` is a valid schema inside the subset;
    ``name`` names the schema in the message, ``what`` the feature that refuses it."""
    import jsonschema

    if not isinstance(schema, dict):
        raise UsageError(f"{name} must be a JSON object", _HINT)
    # Depth first, without recursion: everything after this (the metaschema check, the walk, the
    # layout) recurses, and a schema nested hundreds deep must be one line, not a RecursionError.
    depth = _depth(schema)
    if depth > MAX_DEPTH:
        raise UsageError(f"{name} nests more than the {MAX_DEPTH} levels {what} lays out", _HINT)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.path)
        raise UsageError(f"{name} is not a valid JSON Schema at {where}: {exc.message}".replace("\n", " "),
                         _HINT) from exc
    problems: list[str] = []
    _walk(schema, "", problems)
    if problems:
        raise UsageError(f"{name} uses what {what} does not support: {'; '.join(problems)}", _HINT)
    # Every bound is consistent (checked in the walk), so the skeleton can be sized: refuse one too
    # large to lay out before anything is tokenised.
    positions = _positions(schema)
    if positions > MAX_POSITIONS:
        raise UsageError(f"{name} lays out about {positions:,} positions, more than the {MAX_POSITIONS:,} {what} "
                         "allows", "use fewer or shorter values (maxItems, maxLength, narrower bounds)")


def _depth(root: Any) -> int:
    """How deep ``root``'s objects and arrays nest (iteratively: any depth is safe)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack += [(child, level + 1) for child in children if isinstance(child, (dict, list))]
    return deepest


def bad_number(value: Any) -> bool:
    """Whether a bound is not a finite JSON number (booleans included)."""
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def bounds(node: dict, kind: str) -> tuple[float | None, float | None]:
    """An integer's or number's effective bounds (an integer's rounded inward)."""
    low, high = node.get("minimum"), node.get("maximum")
    if kind == "integer":
        low = math.ceil(low) if low is not None else None
        high = math.floor(high) if high is not None else None
    return low, high


def _positions(node: dict) -> int:
    """About how many canvas positions ``node`` lays out (a bound for refusing huge schemas)."""
    kind = kind_of(node)
    if "enum" in node:
        return max((len(json.dumps(v, ensure_ascii=False)) for v in node["enum"]), default=1)
    if kind == "object":
        return 2 + sum(len(key) + 4 + _positions(child) for key, child in node.get("properties", {}).items())
    if kind == "array":
        count = int(node.get("maxItems", node.get("minItems", 0)))
        return 2 + count * (2 + _positions(node["items"])) if count else 2
    if kind == "string":
        return 2 + min(int(node.get("maxLength", DEFAULT_STRING)), DEFAULT_STRING * 4)
    if kind in ("integer", "number"):
        low, high = bounds(node, kind)
        return max(digits(low), digits(high), DEFAULT_NUMBER) + 4
    return 5


def kind_of(node: dict) -> str | None:
    """A node's kind: its ``type``, ``"enum"`` for an untyped enum, ``None`` otherwise (a type list, nothing)."""
    kind = node.get("type")
    if isinstance(kind, str):
        return kind
    if kind is None and "enum" in node:
        return "enum"
    return None


def digits(bound: float | None) -> int:
    """Digits of a bound's integer part (0 for no bound)."""
    return len(str(abs(int(bound)))) if bound is not None else 0


def _walk(node: Any, path: str, problems: list[str]) -> None:
    """Append to ``problems`` what ``node`` (at JSON pointer ``path``) and its children use outside the subset."""
    where = path or "/"
    if not isinstance(node, dict):
        problems.append(f"a boolean schema at {where}")
        return
    kind = kind_of(node)
    if kind is None:
        if isinstance(node.get("type"), list):
            problems.append(f"a type list at {where}")
        else:
            named = sorted(set(node) - _COMMON)
            problems.append(f"{', '.join(named) or 'a schema with no type'} at {where}")
        return
    extra = sorted(set(node) - _ALLOWED.get(kind, set()))
    if extra:
        problems.append(f"{', '.join(extra)} at {where}")
    if "enum" in node:
        _check_enum(node["enum"], where, problems)
    if kind in ("integer", "number"):
        _check_bounds(node, kind, where, problems)
    if kind == "object":
        _check_object(node, path, problems)
    elif kind == "array":
        _check_array(node, path, problems)
    elif kind == "string" and node.get("maxLength", 1) > MAX_STRING:
        problems.append(f"maxLength above {MAX_STRING} at {where}")


def _check_enum(values: Any, where: str, problems: list[str]) -> None:
    if not isinstance(values, list) or not values:
        problems.append(f"an empty enum at {where} (no value can match it)")
    elif any(isinstance(v, (dict, list)) for v in values):
        problems.append(f"an enum of objects or arrays at {where}")
    elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
        problems.append(f"an enum with a value that is not a JSON number at {where}")


def _check_bounds(node: dict, kind: str, where: str, problems: list[str]) -> None:
    named = {key: node[key] for key in ("minimum", "maximum") if key in node}
    bad = [key for key, value in named.items() if bad_number(value)]
    if bad:
        problems.append(f"{' and '.join(bad)} not a finite number at {where}")
        return
    low, high = bounds(node, kind)
    if low is not None and high is not None and low > high:
        what = "no integer lies between" if kind == "integer" and node["minimum"] <= node["maximum"] else ""
        problems.append(f"minimum {node['minimum']} above maximum {node['maximum']} at {where}" if not what
                        else f"{what} minimum {node['minimum']} and maximum {node['maximum']} at {where}")


def _check_object(node: dict, path: str, problems: list[str]) -> None:
    where = path or "/"
    properties = node.get("properties", {})
    required = node.get("required", [])
    optional = [key for key in properties if key not in required]
    if optional:
        problems.append(f"optional properties ({', '.join(optional)}) at {where}")
    unknown = [key for key in required if key not in properties]
    if unknown:
        problems.append(f"required properties with no schema ({', '.join(unknown)}) at {where}")
    if node.get("additionalProperties", False) is not False:
        problems.append(f"additionalProperties other than false at {where}")
    for key, child in properties.items():
        _walk(child, f"{path}/{key}", problems)


def _check_array(node: dict, path: str, problems: list[str]) -> None:
    where = path or "/"
    if "items" not in node:
        problems.append(f"an array without items at {where}")
    elif not isinstance(node["items"], dict):
        problems.append(f"items that is not one schema at {where}")
    else:
        _walk(node["items"], f"{path}/0", problems)
    count = node.get("maxItems", node.get("minItems"))
    if "minItems" in node and "maxItems" in node and node["minItems"] > node["maxItems"]:
        problems.append(f"minItems {node['minItems']} above maxItems {node['maxItems']} at {where}")
    if count is None:
        problems.append(f"an array without maxItems at {where}")
    elif count > MAX_ITEMS:
        problems.append(f"more than {MAX_ITEMS} items at {where}")
