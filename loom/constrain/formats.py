"""String formats a grammar can enforce exactly, rewritten as patterns before compiling.

The grammar libraries' own `date` / `date-time` / `time` grammars ignore the calendar
(2024-02-31, 2023-02-29 pass). These patterns accept exactly what `jsonschema`'s format
checkers accept (Python's date.fromisoformat for `date`; RFC 3339 as rfc3339-validator
reads it, T and Z in either case, for `date-time` and `time`), so a schema's format is
enforced, not approximated. Both backends compile them through their regex support.
"""

from __future__ import annotations

import copy
from typing import Any

_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
    "|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    "|02-(0[1-9]|1[0-9]|2[0-8]))"
)
DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = (
    "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)
PATTERNS = {"date": DATE, "date-time": f"{DATE}[Tt]{TIME}", "time": TIME}


def exact_formats(schema: Any) -> Any:
    """`schema` with each calendar `format` that has no `pattern` beside it replaced by
    its exact pattern (anchored). A copy is made only when something changes."""
    if not _has_calendar_format(schema):
        return schema
    schema = copy.deepcopy(schema)
    _rewrite(schema)
    return schema


_LITERALS = ("const", "enum", "default", "examples")  # values, not schemas


def _rewritable(node: dict) -> bool:
    fmt = node.get("format")
    return isinstance(fmt, str) and fmt in PATTERNS and "pattern" not in node


def _has_calendar_format(node: Any) -> bool:
    if isinstance(node, dict):
        if _rewritable(node):
            return True
        return any(_has_calendar_format(v) for k, v in node.items() if k not in _LITERALS)
    if isinstance(node, list):
        return any(_has_calendar_format(v) for v in node)
    return False


def _rewrite(node: Any) -> None:
    if isinstance(node, dict):
        if _rewritable(node):
            node["pattern"] = f"^{PATTERNS[node.pop('format')]}$"
        for key, value in node.items():
            if key not in _LITERALS:
                _rewrite(value)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value)


_FORMAT_OF = {f"^{pattern}$": fmt for fmt, pattern in PATTERNS.items()}


def format_of(pattern: str) -> str | None:
    """The format a pattern was rewritten from, or None for a schema's own pattern."""
    return _FORMAT_OF.get(pattern)
