"""What xgrammar 0.2.9 gets wrong without saying so, found by random walks and the
JSON-Schema-Test-Suite: regex escapes it reads as plain letters, a repeat inside an
optional group, and formats whose grammar admits strings the format forbids. The
honesty checks (schema_check) refuse these for the xgrammar backend."""

from __future__ import annotations

import re
from re import _constants as re_constants  # type: ignore[attr-defined]
from re import _parser as re_parser  # type: ignore[attr-defined]

# Letter escapes xgrammar's regex converter knows; it reads any other (\A, \Z, \z, ...)
# as the plain letter, so "^a\Z" would silently mean "aZ".
_KNOWN_ESCAPES = frozenset("dDwWsStnrfv0aexuckpPbB")


def find_literal_escape(regex: str) -> str | None:
    """The first letter escape in `regex` that xgrammar would read as a plain letter."""
    i = 0
    while i < len(regex) - 1:
        if regex[i] == "\\":
            nxt = regex[i + 1]
            if nxt.isascii() and nxt.isalpha() and nxt not in _KNOWN_ESCAPES:
                return "\\" + nxt
            i += 2
        else:
            i += 1
    return None


# Formats whose xgrammar grammar admits strings jsonschema's format checker rejects
# (random walks: leading zeros in ipv4, any text for iri / idn-*, ...). date, date-time
# and time are rewritten to exact patterns first (formats.py).
XGRAMMAR_UNSOUND_FORMATS = frozenset({
    "hostname", "idn-email", "idn-hostname", "ipv4", "ipv6", "iri", "iri-reference",
    "regex", "relative-json-pointer",
})  # fmt: skip


def has_optional_group_with_unbounded_repeat(pattern: str) -> bool:
    """Whether the regex makes optional (`?`) a part holding `+`, `*` or `{m,}`."""
    try:
        tree = re_parser.parse(pattern)
    except re.error:
        return False  # not Python's dialect: the grammar library judges it
    return _optional_holds_unbounded(tree, inside=False)


_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT, re_constants.POSSESSIVE_REPEAT)


def _optional_holds_unbounded(items, inside: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            if inside and high == re_constants.MAXREPEAT:
                return True
            if _optional_holds_unbounded(body, inside or (low, high) == (0, 1)):
                return True
        elif op == re_constants.SUBPATTERN:
            if _optional_holds_unbounded(arg[-1], inside):
                return True
        elif op == re_constants.BRANCH:
            if any(_optional_holds_unbounded(branch, inside) for branch in arg[1]):
                return True
    return False
