"""JSON Schema honesty: find what a grammar backend cannot enforce, before a request runs.

The rules below are xgrammar's (`_problems`); llguidance's are shorter
(`_llguidance_problems`: it refuses by itself what it does not implement). Both run on
the schema as schema_normalize rewrites it.

xgrammar 0.2.8 turns a JSON schema into a grammar, and silently drops what it cannot
express: the grammar then accepts JSON the schema forbids. loom must never hand such
output back as if it were fine, so every construct below is either rejected up front
(a 400 naming the keyword and where it is) or, with `json_schema_lenient`, accepted and
the output validated afterwards with `jsonschema` (`validate_output`).

This assumes loom's compile settings (xgrammar strict_mode=True, see xgrammar_backend).
What xgrammar 0.2.8 does not enforce, found by running the JSON-Schema-Test-Suite and
random grammar walks against it (tests/test_json_schema_suite.py keeps the list honest):
- keywords it ignores everywhere: not, if/then/else, dependentRequired,
  dependentSchemas, dependencies, contains/minContains/maxContains, multipleOf,
  patternProperties, propertyNames, unevaluatedProperties/Items, additionalItems,
  $dynamicRef/$recursiveRef, uniqueItems (when true);
- allOf with more than one subschema, or beside other assertions;
- keywords beside anyOf / oneOf / $ref (xgrammar uses the applicator alone);
- enum / const beside assertions that some listed value breaks (only the values count);
- oneOf whose branches are not provably disjoint (it degrades to anyOf);
- $ref that is not a local JSON pointer ("#" or "#/..."), or under a nested $id;
- type-specific assertions in a schema with no "type" ({"minimum": 3} allows 1);
- `required` names not declared in `properties` (they end up not required);
- additionalProperties (other than false) beside properties: a declared key spelled
  with escapes ("\\u0061" for "a") passes as an extra key and skips its own schema;
- minLength / maxLength combined with pattern or format (the length is dropped);
- minProperties above the required count while extra keys are allowed (a repeated
  key counts twice in the grammar but once after parsing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.validators import validator_for
from referencing.jsonschema import DRAFT202012

from loom.constrain.base import GrammarError
from loom.constrain.formats import format_of
from loom.constrain.schema_normalize import for_grammar
from loom.constrain.schema_types import (
    ASSERTIONS,
    IGNORED_EVERYWHERE,
    NEEDS_TYPE,
    is_local_pointer,
    pairwise_disjoint,
    pointer_token,
    resolve,
    subschemas,
    type_within,
    types_of,
)
from loom.constrain.xgrammar_quirks import (
    XGRAMMAR_UNSOUND_FORMATS,
    find_literal_escape,
    has_optional_group_with_unbounded_repeat,
)

Schema = dict[str, Any]


_ROOT_URI = "urn:loom:schema"  # where the schema under check is registered for $refs


class Problem(NamedTuple):
    keyword: str
    path: str  # JSON pointer of the schema object holding the keyword; "" is the root
    why: str  # what makes it unenforceable, e.g. "beside other keywords"


def find_unsupported(schema: Any, backend: str = "xgrammar") -> list[tuple[str, str]]:
    """(keyword, JSON pointer) of every construct the backend cannot enforce, in the parts
    of `schema` reachable from its root (unused $defs do not count)."""
    return [(p.keyword, p.path) for p in find_problems(schema, backend)]


def find_problems(schema: Any, backend: str = "xgrammar") -> list[Problem]:
    """find_unsupported, with the reason for each keyword (of the schema as the backend
    compiles it: schema_normalize's rewrite)."""
    if not isinstance(schema, dict):
        return []
    schema = for_grammar(schema, expand=backend != "xgrammar")
    rules = _problems if backend == "xgrammar" else _llguidance_problems
    found: list[Problem] = []
    for path, sub, under_id in _walk(schema, "", schema, set(), nested_id=False):
        for kw, why in rules(sub, path, schema, under_id):
            pattern = sub.get("pattern")
            fmt = format_of(pattern) if kw == "pattern" and isinstance(pattern, str) else None
            if fmt:  # a format's exact pattern (formats.py): the schema said `format`
                kw, why = "format", f"'{fmt}', as its exact pattern: {why}"
            found.append(Problem(kw, path, why))
    return found


def check_schema(schema_text: str, lenient: bool, backend: str = "xgrammar") -> Schema | bool:
    """Parse and check a JSON schema; raises GrammarError naming the problem. Keywords the
    backend cannot enforce are an error unless `lenient` (the output is then validated
    afterwards)."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = _pointer(e.path)
        raise GrammarError(f"json_schema is not a valid JSON Schema at {where}: {e.message}") from e
    problems = [] if lenient else find_problems(schema, backend)
    if problems:
        kw, path, why = problems[0]
        why = f" ({why})" if why else ""
        raise GrammarError(
            f"json_schema uses '{kw}'{why} at {path or 'the schema root'}, which loom cannot "
            "enforce; remove it or set json_schema_lenient=true to validate afterwards"
        )
    return schema


def validate_output(schema: Schema | bool, text: str) -> str | None:
    """None when `text` is JSON valid for `schema`, else a message naming the violation."""
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as e:
        return f"output is not valid JSON: {e}"
    validator = validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    except referencing.exceptions.Unresolvable as e:  # remote refs are never fetched
        return f"output cannot be validated: unresolvable reference {e}"
    if error is None:
        return None
    return f"output violates the schema at {_pointer(error.absolute_path)}: {error.message}"


def _walk(
    sub: Any, path: str, root: Schema, seen: set[str], nested_id: bool
) -> Iterator[tuple[str, Schema, bool]]:
    """Every schema object reachable from `sub` (following local $refs), once each."""
    if not isinstance(sub, dict) or path in seen:
        return
    seen.add(path)
    nested_id = nested_id or (path != "" and "$id" in sub)
    yield path, sub, nested_id
    for child_path, container, key in subschemas(sub, path):
        yield from _walk(container[key], child_path, root, seen, nested_id)
    ref = sub.get("$ref")
    if isinstance(ref, str) and is_local_pointer(ref):
        target = resolve(root, ref)
        if target is not None:
            yield from _walk(target, ref[1:], root, seen, nested_id)


def _problems(sub: Schema, path: str, root: Schema, under_id: bool) -> list[tuple[str, str]]:
    """(keyword, why) for each keyword of one schema object that xgrammar would not enforce."""
    bad = [(kw, "") for kw in IGNORED_EVERYWHERE if kw in sub]
    if sub.get("uniqueItems") is True:
        bad.append(("uniqueItems", ""))
    if "type" not in sub:
        bad += [(kw, 'without "type"') for kw in NEEDS_TYPE if kw in sub]
    pattern = sub.get("pattern")
    escape = find_literal_escape(pattern) if isinstance(pattern, str) else None
    if escape:
        bad.append(("pattern", f"escape {escape} would match a plain letter"))
    if isinstance(pattern, str) and has_optional_group_with_unbounded_repeat(pattern):
        # xgrammar 0.2.9 compiles a schema pattern's (xy+)? as if it were x?y*
        bad.append(("pattern", "an optional group holding + or *, as in (xy+)?"))
    bad += _format_problems(sub, unsound=XGRAMMAR_UNSOUND_FORMATS)
    if "pattern" in sub or "format" in sub:
        bad += [(kw, "with pattern or format") for kw in ("minLength", "maxLength") if kw in sub]
    bad += _applicator_problems(sub, root)
    bad += _ref_problems(sub, under_id)
    bad += _object_problems(sub)
    bad += _literal_problems(sub, path, root)
    seen: set[str] = set()
    return [(kw, why) for kw, why in bad if not (kw in seen or seen.add(kw))]


def _format_problems(sub: Schema, unsound: frozenset[str] | tuple) -> list[tuple[str, str]]:
    fmt = sub.get("format")
    if not isinstance(fmt, str):
        return []
    if fmt in unsound:
        return [("format", f"'{fmt}' (its grammar admits strings the format forbids)")]
    if "pattern" in sub:
        return [("format", "beside 'pattern' (only one of them would be enforced)")]
    return []


# llguidance refuses what it does not implement (with an error naming the keys); these
# are the constructs it compiles but does not enforce exactly, found by the same tests.

_NEGATED_CLASS = ("\\D", "\\W", "\\S")


def _llguidance_problems(
    sub: Schema, path: str, root: Schema, under_id: bool
) -> list[tuple[str, str]]:
    bad = []
    bad += _format_problems(sub, unsound=())  # llguidance refuses formats it lacks
    pattern = sub.get("pattern")
    if isinstance(pattern, str) and any(c in pattern for c in _NEGATED_CLASS):
        # Its \d \w \s are ASCII, Python's (jsonschema's) are Unicode: the negations
        # would admit characters the schema's validator rejects.
        bad.append(("pattern", "negated class \\D, \\W or \\S (ASCII vs Unicode)"))
    required = sub.get("required") if isinstance(sub.get("required"), list) else []
    extra_open = sub.get("additionalProperties", True) is not False
    min_props = sub.get("minProperties")
    if extra_open and isinstance(min_props, (int, float)) and min_props > len(set(required)):
        bad.append(("minProperties", "above the required count while extra keys are allowed"))
    bad += _ref_problems(sub, under_id, siblings_ignored=False)  # llguidance intersects them
    literals = {kw: sub[kw] for kw in ("const", "enum", "required") if kw in sub}
    if isinstance(sub.get("properties"), dict):
        literals["properties"] = list(sub["properties"])  # the names only
    for kw, value in literals.items():
        if _needs_unicode_escape(value):
            # loom's llguidance grammars allow no \u escapes (llguidance_backend says why)
            bad.append((kw, "with a control character only a \\u escape can spell"))
    return bad


_SHORT_ESCAPED = frozenset("\b\f\n\r\t")


def _needs_unicode_escape(value: Any) -> bool:
    """Whether a literal holds a string (or key) with a control character that JSON can
    only write as \\u00XX."""
    if isinstance(value, str):
        return any(c < " " and c not in _SHORT_ESCAPED for c in value)
    if isinstance(value, dict):
        return any(_needs_unicode_escape(k) or _needs_unicode_escape(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_needs_unicode_escape(v) for v in value)
    return False


def _siblings(sub: Schema, keyword: str) -> set[str]:
    return (set(sub) & ASSERTIONS) - {keyword}


def _applicator_problems(sub: Schema, root: Schema) -> list[tuple[str, str]]:
    bad = []
    all_of = sub.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        bad.append(("allOf", "with more than one subschema"))
    elif isinstance(all_of, list) and _siblings(sub, "allOf"):
        bad.append(("allOf", "beside other keywords"))
    for kw in ("anyOf", "oneOf"):
        if isinstance(sub.get(kw), list) and not _siblings_implied(sub, kw, root):
            bad.append((kw, "beside other keywords"))
    one_of = sub.get("oneOf")
    if isinstance(one_of, list) and not pairwise_disjoint(one_of, root):
        bad.append(("oneOf", "with branches that may overlap"))
    return bad


def _siblings_implied(sub: Schema, kw: str, root: Schema) -> bool:
    """xgrammar uses anyOf / oneOf alone; that is exact when the only sibling is a `type`
    every branch already implies."""
    others = _siblings(sub, kw)
    if not others:
        return True
    if others != {"type"}:
        return False
    allowed = types_of(sub, root)
    branch_types = [types_of(branch, root) for branch in sub[kw]]
    return allowed is not None and all(
        t is not None and all(type_within(x, allowed) for x in t) for t in branch_types
    )


def _ref_problems(
    sub: Schema, under_id: bool, siblings_ignored: bool = True
) -> list[tuple[str, str]]:
    """siblings_ignored: the backend uses a $ref alone, dropping keywords beside it."""
    ref = sub.get("$ref")
    if ref is None:
        return []
    if not isinstance(ref, str) or not is_local_pointer(ref):
        return [("$ref", "not a local '#/...' pointer")]
    if under_id:
        return [("$ref", "under a nested $id")]
    if siblings_ignored and _siblings(sub, "$ref"):
        return [("$ref", "beside other keywords")]
    return []


def _object_problems(sub: Schema) -> list[tuple[str, str]]:
    bad = []
    props = sub.get("properties") if isinstance(sub.get("properties"), dict) else {}
    required = sub.get("required") if isinstance(sub.get("required"), list) else []
    extra_open = sub.get("additionalProperties", False) is not False  # strict: closed
    if any(name not in props for name in required):
        bad.append(("required", "naming a key not in 'properties'"))
    if props and extra_open:
        # A declared key spelled with escapes ("\u0061") passes as an extra key and
        # escapes its own schema; with extra keys closed (strict mode) it cannot.
        bad.append(("additionalProperties", "beside 'properties'"))
    min_props = sub.get("minProperties")
    if extra_open and isinstance(min_props, (int, float)) and min_props > len(set(required)):
        # A repeated extra key counts twice in the grammar, once after parsing.
        bad.append(("minProperties", "above the required count while extra keys are allowed"))
    return bad


def _literal_problems(sub: Schema, path: str, root: Schema) -> list[tuple[str, str]]:
    """enum / const replace their sibling assertions in xgrammar; that is exact only when
    every listed value satisfies the whole schema anyway (jsonschema decides)."""
    for kw in ("const", "enum"):
        if kw not in sub or not _siblings(sub, kw):
            continue
        values = [sub["const"]] if kw == "const" else sub.get("enum") or []
        validator = _validator_at(root, path)
        try:
            if all(validator.is_valid(value) for value in values):
                continue
        except (referencing.exceptions.Unresolvable, AttributeError, TypeError):
            pass  # no proof, so not exact (a draft-4 `id` property confuses the resolver)
        return [(kw, "beside keywords some of its values break")]
    return []


def _validator_at(root: Schema, path: str) -> jsonschema.protocols.Validator:
    """A validator for the subschema at `path`, its $refs resolved within `root`."""
    cls = validator_for(root, default=jsonschema.Draft202012Validator)
    resource = referencing.Resource.from_contents(root, default_specification=DRAFT202012)
    registry = referencing.Registry().with_resource(_ROOT_URI, resource)
    return cls({"$ref": _ROOT_URI + "#" + quote(path, safe="/~$")}, registry=registry)


def _pointer(parts: Any) -> str:
    path = "".join(f"/{pointer_token(str(p))}" for p in parts)
    return path or "the root"
