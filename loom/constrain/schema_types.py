"""What values a JSON subschema admits: its possible types, its literal values, whether
two branches can overlap, and local `$ref` resolution. The honesty check
(loom.constrain.schema_check) uses these to tell provable cases from ones xgrammar would
silently get wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

Schema = dict[str, Any]

IGNORED_EVERYWHERE = (
    "not", "if", "dependentRequired", "dependentSchemas", "dependencies", "contains",
    "minContains", "maxContains", "multipleOf", "patternProperties", "propertyNames",
    "unevaluatedProperties", "unevaluatedItems", "additionalItems", "$dynamicRef",
    "$recursiveRef",
)  # fmt: skip

# Assertions that only apply to one instance type; xgrammar drops them when the schema
# names no "type". (properties / items / additionalProperties make xgrammar infer the
# type, which only narrows the output.)
NEEDS_TYPE = (
    "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minItems", "maxItems", "minProperties", "maxProperties",
)  # fmt: skip

# Keywords that constrain an instance; anything else (title, description, default,
# format, $defs, vendor extensions) is an annotation a validator also ignores.
ASSERTIONS = frozenset(
    IGNORED_EVERYWHERE + NEEDS_TYPE + (
        "type", "enum", "const", "uniqueItems", "required", "properties",
        "additionalProperties", "items", "prefixItems", "allOf", "anyOf", "oneOf",
        "then", "else", "$ref",
    )
)  # fmt: skip


# Where a schema object holds subschemas: one, a list of them, a map of names to them.
SCHEMA_VALUED = (
    "items", "additionalProperties", "contains", "propertyNames", "not", "if", "then",
    "else", "unevaluatedItems", "unevaluatedProperties", "additionalItems",
)  # fmt: skip
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")


def subschemas(
    node: Schema, path: str, maps: tuple[str, ...] = SCHEMA_MAPS
) -> Iterator[tuple[str, Any, Any]]:
    """(JSON pointer, container, key) of each schema object directly inside `node` (not
    $ref targets): container[key] is the subschema, so a caller may also replace it."""
    for key in SCHEMA_VALUED:
        if isinstance(node.get(key), dict):
            yield f"{path}/{key}", node, key
    for key in SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                if isinstance(child, dict):
                    yield f"{path}/{key}/{i}", node[key], i
    for key in maps:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                if isinstance(child, dict):
                    yield f"{path}/{key}/{pointer_token(name)}", node[key], name


def pointer_token(name: str) -> str:
    """A property name as one JSON pointer token."""
    return name.replace("~", "~0").replace("/", "~1")


def pairwise_disjoint(branches: list[Any], root: Schema) -> bool:
    return all(disjoint(a, b, root) for i, a in enumerate(branches) for b in branches[i + 1 :])


def disjoint(a: Any, b: Any, root: Schema) -> bool:
    """True only when no JSON value can match both branches (a sufficient test): their
    types differ, or both are objects whose shared required key has disjoint literals
    (a discriminated union)."""
    a, b = deref(a, root), deref(b, root)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    ta, tb = types_of(a, root), types_of(b, root)
    if ta is not None and tb is not None and not types_overlap(ta, tb):
        return True
    if ta != {"object"} or tb != {"object"}:
        return False
    common = set(a.get("required") or []) & set(b.get("required") or [])
    props_a, props_b = a.get("properties") or {}, b.get("properties") or {}
    for name in common:
        va = literal_values(deref(props_a.get(name), root))
        vb = literal_values(deref(props_b.get(name), root))
        if (
            va is not None
            and vb is not None
            and not set(map(canonical, va)) & set(map(canonical, vb))
        ):
            return True
    return False


def types_of(sub: Any, root: Schema) -> set[str] | None:
    """The instance types a schema can produce, or None when unconstrained / unknown."""
    sub = deref(sub, root)
    if not isinstance(sub, dict):
        return None
    declared = sub.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return set(declared)
    values = literal_values(sub)
    return None if values is None else {json_type(v) for v in values}


def literal_values(sub: Any) -> list[Any] | None:
    if not isinstance(sub, dict):
        return None
    if "const" in sub:
        return [sub["const"]]
    return sub["enum"] if isinstance(sub.get("enum"), list) else None


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if float(value).is_integer() else "number"
    return {type(None): "null", str: "string", list: "array", dict: "object"}[type(value)]


def canonical(value: Any) -> str:
    """Equal JSON values give equal strings: 1 and 1.0 do, true and 1 do not."""

    def normalize(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [normalize(x) for x in v]
        return {k: normalize(x) for k, x in v.items()} if isinstance(v, dict) else v

    return json.dumps(normalize(value), sort_keys=True)


def types_overlap(a: set[str], b: set[str]) -> bool:
    return any(type_within(x, b) or type_within(y, a) for x in a for y in b)


def type_within(t: str, allowed: set[str]) -> bool:
    return t in allowed or (t == "integer" and "number" in allowed)


def deref(sub: Any, root: Schema) -> Any:
    """Follow a chain of plain local $refs (a bounded number, refs may loop)."""
    for _ in range(32):
        if not isinstance(sub, dict) or set(sub) & ASSERTIONS != {"$ref"}:
            return sub
        ref = sub["$ref"]
        if not isinstance(ref, str) or not is_local_pointer(ref):
            return sub
        sub = resolve(root, ref)
    return sub


def is_local_pointer(ref: str) -> bool:
    return ref == "#" or ref.startswith("#/")


def resolve(root: Schema, ref: str) -> Any:
    node: Any = root
    for token in ref[2:].split("/") if ref != "#" else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node
