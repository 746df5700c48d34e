"""Roles as text: each role's prefix and suffix, derived from the model's own chat template.

The template (a Jinja renderer of whole conversations) is rendered with sentinel contents
and cut at the sentinels, so `s += loom.user(...)` writes exactly what the tokenizer's
`apply_chat_template` (and so the OpenAI chat endpoint) writes for the same conversation.
A named template overrides the model's; `plain` is the fallback for models without one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from loom.backends.base import ChatTemplate
from loom.lang.errors import LoomError

logger = logging.getLogger(__name__)

_S, _U, _A, _U2 = (
    "LoomSentinelSystem0",
    "LoomSentinelUser1",
    "LoomSentinelAssistant2",
    "LoomSentinelUser3",
)


@dataclass(frozen=True)
class RoleTemplate:
    name: str
    prefixes: Mapping[str, str]
    suffixes: Mapping[str, str]
    # Where the conversation opens with this role the template may write more (a BOS, a
    # default system prompt): the prefix to use then.
    first_prefixes: Mapping[str, str] = field(default_factory=dict)

    def prefix(self, role: str, first: bool) -> str:
        if first and role in self.first_prefixes:
            return self.first_prefixes[role]
        return self.prefixes[role]

    def suffix(self, role: str) -> str:
        return self.suffixes[role]


def _uniform(name: str, prefix: Callable[[str], str], suffix: str) -> RoleTemplate:
    roles = ("system", "user", "assistant")
    return RoleTemplate(name, {r: prefix(r) for r in roles}, {r: suffix for r in roles})


PLAIN = RoleTemplate(
    "plain",
    {"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
    {"system": "\n\n", "user": "\n", "assistant": "\n"},
)
NAMED_TEMPLATES: dict[str, RoleTemplate] = {
    "plain": PLAIN,
    "chatml": _uniform("chatml", lambda r: f"<|im_start|>{r}\n", "<|im_end|>\n"),
    "llama-3": _uniform(
        "llama-3", lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>"
    ),
}


def named_template(name: str) -> RoleTemplate:
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise LoomError(
            f"unknown chat template {name!r}; named templates: {sorted(NAMED_TEMPLATES)}"
        ) from None


def role_template(source: ChatTemplate | None) -> RoleTemplate:
    """The model's roles, or PLAIN (with a warning) when it has no usable template."""
    if source is None:
        return PLAIN
    try:
        return derive(source)
    except Exception as e:  # noqa: BLE001 - any template failure falls back, loudly
        logger.warning("cannot derive roles from the chat template (%s); using 'plain'", e)
        return PLAIN


def derive(source: ChatTemplate) -> RoleTemplate:
    """Cut renders of growing conversations at their sentinels. Raises ValueError when the
    template does not render a conversation as a concatenation of its messages. A template
    without a system role (it refuses one) gets the plain template's system role."""

    def render(messages: list[tuple[str, str]], gen: bool = False) -> str:
        text = source.render([{"role": r, "content": c} for r, c in messages], gen)
        implicit = source.implicit_prefix
        return text[len(implicit) :] if implicit and text.startswith(implicit) else text

    sys, usr, ast = ("system", _S), ("user", _U), ("assistant", _A)
    system = _system_role(render, sys)
    start = [sys] if system is not None else []
    base = render(start) if start else ""
    r_u = render([*start, usr])
    r_ua = render([*start, usr, ast])
    usr_pre, usr_suf = _cut(_after(r_u, base), _U)
    ast_pre = _after(render([*start, usr], gen=True), r_u)  # may be empty ([INST] templates)
    _, ast_suf = _cut(_after(r_ua, r_u), _A)
    first: dict[str, str] = {}
    if system is None:
        system = (PLAIN.prefixes["system"], PLAIN.suffixes["system"])
        first["user"] = usr_pre
        usr_pre = _later_user_prefix(render, [usr, ast], r_ua) or usr_pre
    else:
        first["system"] = system[0]
        first_user = _first_prefix(render, usr, usr_suf)
        if first_user is not None:
            first["user"] = first_user
    return RoleTemplate(
        source.name,
        {"system": system[0], "user": usr_pre, "assistant": ast_pre},
        {"system": system[1], "user": usr_suf, "assistant": ast_suf},
        first,
    )


def _system_role(render, message: tuple[str, str]) -> tuple[str, str] | None:
    try:
        text = render([message])
    except Exception:  # noqa: BLE001 - templates that refuse a system message
        return None
    return _cut(text, message[1])


def _later_user_prefix(render, history: list[tuple[str, str]], rendered: str) -> str | None:
    """The prefix of a user message after the first exchange (None if not derivable)."""
    try:
        text = render([*history, ("user", _U2)])
        return _cut(_after(text, rendered), _U2)[0]
    except Exception:  # noqa: BLE001 - keep the first user prefix then
        return None


def _first_prefix(render, message: tuple[str, str], suffix: str) -> str | None:
    """The prefix of `message` opening a conversation (a default system prompt may come with
    it); None when the template refuses such a conversation."""
    try:
        text = render([message])
    except Exception:  # noqa: BLE001 - e.g. templates that require a system message
        return None
    pre, suf = _cut(text, message[1])
    return pre if suf == suffix else None


def _cut(text: str, sentinel: str) -> tuple[str, str]:
    i = text.find(sentinel)
    if i < 0 or text.find(sentinel, i + 1) >= 0:
        raise ValueError(f"the template does not write the message content {sentinel!r} once")
    return text[:i], text[i + len(sentinel) :]


def _after(longer: str, shorter: str) -> str:
    if not longer.startswith(shorter):
        raise ValueError("rendering a longer conversation changes the text of earlier messages")
    return longer[len(shorter) :]
