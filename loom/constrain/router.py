"""`--grammar-backend auto`: each constraint goes to the first backend that enforces it
exactly, so loom covers the union of what its backends cover.

JSON schemas try xgrammar first (its strict, declared-order grammars are what loom's
users and tests have relied on), then llguidance, which takes most of what loom's
xgrammar checks refuse (patternProperties, allOf, anyOf beside other keywords, open
additionalProperties, multipleOf, ...; benchmarks/RESULTS.md has the coverage). Regexes
try xgrammar, then llguidance, which adds inline flags ((?i)), named groups and Unicode
classes (\\p{L}); what neither compiles (look-around, backreferences, word boundaries)
is refused with xgrammar's reason, which names the feature. EBNF grammars go to xgrammar
alone: loom's documented EBNF dialect is xgrammar's (llguidance reads another). A
backend whose up-front check refuses a constraint is skipped; the error that comes back
when all refuse is the first backend's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from loom.constrain.base import GrammarBackend, GrammarError, GrammarMatcher
from loom.constrain.compile_cache import settle

ORDER = {
    "json_schema": ("xgrammar", "llguidance"),
    "json_object": ("xgrammar", "llguidance"),
    "regex": ("xgrammar", "llguidance"),
    "ebnf": ("xgrammar",),
}


class RoutingBackend(GrammarBackend):
    name = "auto"

    def __init__(self, backends: list[GrammarBackend]):
        self.backends = {b.name: b for b in backends}
        self.vocab_size = backends[0].vocab_size
        self._owner = {b.matcher_type: b for b in backends}
        self._choice: dict[tuple[str, str, bool], GrammarBackend] = {}
        self._lock = threading.Lock()

    def choose(self, kind: str, text: str, lenient: bool = False) -> GrammarBackend:
        """The backend that takes this constraint; raises the first refusal if none does."""
        key = (kind, text, lenient)
        with self._lock:
            chosen = self._choice.get(key)
        if chosen is not None:
            return chosen
        validators = {name: b.validate for name, b in self.backends.items()}
        chosen = self.backends[first_accepting(validators, kind, text, lenient)]
        with self._lock:
            if len(self._choice) > 4096:
                self._choice.clear()
            self._choice[key] = chosen
        return chosen

    def validate(self, kind: str, text: str, lenient: bool = False) -> None:
        self.choose(kind, text, lenient)

    def get_matcher(self, kind: str, text: str, lenient: bool = False) -> Future[GrammarMatcher]:
        """The chosen backend's matcher; if its compile fails (a limit the up-front check
        cannot see), the next backend in ORDER whose check accepts the constraint."""
        result: Future[GrammarMatcher] = Future()
        try:
            backend = self.choose(kind, text, lenient)
        except GrammarError as e:  # validated before it came here; fail this request alone
            result.set_exception(e)
            return result
        later = ORDER.get(kind, tuple(self.backends))
        rest = [
            self.backends[n] for n in later[later.index(backend.name) + 1 :] if n in self.backends
        ]
        self._try(backend, rest, kind, text, lenient, result)
        return result

    def _try(self, backend, rest, kind, text, lenient, result: Future) -> None:
        def done(attempt: Future) -> None:
            error = attempt.exception()
            if error is None:
                settle(result, result=attempt.result())
                return
            for nxt in rest:
                try:
                    nxt.validate(kind, text, lenient)
                except GrammarError:
                    continue
                self._try(nxt, rest[rest.index(nxt) + 1 :], kind, text, lenient, result)
                return
            settle(result, error=error)  # the first backend's reason

        backend.get_matcher(kind, text, lenient).add_done_callback(done)

    def fill_bitmasks(
        self, matchers: list[GrammarMatcher], rows: list[int], bitmask: torch.Tensor
    ) -> None:
        for backend, picked in self._by_owner(matchers):
            backend.fill_bitmasks([matchers[i] for i in picked], [rows[i] for i in picked], bitmask)

    def _by_owner(self, matchers: list[GrammarMatcher]) -> list[tuple[GrammarBackend, list[int]]]:
        """Each backend with the indices of its matchers."""
        groups: dict[type, list[int]] = {}
        for i, matcher in enumerate(matchers):
            groups.setdefault(type(matcher), []).append(i)
        return [(self._owner[kind], picked) for kind, picked in groups.items()]

    def shutdown(self) -> None:
        for backend in self.backends.values():
            backend.shutdown()
        super().shutdown()


def first_accepting(
    validators: dict[str, Callable[[str, str, bool], None]], kind: str, text: str, lenient: bool
) -> str:
    """The first backend in ORDER whose check accepts the constraint; raises the first
    refusal when none does."""
    errors = []
    for name in ORDER.get(kind, tuple(validators)):
        if name not in validators:
            continue
        try:
            validators[name](kind, text, lenient)
        except GrammarError as e:
            errors.append(e)
            continue
        return name
    raise errors[0] if errors else GrammarError(f"no grammar backend takes {kind}")
