"""Regex analysis for the language, with interegular.

- `check_regex` validates a regex up front and names the construct a grammar backend cannot
  honour (look-arounds, back-references, word boundaries, inline flags, ...).
- `split_regex` cuts a regex at its top level into literal runs and free parts, so the
  interpreter can send forced text as prompt text instead of generating it, and a backend
  without server-side grammars (an OpenAI API) can still honour the regex: literal parts as
  text, free parts generated with stops, the whole output checked afterwards.

Regexes are full-match patterns: a leading `^` and a trailing `$` are redundant and dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import interegular
from interegular.fsm import anything_else


class UnsupportedRegexError(ValueError):
    """A regex a grammar backend cannot honour; the message names the construct."""


@dataclass(frozen=True)
class RegexPart:
    """A top-level piece of a regex: literal text, or a free sub-regex (`text` is its source)."""

    text: str
    literal: bool


@dataclass(frozen=True)
class _Token:
    kind: str  # char | escape | class | open | close | alt | quant | anchor
    src: str


# (pattern at a group opening, what to call it)
_GROUP_PROBLEMS = (
    ("(?=", "look-ahead (?=...)"),
    ("(?!", "negative look-ahead (?!...)"),
    ("(?<=", "look-behind (?<=...)"),
    ("(?<!", "negative look-behind (?<!...)"),
    ("(?P=", "back-reference (?P=name)"),
    ("(?(", "conditional group (?(...)...)"),
    ("(?>", "atomic group (?>...)"),
    ("(?#", "comment group (?#...)"),
)
_ESCAPE_PROBLEMS = {
    "b": "word boundary \\b",
    "B": "non-word-boundary \\B",
    "A": "anchor \\A",
    "Z": "anchor \\Z",
    "z": "anchor \\z",
    "G": "anchor \\G",
    "k": "back-reference \\k<name>",
}
_QUANT = re.compile(r"[*+?]|\{\d*(,\d*)?\}")


def check_regex(regex: str) -> str:
    """Validate `regex`; returns its normalized form (anchors dropped, named groups made
    non-capturing). Raises UnsupportedRegexError naming the first unsupported construct."""
    return _normalize(regex)


@lru_cache(maxsize=512)
def _normalize(regex: str) -> str:
    if not isinstance(regex, str):
        raise UnsupportedRegexError(f"a regex must be a string, got {type(regex).__name__}")
    tokens = _lex(regex)
    if tokens and tokens[0].kind == "anchor" and tokens[0].src == "^":
        tokens = tokens[1:]
    if tokens and tokens[-1].kind == "anchor" and tokens[-1].src == "$":
        tokens = tokens[:-1]
    for tok in tokens:
        _check_token(regex, tok)
    text = "".join("(?:" if t.kind == "open" else t.src for t in tokens)
    try:
        re.compile(text)
        interegular.parse_pattern(text)
    except re.error as e:
        raise UnsupportedRegexError(f"invalid regex {regex!r}: {e}") from e
    except interegular.InvalidSyntax as e:
        raise UnsupportedRegexError(f"invalid regex {regex!r}: {str(e) or 'syntax error'}") from e
    except interegular.Unsupported as e:
        raise UnsupportedRegexError(f"regex {regex!r} uses an unsupported construct: {e}") from e
    return text


def _check_token(regex: str, tok: _Token) -> None:
    problem = None
    if tok.kind == "anchor":
        problem = f"anchor {tok.src!r} inside the pattern (a regex always matches the whole output)"
    elif tok.kind == "escape" and tok.src[1:2].isdigit() and tok.src[1] != "0":
        problem = f"back-reference {tok.src}"
    elif tok.kind == "escape":
        problem = _ESCAPE_PROBLEMS.get(tok.src[1:2])
    elif tok.kind == "open":
        problem = _group_problem(tok.src)
    elif tok.kind == "quant" and len(tok.src) > 1 and tok.src.endswith("+"):
        problem = f"possessive quantifier {tok.src}"
    if problem:
        raise UnsupportedRegexError(f"regex {regex!r} uses an unsupported construct: {problem}")


def _group_problem(src: str) -> str | None:
    for start, name in _GROUP_PROBLEMS:
        if src.startswith(start):
            return name
    if src in ("(", "(?:") or src.startswith("(?P<"):
        return None
    return f"inline flags {src}"


def _lex(regex: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            if i + 1 >= n:
                raise UnsupportedRegexError(f"invalid regex {regex!r}: trailing backslash")
            end = i + 2
            if regex[i + 1] == "x":
                end = i + 4
            tokens.append(_Token("escape", regex[i:end]))
            i = end
        elif c == "[":
            end = _class_end(regex, i)
            tokens.append(_Token("class", regex[i:end]))
            i = end
        elif c == "(":
            end = _group_head_end(regex, i)
            tokens.append(_Token("open", regex[i:end]))
            i = end
        elif c in ")|^$":
            kind = {")": "close", "|": "alt"}.get(c, "anchor")
            tokens.append(_Token(kind, c))
            i += 1
        else:
            match = _QUANT.match(regex, i)
            if match and tokens and tokens[-1].kind not in ("open", "alt"):
                end = match.end()
                if end < n and regex[end] in "?+":
                    end += 1
                tokens.append(_Token("quant", regex[i:end]))
                i = end
            else:
                tokens.append(_Token("char", c))
                i += 1
    return tokens


def _class_end(regex: str, start: int) -> int:
    i = start + 1
    if i < len(regex) and regex[i] == "^":
        i += 1
    if i < len(regex) and regex[i] == "]":
        i += 1
    while i < len(regex):
        if regex[i] == "\\":
            i += 2
            continue
        if regex[i] == "]":
            return i + 1
        i += 1
    raise UnsupportedRegexError(f"invalid regex {regex!r}: unterminated character class")


def _group_head_end(regex: str, start: int) -> int:
    """End of a group's opening: "(" or "(?:" / "(?P<name>" / "(?=" / "(?i)" ..."""
    if not regex.startswith("(?", start):
        return start + 1
    if regex.startswith("(?P<", start):
        close = regex.find(">", start)
        return close + 1 if close > 0 else len(regex)
    for head in ("(?:", "(?<=", "(?<!", "(?P=", "(?=", "(?!", "(?(", "(?>", "(?#"):
        if regex.startswith(head, start):
            return start + len(head)
    match = re.compile(r"\(\?[a-zA-Z-]*[:)]?").match(regex, start)
    return match.end() if match else start + 2


