"""String formats a grammar can enforce exactly, rewritten as patterns before compiling.

The grammar libraries' own `date` / `date-time` / `time` grammars ignore the calendar
(2024-02-31, 2023-02-29 pass). These patterns accept exactly what `jsonschema`'s format
checkers accept (Python's date.fromisoformat for `date`; RFC 3339 as rfc3339-validator
reads it, T and Z in either case, for `date-time` and `time`), so a schema's format is
enforced, not approximated. Both backends compile them through their regex support.
"""

from __future__ import annotations

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


def exact_pattern(node: dict) -> str | None:
    """The anchored exact pattern of a schema object's calendar format, when it has one
    and no `pattern` of its own beside it."""
    fmt = node.get("format")
    if not isinstance(fmt, str) or fmt not in PATTERNS or "pattern" in node:
        return None
    return f"^{PATTERNS[fmt]}$"


_FORMAT_OF = {f"^{pattern}$": fmt for fmt, pattern in PATTERNS.items()}


def format_of(pattern: str) -> str | None:
    """The format a pattern was rewritten from, or None for a schema's own pattern."""
    return _FORMAT_OF.get(pattern)
