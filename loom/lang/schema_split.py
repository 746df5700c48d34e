"""Split a JSON schema into the literal text its fixed structure forces and the free parts
the model generates, so `gen(json_schema=...)` can send the literal text as prompt text.

Unrolled (fixed): an object whose declared properties are all required and that allows no
other keys, written in declared order (loom's grammar: xgrammar strict mode, any_order off);
`const`, a one-value `enum`, `{"type": "null"}`; property values recursively, through local
`$ref`s into `$defs` / `definitions`. Other values are free parts: a plain string or number,
a boolean or an enum as a regex; a non-fixed object or array as its sub-schema (with the
root's `$defs` / `definitions` when it uses a `$ref`). A value whose end the model cannot
mark (below) keeps its enclosing object free. A `$ref` that points anywhere else, a nested
`$id`, or a schema that is not valid JSON Schema: no split at all.

Formatting: `json.dumps`'s default separators, the spelling models write unconstrained:
`{"name": "Ada", "age": 36, "tags":["x"]}`. The space after a colon belongs to the free part
that follows: a regex part starts with it (` "`, ` 3`, ` true` are the model's own tokens),
and a sub-schema part goes without it (its grammar cannot start with whitespace).

Token boundaries, measured with SmolLM2-135M and Qwen2.5-Coder-0.5B (the probability the
model puts on first tokens the free part allows):
- A literal never ends in whitespace: after `"name": ` both models read the lone space token
  as the start of a number (< 0.1% on the start of a string, boolean or object).
- A free part must end where the model wants to write the character after it, else the
  token it wants (`",`, `,`) is masked and it goes on inside the value: SmolLM2 wrote
  `"Ada Lovelace,"`, and after `36` both models prefer another digit to the end of the text
  by ~1e4. So regex parts include the character after the value (`,` or `}`), and the next
  literal starts past it. A sub-schema part (object, array, boolean, null, a non-numeric
  enum, or a union of those) ends on a character past which it cannot go on. A number with
  bounds, a string with a pattern or a format, or a union with one, could run on: it keeps
  its enclosing object free (at the root: no split).

On a backend that enforces JSON schemas (`response_format`) but not regexes, booleans and
enums that end by themselves go as sub-schema parts, so the server still enforces them;
plain strings and numbers stay regex parts (generated with stops, checked afterwards).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from loom.constrain.schema_types import ASSERTIONS, json_type, resolve, type_within

Schema = dict[str, Any]

_DEF_POINTERS = ("#/$defs/", "#/definitions/")
_DEF_KEYS = ("$defs", "definitions")
_CONSTRAINING = ASSERTIONS | {"format"}  # xgrammar enforces some formats
_FIXED_OBJECT_KEYS = {"type", "properties", "required", "additionalProperties"}
_STRING_BOUNDS = ("minLength", "maxLength")
_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_VALUE_REGEX = {
    "integer": r"-?(?:0|[1-9][0-9]*)",
    "number": r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?",
    "boolean": "(?:true|false)",
}
_REGEX_SPECIAL = frozenset("\\.^$*+?{}[]|()")
MAX_STRING_REPEAT = 1000  # a longer maxLength is no plain string (regex compile cost)


@dataclass(frozen=True)
class Literal:
    """Text the schema forces: appended as prompt text, never generated."""

    text: str


@dataclass(frozen=True)
class Free:
    """A part the model generates: a value of `schema`. With `regex`, the regex is generated
    instead: the separator space, the value, and the character after it (the literal after
    starts past it)."""

    schema: Schema | bool
    regex: str | None = None


Segment = Literal | Free


class _Unsplittable(Exception):
    """A value whose end the model cannot mark by itself: its enclosing object stays free."""


@lru_cache(maxsize=256)
def split_schema_text(schema_text: str, regex_enforced: bool = True) -> tuple[Segment, ...]:
    return split_schema(json.loads(schema_text), regex_enforced)


def split_schema(schema: Any, regex_enforced: bool = True) -> tuple[Segment, ...]:
    """The segments of `schema`, adjacent literals merged; `(Free(schema),)` when nothing is
    fixed or the schema cannot be split safely. Without `regex_enforced` (a backend that
    enforces JSON schemas but not regexes), only values a sub-schema part cannot end well
    (strings, numbers) are regex parts."""
    whole: tuple[Segment, ...] = (Free(schema),)
    if not isinstance(schema, dict) or not _splittable(schema):
        return whole
    try:
        segments, _ = _Splitter(schema, regex_enforced).value(schema, end=None)
    except _Unsplittable:
        return whole
    return _merged(segments)


class _Splitter:
    def __init__(self, root: Schema, regex_enforced: bool):
        self.root = root
        self.regex_enforced = regex_enforced
        self.defs = {k: root[k] for k in _DEF_KEYS if k in root}
        self.carried = {k: root[k] for k in ("$schema",) if k in root}
        self.unrolling: list[str | None] = []  # refs being unrolled: a cycle stays free

    def value(self, node: Any, end: str | None) -> tuple[list[Segment], bool]:
        """Segments of the value at `node` (after a colon), and whether they include `end`,
        the character after the value in its object (None: the value is the root)."""
        target, ref = self._deref(node)
        space = "" if end is None else " "
        fixed = _single_value(target)
        if fixed is not None:
            return [Literal(space + _dump(fixed[0]))], False
        if _fixed_object(target) and (ref is None or ref not in self.unrolling):
            try:
                return [Literal(space), *self._object(target, ref)], False
            except _Unsplittable:
                if end is None:
                    raise
        free = self._carry(target)
        if end is None:
            return [Free(free)], False
        ends_by_itself = _ends_by_itself(target, self.root)
        regex = _value_regex(target)
        if regex is not None and (self.regex_enforced or not ends_by_itself):
            return [Free(free, " " + regex + _regex_literal(end))], True
        if ends_by_itself:
            return [Free(free)], False
        raise _Unsplittable

    def _object(self, target: Schema, ref: str | None) -> list[Segment]:
        self.unrolling.append(ref)
        try:
            out: list[Segment] = [Literal("{")]
            names = list(target["properties"])
            for i, name in enumerate(names):
                end = "," if i + 1 < len(names) else "}"
                out.append(Literal((" " if i else "") + _dump(name) + ":"))
                segments, took_end = self.value(target["properties"][name], end)
                out += segments if took_end else [*segments, Literal(end)]
            return out
        finally:
            self.unrolling.pop()

    def _deref(self, node: Any) -> tuple[Any, str | None]:
        """Follow a plain `$ref` (one with no sibling assertions) to its target."""
        ref = None
        for _ in range(32):
            if not isinstance(node, dict) or set(node) & _CONSTRAINING != {"$ref"}:
                return node, ref
            ref = node["$ref"]
            node = resolve(self.root, ref)
        raise _Unsplittable  # a chain of refs that only point at refs

    def _carry(self, sub: Any) -> Any:
        """The sub-schema made self-contained: the root's definitions (when it uses a $ref)
        and `$schema` (its draft) go with it."""
        if not isinstance(sub, dict):
            return sub
        defs = self.defs if _uses_ref(sub) else {}
        return {**sub, **defs, **self.carried} if defs or self.carried else sub


def _splittable(root: Schema) -> bool:
    """Valid JSON Schema whose every `$ref` is a resolvable pointer into the definitions."""
    try:
        validator_for(root, default=jsonschema.Draft202012Validator).check_schema(root)
    except jsonschema.SchemaError:
        return False
    return all(_local_def(root, node, depth > 0) for node, depth in _schema_objects(root))


def _local_def(root: Schema, node: Schema, nested: bool) -> bool:
    if (nested and "$id" in node) or "$dynamicRef" in node or "$recursiveRef" in node:
        return False
    ref = node.get("$ref")
    if ref is None:
        return True
    return isinstance(ref, str) and ref.startswith(_DEF_POINTERS) and resolve(root, ref) is not None


def _schema_objects(node: Any, depth: int = 0):
    """Every dict inside `node` (schemas, and to be safe any data inside const / enum)."""
    if isinstance(node, dict):
        yield node, depth
        for value in node.values():
            yield from _schema_objects(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            yield from _schema_objects(item, depth + 1)


def _uses_ref(sub: Schema) -> bool:
    return any("$ref" in node for node, _ in _schema_objects(sub))


def _single_value(node: Any) -> tuple[Any] | None:
    """(value,) for a const, a one-value enum or the null type; else None."""
    values = _listed_values(node)
    if values is not None and len(values) == 1:
        return (values[0],)
    if isinstance(node, dict) and node.get("type") == "null" and _assertions(node) == {"type"}:
        return (None,)
    return None


def _listed_values(node: Any) -> list[Any] | None:
    """The values of a const / enum with no other assertion than a `type` they all match."""
    if not isinstance(node, dict):
        return None
    if "const" in node:
        values, kw = [node["const"]], "const"
    elif isinstance(node.get("enum"), list) and node["enum"]:
        values, kw = node["enum"], "enum"
    else:
        return None
    declared = node.get("type", [json_type(v) for v in values])
    types = {declared} if isinstance(declared, str) else set(declared)
    matching = all(type_within(json_type(v), types) for v in values)
    return values if matching and _assertions(node) <= {kw, "type"} else None


def _assertions(node: Schema) -> set[str]:
    return set(node) & _CONSTRAINING


def _fixed_object(node: Any) -> bool:
    if not isinstance(node, dict) or node.get("type", "object") != "object":
        return False
    props, required = node.get("properties"), node.get("required")
    return (
        isinstance(props, dict)
        and bool(props)
        and isinstance(required, list)
        and set(required) == set(props)
        and node.get("additionalProperties", False) is False
        and not (set(node) & _CONSTRAINING) - _FIXED_OBJECT_KEYS
    )


def _value_regex(node: Any) -> str | None:
    """A regex for exactly the values of `node`, for a plain string (at most length bounds),
    a number with no bounds, a boolean and an enum; else None."""
    values = _listed_values(node)
    if values is not None:
        return "(?:" + "|".join(_regex_literal(_dump(v)) for v in values) + ")"
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        return None
    kind = node["type"]
    if kind == "string" and not _assertions(node) - {"type", *_STRING_BOUNDS}:
        return _string_regex(node)
    if kind in _VALUE_REGEX and _assertions(node) == {"type"}:
        return _VALUE_REGEX[kind]
    return None


def _string_regex(node: Schema) -> str | None:
    """A JSON string of min/maxLength characters (an escape counts as one, as in JSON
    Schema)."""
    low = int(node.get("minLength", 0))
    high = int(node.get("maxLength", max(low, MAX_STRING_REPEAT)))
    if not low <= high <= MAX_STRING_REPEAT:
        return None
    repeat = f"{{{low},{high}}}" if "maxLength" in node else ("*" if low == 0 else f"{{{low},}}")
    return '"' + _STRING_CHAR + repeat + '"'


def _regex_literal(text: str) -> str:
    """`text` as a regex; only regex syntax is escaped (xgrammar warns on other escapes)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _ends_by_itself(node: Any, root: Schema) -> bool:
    """Whether every value of `node` ends on a character past which it cannot go on: no
    numbers, and strings only from a const / enum."""
    types = _value_types(node, root, 0)
    if types is None or types & {"integer", "number"}:
        return False
    return "string" not in types or _listed_values(node) is not None


