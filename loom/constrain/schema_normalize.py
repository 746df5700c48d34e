"""Rewrites that keep a JSON schema's meaning and let more schemas compile exactly.

Each rewrite accepts exactly the instances the original accepts (with `jsonschema` as
the judge), so the honesty checks and the grammar backends see the rewritten schema:
- custom formats (not in the JSON Schema spec, e.g. "int32") are annotations every
  validator ignores: dropped;
- `date`, `date-time` and `time` become their exact patterns (formats.py);
- a schema object whose values are listed (`enum` / `const`, itself or in an `allOf`
  branch) admits only those of the listed values that pass the whole object: it becomes
  the `enum` of exactly those, whatever else it says (`not`, `if`, `patternProperties`...);
- `oneOf` whose branches no value can match twice is `anyOf` (branches that only
  constrain strings are told apart by the first characters they allow, each then
  required to be a string: any other value matches every branch); `oneOf` whose branches
  only list required keys is the `anyOf` of "this branch's keys, and for every other
  branch one of its keys absent" (objects only: any other value matches every branch);
- `dependencies` / `dependentRequired` / `dependentSchemas` become, for each key, "the key
  is absent, or the key and its dependencies are present (its schema holds)", where the
  schema's draft defines them (`dependencies` up to draft 7, the others from 2019-09 on);
  where it does not, they are unknown keywords the validator ignores, and are dropped;
- `if` / `then` / `else` on an object whose `if` tests one property against values, where
  the object lists that property's possible values (a boolean, an enum), is the `anyOf`
  of "the tested values, and then" and "the other values, and else".
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from re import _constants as re_constants  # type: ignore[attr-defined]
from re import _parser as re_parser  # type: ignore[attr-defined]
from typing import Any
from urllib.parse import quote

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.validators import validator_for
from referencing.jsonschema import DRAFT202012

from loom.constrain.formats import exact_pattern, grammar_pattern
from loom.constrain.schema_types import (
    ASSERTIONS,
    SCHEMA_MAPS,
    is_local_pointer,
    pairwise_disjoint,
    subschemas,
)

Schema = dict[str, Any]

# The formats the JSON Schema specification defines; any other is an annotation.
SPEC_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname",
    "idn-hostname", "ipv4", "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid",
    "uri-template", "json-pointer", "relative-json-pointer", "regex",
})  # fmt: skip
_ROOT_URI = "urn:loom:normalize"


def normalize(schema: Any, expand: bool = True) -> Any:
    """The schema, rewritten (a copy; the argument is left as it is). `expand`: also the
    rewrites into anyOf / allOf (oneOf of required keys, dependencies), for backends that
    intersect schemas (llguidance; xgrammar would refuse the result)."""
    if not isinstance(schema, dict):
        return schema
    schema = copy.deepcopy(schema)
    _formats(schema, exact_pattern)
    _fold_literals(schema, schema, "")
    _disjoint_one_of(schema, schema)
    if expand:
        known = validator_for(schema, default=jsonschema.Draft202012Validator).VALIDATORS
        _expand_dependencies(schema, known)
        _required_only_one_of(schema)
        _value_switch(schema)
    return schema


def for_grammar(schema: Any, expand: bool = True) -> Any:
    """What a grammar compiles: normalize(schema), then each `format` a grammar writes
    narrower than jsonschema checks it (formats.GRAMMAR_PATTERNS: email) replaced by that
    pattern. Not a meaning-keeping rewrite: the grammar's instances are a subset."""
    schema = normalize(schema, expand)
    if isinstance(schema, dict):
        _formats(schema, grammar_pattern)
    return schema


# normalize rewrites every subschema, reachable or not, and draft-7 dependencies' too
_ALL_MAPS = SCHEMA_MAPS + ("dependencies", "$defs", "definitions")


def _children(node: Schema, path: str):
    return subschemas(node, path, _ALL_MAPS)


def _formats(node: Schema, pattern_of: Callable[[Schema], str | None]) -> None:
    """Custom formats dropped; each format `pattern_of` writes as a pattern (formats.py:
    exact_pattern, grammar_pattern) replaced by it."""
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SPEC_FORMATS:
        del node["format"]
    pattern = pattern_of(node)
    if pattern is not None:
        del node["format"]
        node["pattern"] = pattern
    for _, container, key in _children(node, ""):
        _formats(container[key], pattern_of)


