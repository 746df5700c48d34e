"""The language's errors."""

from __future__ import annotations

from dataclasses import dataclass


class LoomError(Exception):
    """A program used the language wrongly; the message says how to fix it."""


class RoleError(LoomError):
    """Roles opened inside roles, closed without being opened, or left open."""


class ProgramError(LoomError):
    """A program failed while running. `__cause__` is the original exception (with its
    traceback); the message names the program and the line that submitted the failing
    expression when it ran on another thread (a fork branch)."""


@dataclass(frozen=True)
class CallSite:
    """Where the program submitted an expression (kept so an error raised later, on the
    executor's thread, can point back at the program's own line)."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f'File "{self.filename}", line {self.lineno}, in {self.function}'


class TraceStop(Exception):
    """Raised inside a traced program where a symbolic value cannot be followed."""