def _value_types(node: Any, root: Schema, depth: int) -> set[str] | None:
    """The JSON types `node` admits (None: unknown, or any)."""
    if depth > 32:
        return None
    if isinstance(node, dict) and isinstance(node.get("$ref"), str):
        return _value_types(resolve(root, node["$ref"]), root, depth + 1)
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return {json_type(node["const"])}
    if isinstance(node.get("enum"), list):
        return {json_type(v) for v in node["enum"]}
    declared = node.get("type")
    if isinstance(declared, (str, list)):
        return {declared} if isinstance(declared, str) else set(declared)
    if {"properties", "required", "additionalProperties"} & set(node):
        return {"object"}  # xgrammar infers the type (so the output is one)
    if {"items", "prefixItems"} & set(node):
        return {"array"}
    for kw in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(kw), list) and node[kw]:
            branches = [_value_types(b, root, depth + 1) for b in node[kw]]
            if kw == "allOf":
                known = [b for b in branches if b is not None]
                return set.intersection(*known) if known else None
            return None if any(b is None for b in branches) else set().union(*branches)
    return None


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Literal) and not seg.text:
            continue
        if isinstance(seg, Literal) and out and isinstance(out[-1], Literal):
            out[-1] = Literal(out[-1].text + seg.text)
        else:
            out.append(seg)
    return tuple(out)