def _listed_values(node: Schema) -> list | None:
    """The values a schema object lists for itself (enum / const, or an allOf branch's)."""
    if "const" in node:
        return [node["const"]]
    if isinstance(node.get("enum"), list):
        return node["enum"]
    for branch in node.get("allOf") or []:
        if isinstance(branch, dict) and "$ref" not in branch:
            values = _listed_values(branch)
            if values is not None:
                return values
    return None


def _fold_literals(node: Schema, root: Schema, path: str) -> None:
    values = _listed_values(node)
    if values is not None and (set(node) & ASSERTIONS) - {"enum", "const"}:
        kept = _passing(values, root, path)
        if kept is not None:
            literal = {"const": kept[0]} if "const" in node and kept else {"enum": kept}
            keep = {k: node[k] for k in node if k not in ASSERTIONS}  # $defs, $schema...
            node.clear()
            node.update(keep, **literal)
            return
    for child_path, container, key in _children(node, path):
        _fold_literals(container[key], root, child_path)


def _passing(values: list, root: Schema, path: str) -> list | None:
    """The values valid at `path` of root, or None when that cannot be decided here
    (a reference that does not resolve inside the schema)."""
    cls = validator_for(root, default=jsonschema.Draft202012Validator)
    resource = referencing.Resource.from_contents(root, default_specification=DRAFT202012)
    registry = referencing.Registry().with_resource(_ROOT_URI, resource)
    validator = cls(
        {"$ref": _ROOT_URI + "#" + quote(path, safe="/~$")},
        registry=registry,
        format_checker=cls.FORMAT_CHECKER,
    )
    try:
        return [v for v in values if validator.is_valid(v)]
    except (referencing.exceptions.Unresolvable, AttributeError, TypeError):
        return None


def _disjoint_one_of(node: Schema, root: Schema) -> None:
    branches = node.get("oneOf")
    if isinstance(branches, list) and "anyOf" not in node and _refs_local(branches):
        if pairwise_disjoint(branches, root):
            node["anyOf"] = node.pop("oneOf")
        elif len(branches) > 1 and _disjoint_strings(branches):
            node.pop("oneOf")
            node["anyOf"] = [{"type": "string", **branch} for branch in branches]
    for _, container, key in _children(node, ""):
        _disjoint_one_of(container[key], root)


def _refs_local(branches: list) -> bool:
    refs = [b.get("$ref") for b in branches if isinstance(b, dict) and "$ref" in b]
    return all(isinstance(r, str) and is_local_pointer(r) for r in refs)


def _absent(key: str) -> Schema:
    return {"properties": {key: False}}


def _expand_dependencies(node: Schema, known) -> None:
    for _, container, key in _children(node, ""):
        _expand_dependencies(container[key], known)
    clauses = []
    required = set(node.get("required") or [])
    for kw in ("dependencies", "dependentRequired", "dependentSchemas"):
        deps = node.get(kw)
        if not isinstance(deps, dict):
            continue
        if kw not in known:  # not a keyword of this schema's draft: an annotation
            del node[kw]
            continue
        for name, dep in deps.items():
            if isinstance(dep, list):
                then: Any = {"required": dep}
            elif dep is True or dep == {}:
                continue
            else:
                then = dep
            # present -> dependency holds; when the key is required it simply holds
            clauses.append(
                then
                if name in required
                else {"anyOf": [_absent(name), {"allOf": [{"required": [name]}, then]}]}
            )
        del node[kw]
    if clauses:
        node["allOf"] = list(node.get("allOf") or []) + clauses


_ANNOTATIONS = frozenset({"description", "title", "$comment"})


def _required_only_one_of(node: Schema) -> None:
    for _, container, key in _children(node, ""):
        _required_only_one_of(container[key])
    branches = node.get("oneOf")
    if not isinstance(branches, list) or "anyOf" in node or len(branches) < 2:
        return
    keys = []
    for branch in branches:
        if not isinstance(branch, dict) or set(branch) - _ANNOTATIONS != {"required"}:
            return
        if not isinstance(branch["required"], list):
            return
        keys.append(set(branch["required"]))
    options = []
    for i, own in enumerate(keys):
        others = [other - own for j, other in enumerate(keys) if j != i]
        if any(not extra for extra in others):
            continue  # another branch matches whenever this one does
        # every other branch misses one of its keys that this branch does not require
        absent = [{"anyOf": [_absent(k) for k in sorted(extra)]} for extra in others]
        options.append({"type": "object", "required": sorted(own), "allOf": absent})
    del node["oneOf"]
    node["anyOf"] = options or [False]  # no value matches exactly one branch