# ---- literal splitting ---------------------------------------------------------------------


@lru_cache(maxsize=512)
def split_regex(regex: str) -> tuple[RegexPart, ...]:
    """The top-level pieces of a (valid) regex, consecutive literals merged. A top-level
    alternation is one free part."""
    norm = check_regex(regex)
    atoms = _top_level_atoms(_lex(norm))
    if atoms is None:
        return (RegexPart(norm, False),)
    parts: list[RegexPart] = []
    for src in atoms:
        literal = _literal_of(src)
        if literal is not None and parts and parts[-1].literal:
            parts[-1] = RegexPart(parts[-1].text + literal, True)
        elif literal is not None:
            parts.append(RegexPart(literal, True))
        elif parts and not parts[-1].literal:
            parts[-1] = RegexPart(parts[-1].text + src, False)
        else:
            parts.append(RegexPart(src, False))
    return tuple(p for p in parts if p.text)


def split_prefix(regex: str) -> tuple[str, str]:
    """(forced literal prefix, regex for the rest). Trailing whitespace stays in the rest:
    a prompt ending in a space would make the model start at an unnatural token boundary."""
    parts = split_regex(regex)
    if not parts or not parts[0].literal:
        return "", check_regex(regex)
    prefix = parts[0].text
    kept = prefix.rstrip()
    rest = _escape_literal(prefix[len(kept) :]) + "".join(
        p.text if not p.literal else _escape_literal(p.text) for p in parts[1:]
    )
    return kept, rest


def _top_level_atoms(tokens: list[_Token]) -> list[str] | None:
    atoms: list[str] = []
    depth = 0
    for tok in tokens:
        if tok.kind == "alt" and depth == 0:
            return None
        starts_atom = depth == 0 and tok.kind not in ("quant", "close")
        if starts_atom:
            atoms.append("")
        atoms[-1] += "(?:" if tok.kind == "open" else tok.src
        depth += {"open": 1, "close": -1}.get(tok.kind, 0)
    return atoms


@lru_cache(maxsize=2048)
def _literal_of(atom: str) -> str | None:
    """The one string `atom` matches, or None when it matches several (walks its DFA)."""
    fsm = interegular.parse_pattern(atom).to_fsm()
    by_symbol = fsm.alphabet.by_transition
    state, out = fsm.initial, []
    for _ in range(256):
        moves = fsm.map.get(state, {})
        if state in fsm.finals:
            return "".join(out) if not moves else None
        if len(moves) != 1:
            return None
        symbol, state = next(iter(moves.items()))
        chars = by_symbol[symbol]
        if len(chars) != 1 or chars[0] is anything_else:
            return None
        out.append(chars[0])
    return None


_SPECIAL = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\f": "\\f", "\v": "\\v"}


def _escape_literal(text: str) -> str:
    return "".join(_SPECIAL.get(c) or (re.escape(c) if c != " " else " ") for c in text)


# ---- checking outputs ----------------------------------------------------------------------


def fullmatch(regex: str, text: str) -> bool:
    return re.fullmatch(check_regex(regex), text) is not None


def longest_match(regex: str, text: str) -> str | None:
    """The longest prefix of `text` that `regex` fully matches (None if none does)."""
    pattern = re.compile(check_regex(regex))
    for end in range(len(text), -1, -1):
        if pattern.fullmatch(text, 0, end):
            return text[:end]
    return None
