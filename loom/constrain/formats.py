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

# An email as a grammar writes it: a dot-atom local part, an '@', and a domain of
# letter-digit labels joined by hyphens (RFC 5321's mailbox without quoted local parts or
# address literals, which xgrammar's pattern conversion cannot write inside JSON).
# jsonschema's checker asks only for an '@', so every such string passes it; a model is
# kept to addresses that look like addresses, as with the libraries' own `email`.
# Written unambiguously, each character having one way to match: xgrammar's built-in
# email grammar has right-recursive, ambiguous rules, and filling a mask inside it costs
# ~75x this pattern's (450 us against 6 us on a Llama-3 vocabulary).
_ATOM = "[a-zA-Z0-9_!#$%&'*+/=?^`{|}~-]+"
_LABEL = "[A-Za-z0-9]+(-+[A-Za-z0-9]+)*"
EMAIL = f"{_ATOM}(\\.{_ATOM})*@{_LABEL}(\\.{_LABEL})*"
# Formats a grammar writes narrower than jsonschema checks them (sound, not exact).
GRAMMAR_PATTERNS = {"email": EMAIL, "idn-email": EMAIL}


def exact_pattern(node: dict) -> str | None:
    """The anchored exact pattern of a schema object's calendar format, when it has one
    and no `pattern` of its own beside it."""
    return _anchored(node, PATTERNS)


def grammar_pattern(node: dict) -> str | None:
    """The anchored pattern a grammar writes for a string schema's format, for the
    formats written narrower than checked (GRAMMAR_PATTERNS), with no `pattern` beside."""
    if node.get("type") != "string":  # a pattern alone would not say "a string"
        return None
    return _anchored(node, GRAMMAR_PATTERNS)


def _anchored(node: dict, patterns: dict[str, str]) -> str | None:
    fmt = node.get("format")
    if not isinstance(fmt, str) or fmt not in patterns or "pattern" in node:
        return None
    return f"^{patterns[fmt]}$"


_FORMAT_OF: dict[str, str] = {}  # "email or idn-email" where formats share a pattern
for _fmt, _pattern in {**PATTERNS, **GRAMMAR_PATTERNS}.items():
    _key = f"^{_pattern}$"
    _FORMAT_OF[_key] = f"{_FORMAT_OF[_key]} or {_fmt}" if _key in _FORMAT_OF else _fmt


def format_of(pattern: str) -> str | None:
    """The format a pattern was rewritten from, or None for a schema's own pattern."""
    return _FORMAT_OF.get(pattern)
