"""Regex analysis: validation naming the construct, literal splits, forced prefixes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom.constrain.regex import (
    RegexPart,
    UnsupportedRegexError,
    check_regex,
    longest_match,
    split_prefix,
    split_regex,
)


@pytest.mark.parametrize(
    "regex, construct",
    [
        ("(?=a)a", "look-ahead"),
        ("(?!a)b", "negative look-ahead"),
        ("(?<=a)b", "look-behind"),
        ("(?<!a)b", "negative look-behind"),
        (r"(a)\1", r"back-reference \1"),
        ("(?P<x>a)(?P=x)", "back-reference (?P=name)"),
        (r"\bword", r"word boundary \b"),
        ("(?i)abc", "inline flags"),
        (r"a\Z", r"anchor \Z"),
        ("a^b", "anchor '^'"),
        ("a*+", "possessive quantifier"),
        ("(?>a)", "atomic group"),
    ],
)
def test_unsupported_constructs_are_named(regex, construct):
    with pytest.raises(UnsupportedRegexError) as info:
        check_regex(regex)
    assert construct in str(info.value)


@pytest.mark.parametrize("regex", ["a)", "[abc", "a{2"])
def test_invalid_syntax_is_rejected(regex):
    with pytest.raises(UnsupportedRegexError, match="invalid regex"):
        check_regex(regex)


def test_redundant_anchors_and_named_groups_are_normalized():
    assert check_regex("^(?P<year>[0-9]{4})$") == "(?:[0-9]{4})"
    assert check_regex(r"[\^$]x") == r"[\^$]x"  # inside a class they are plain characters


def test_split_merges_literals_and_keeps_free_parts():
    assert split_regex(r"Name: [A-Z][a-z]+, Age: \d+\n") == (
        RegexPart("Name: ", True),
        RegexPart("[A-Z][a-z]+", False),
        RegexPart(", Age: ", True),
        RegexPart(r"\d+", False),
        RegexPart("\n", True),
    )


def test_groups_and_exact_repeats_that_match_one_string_are_literal():
    assert split_regex(r"(?:ab)c{2}\.[0-9]") == (
        RegexPart("abcc.", True),
        RegexPart("[0-9]", False),
    )


def test_top_level_alternation_is_one_free_part():
    assert split_regex("yes|no") == (RegexPart("yes|no", False),)
    assert split_prefix("yes|no") == ("", "yes|no")


def test_prefix_leaves_trailing_whitespace_to_the_model():
    assert split_prefix(r"Answer: [0-9]+") == ("Answer:", r" [0-9]+")
    assert split_prefix(r"\{\n  [a-z]+") == ("{", r"\n  [a-z]+")


def test_fully_literal_regex_has_no_rest():
    assert split_prefix(r"done\.") == ("done.", "")


def test_longest_match_cuts_at_the_longest_matching_prefix():
    assert longest_match(r"[A-Z][a-z]+", "Ada Lovelace") == "Ada"
    assert longest_match(r"[0-9]+", "x1") is None


_ATOMS = st.sampled_from(["abc", r"\.", "[0-9]+", "x{2}", "(?:q|r)", " ", "[a-z]*", r"\n", "-"])


@given(st.lists(_ATOMS, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_split_parts_rebuild_a_regex_with_the_same_language(atoms, rnd):
    regex = "".join(atoms)
    rebuilt = "".join(re.escape(p.text) if p.literal else p.text for p in split_regex(regex))
    prefix, rest = split_prefix(regex)
    samples = [_sample(regex, rnd) for _ in range(5)]
    for text in samples:
        assert re.fullmatch(rebuilt, text)
        assert text.startswith(prefix) and re.fullmatch(rest, text[len(prefix) :])


def _sample(regex: str, rnd) -> str:
    """A random string the regex matches (for the atoms above)."""
    out = []
    for token in re.findall(r"\\.|\[[^\]]*\][+*]?|\(\?:q\|r\)|x\{2\}|.", regex):
        if token.startswith("[0-9]"):
            out.append(str(rnd.randint(0, 999)))
        elif token.startswith("[a-z]"):
            out.append("".join(rnd.choice("abz") for _ in range(rnd.randint(0, 3))))
        elif token == "(?:q|r)":
            out.append(rnd.choice("qr"))
        elif token == "x{2}":
            out.append("xx")
        elif token == r"\n":
            out.append("\n")
        elif token.startswith("\\"):
            out.append(token[1])
        else:
            out.append(token)
    return "".join(out)
