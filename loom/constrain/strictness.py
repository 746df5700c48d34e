"""Strict and non-strict JSON schemas.

Strict (the default, `json_schema_strict=True`): where a schema says nothing about extra
object keys or extra array items, none are allowed. This is xgrammar's strict mode, what
SGLang and vLLM users get by default, and it keeps a model from inventing keys.
Non-strict (`json_schema_strict=False`, or OpenAI's `strict: false`): JSON Schema's own
meaning, where extra keys and items are allowed unless the schema forbids them.

Either meaning is written into the schema before a backend sees it, so each backend
enforces the same one whatever its own default:
- `open_schema` (non-strict) writes the defaults out: `additionalProperties: true`
  beside `properties`, `items: true` after `prefixItems`. xgrammar refuses such an open
  object (schema_check: an extra key spelled with escapes would skip a declared key's
  schema), so under `--grammar-backend auto` these requests go to llguidance.
- `close_schema` (strict) writes strict mode out for llguidance, whose default is JSON
  Schema's. It closes only objects whose keys are all declared beside them: not a member
  of an `allOf` (its siblings add keys) nor an object that composes others
  (`allOf` / `anyOf` / `oneOf` / `$ref` / `if` / dependent schemas), whose branches may
  declare more keys.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from loom.constrain.schema_types import SCHEMA_MAPS, Schema, subschemas

_MAPS = SCHEMA_MAPS + ("$defs", "definitions")
_EXTRA_KEYS = ("additionalProperties", "unevaluatedProperties")
_ADDS_KEYS = ("allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas", "dependencies")


def open_schema(schema: Any) -> Any:
    """A copy of the schema with JSON Schema's defaults for extra keys and items written
    out (non-strict)."""
    out = copy.deepcopy(schema)
    for node in _walk(out):
        if isinstance(node.get("properties"), dict) and not any(k in node for k in _EXTRA_KEYS):
            node["additionalProperties"] = True
        if isinstance(node.get("prefixItems"), list) and "items" not in node:
            node["items"] = True
    return out


def close_schema(schema: Any) -> Any:
    """A copy of the schema with strict mode written out: an object whose keys are all
    declared beside it allows no others unless it says so; a tuple allows no items past
    its prefixItems unless it says so. Only where closing keeps the rest of the schema's
    meaning, so that strict only ever narrows what the schema accepts: never under a
    condition, a negation or a combination whose siblings add keys (allOf, oneOf, not,
    if / then / else, contains, propertyNames, dependentSchemas, an anyOf beside the
    object's own keys), nor in a definition referenced from there, nor an object that
    requires a key it does not declare."""
    out = copy.deepcopy(schema)
    for node in _closable(out):
        if (
            isinstance(node.get("properties"), dict)
            and not any(k in node for k in _EXTRA_KEYS + ("patternProperties",) + _ADDS_KEYS)
            and set(node.get("required") or []) <= set(node["properties"])
        ):
            node["additionalProperties"] = False
        if isinstance(node.get("prefixItems"), list) and "items" not in node:
            node["items"] = False
    return out


@functools.lru_cache(maxsize=256)
def open_schema_text(text: str) -> str:
    """open_schema of a schema's JSON text (the text as it is if it is not JSON: the
    backend's check reports that)."""
    try:
        return json.dumps(open_schema(json.loads(text)))
    except ValueError:
        return text


def _walk(root: Any) -> list[Schema]:
    """Every schema object under root (root included)."""
    if not isinstance(root, dict):
        return []
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(container[key] for _, container, key in subschemas(node, "", _MAPS))
    return found


# Edges below which a subschema describes a value of its own (a property's, an item's, a
# definition's): closing it there changes nothing else.
_VALUE_EDGES = frozenset(
    ("properties", "patternProperties", "additionalProperties", "items", "prefixItems",
     "additionalItems", "unevaluatedItems", "$defs", "definitions")
)  # fmt: skip
# Closing a branch of anyOf narrows the union; closing one of oneOf's can widen it (an
# instance then matches fewer branches, so "exactly one" holds more often).
_UNIONS = frozenset(("anyOf",))
_OWN_KEYS = ("properties", "patternProperties", "additionalProperties", "required")


def _closable(root: Any) -> list[Schema]:
    """The schema objects strict mode may close (close_schema's rule)."""
    if not isinstance(root, dict):
        return []
    open_defs: set[str] = set()
    while True:  # a definition referenced from an open context is open, transitively
        closable, opened = _contexts(root, open_defs)
        if opened <= open_defs:
            return closable
        open_defs |= opened


def _contexts(root: Schema, open_defs: set[str]) -> tuple[list[Schema], set[str]]:
    """(the nodes reached only along value edges, the $refs made in open contexts). The
    root's own definitions named in open_defs are open."""
    closable, opened = [], set()
    stack = [(root, True)]
    while stack:
        node, ok = stack.pop()
        ref = node.get("$ref")
        if isinstance(ref, str) and not ok:
            opened.add(ref)
        if ok:
            closable.append(node)
        pure_union = not any(k in node for k in _OWN_KEYS)
        for path, container, key in subschemas(node, "", _MAPS):
            edge = path.split("/")[1]
            child_ok = ok and (edge in _VALUE_EDGES or (edge in _UNIONS and pure_union))
            if edge in ("$defs", "definitions") and f"#/{edge}/{key}" in open_defs:
                child_ok = False
            stack.append((container[key], child_ok))
    return closable, opened