def _finite_values(schema: Any) -> list | None:
    """Every value a property schema admits, when it lists them (boolean, enum, const)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    if schema.get("type") == "boolean" and set(schema) - _ANNOTATIONS == {"type"}:
        return [True, False]
    return None


def _value_switch(node: Schema) -> None:
    for _, container, key in _children(node, ""):
        _value_switch(container[key])
    test = node.get("if")
    if not isinstance(test, dict) or node.get("type") != "object" or "anyOf" in node:
        return
    props = test.get("properties")
    if set(test) - _ANNOTATIONS - {"required"} != {"properties"} or not isinstance(props, dict):
        return
    if len(props) != 1 or test.get("required", []) not in ([], list(props)):
        return
    ((name, check),) = props.items()
    tested = _finite_values(check)
    possible = _finite_values((node.get("properties") or {}).get(name))
    if tested is None or possible is None or not all(_json_in(v, possible) for v in tested):
        return
    others = [v for v in possible if not _json_in(v, tested)]
    present = {"required": [name]}
    then, otherwise = node.pop("then", True), node.pop("else", True)
    del node["if"]
    # Without `required` in the test, an absent property passes it (then); with it, fails.
    yes: list[Any] = [{"properties": {name: {"enum": tested}}}, then]
    no: list[Any] = [{"properties": {name: {"enum": others}}}, otherwise]
    (no if "required" not in test else yes).append(present)
    node["anyOf"] = [{"allOf": yes}, {"allOf": no}]


def _json_in(value: Any, values: list) -> bool:
    return any(_json_eq(v, value) for v in values)


def _numbers(a: Any, b: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))


def _json_eq(a: Any, b: Any) -> bool:
    """JSON Schema equality of scalars: 1 == 1.0, but true is not 1."""
    if _numbers(a, b):
        return a == b
    return type(a) is type(b) and a == b


_STRING_KEYWORDS = frozenset({"format", "pattern", "minLength", "maxLength"})
_FIRST_OF_FORMAT = {  # the characters a string of the format can start with
    "uuid": frozenset("0123456789abcdefABCDEF"),
    "date": frozenset("0123456789"),
    "date-time": frozenset("0123456789"),
    "time": frozenset("0123456789"),
    "ipv4": frozenset("0123456789"),
}


def _disjoint_strings(branches: list) -> bool:
    """Whether every branch constrains only strings (no `type`) and no string can start
    with a character two branches allow."""
    firsts = []
    for branch in branches:
        if not isinstance(branch, dict) or not set(branch) - _ANNOTATIONS:
            return False
        if set(branch) - _ANNOTATIONS - _STRING_KEYWORDS:
            return False
        first = _first_chars(branch)
        if first is None:
            return False
        firsts.append(first)
    return all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


def _first_chars(branch: Schema) -> frozenset[str] | None:
    """The characters a string the branch admits must start with (it admits no empty
    string), or None when that is not read off its pattern or format."""
    found = []
    fmt = branch.get("format")
    if isinstance(fmt, str):
        if fmt not in _FIRST_OF_FORMAT:
            return None
        found.append(_FIRST_OF_FORMAT[fmt])
    if isinstance(branch.get("pattern"), str):
        first = _pattern_first_chars(branch["pattern"])
        if first is None:
            return None
        found.append(first)
    if not found:
        return None
    return frozenset.intersection(*found)


def _pattern_first_chars(pattern: str) -> frozenset[str] | None:
    """An anchored pattern's mandatory first character class, e.g. ^\\$ or ^[a-f]."""
    try:
        items = list(re_parser.parse(pattern))
    except re.error:
        return None
    if len(items) < 2 or items[0] != (re_constants.AT, re_constants.AT_BEGINNING):
        return None
    op, arg = items[1]
    if op == re_constants.MAX_REPEAT and arg[0] >= 1 and len(arg[2]) == 1:
        op, arg = arg[2][0]  # x{n,m} with n >= 1 starts with x
    if op == re_constants.LITERAL:
        return frozenset(chr(arg))
    if op != re_constants.IN:
        return None
    chars: set[str] = set()
    for kind, value in arg:
        if kind == re_constants.LITERAL:
            chars.add(chr(value))
        elif kind == re_constants.RANGE and value[1] - value[0] < 512:
            chars.update(chr(c) for c in range(value[0], value[1] + 1))
        else:  # negated or Unicode classes: not read here
            return None
    return frozenset(chars)
