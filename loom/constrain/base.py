"""The grammar-backend interface the scheduler talks to."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loom.constrain import bitmask as masks


class GrammarError(ValueError):
    """A constraint that cannot be compiled or honoured; the message says what to fix."""


class GrammarMatcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar forbids it (state unchanged)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token mask of the next step into row `row` of a CPU bitmask."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar reached an accepting end (the stop token was accepted)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens."""

    @abstractmethod
    def find_jump_forward_string(self) -> str:
        """Text the grammar forces next, whatever the model would choose ('' if none)."""


class GrammarBackend(ABC):
    """Compiles constraints (cached, off the caller's thread) and fills token masks.

    Every backend writes the same bitmask layout (bitmask.py), so one step's rows may
    come from matchers of different backends."""

    name: str
    vocab_size: int
    matcher_type: type[GrammarMatcher]
    _filler: ThreadPoolExecutor | None = None  # start_fill's thread, made on first use

    @abstractmethod
    def validate(self, kind: str, text: str, lenient: bool = False) -> None:
        """Cheap up-front check (malformed schema, unsupported keyword, bad regex);
        raises GrammarError naming the problem. Called before a request is scheduled."""

    @abstractmethod
    def get_matcher(self, kind: str, text: str, lenient: bool = False) -> Future[GrammarMatcher]:
        """A future matcher; compilation is cached by (kind, text) and runs in a thread pool.
        The future raises GrammarError when the constraint does not compile. `lenient`: a
        JSON schema whose unenforceable keywords are dropped (the output is validated
        afterwards)."""

    def fill_bitmasks(
        self, matchers: list[GrammarMatcher], rows: list[int], bitmask: torch.Tensor
    ) -> None:
        """Fill row rows[i] of a CPU bitmask for matchers[i] (this backend's matchers).
        Backends override this to fill the rows in parallel, off the GIL."""
        for matcher, row in zip(matchers, rows):
            matcher.fill_bitmask(bitmask, row)

    def start_fill(
        self,
        matchers: list[GrammarMatcher],
        rows: list[int],
        bitmask: torch.Tensor,
        then: Callable[[], None] | None = None,
    ) -> Future[None]:
        """fill_bitmasks on a background thread, then `then()` there: both libraries fill
        without the GIL, so the caller's own work (the scheduler's bookkeeping of a step)
        runs meanwhile. Fills run one at a time, in the order started."""
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix=f"loom-{self.name}-fill")

        def fill() -> None:
            self.fill_bitmasks(matchers, rows, bitmask)
            if then is not None:
                then()

        return self._filler.submit(fill)

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU bitmask with one row per request of a batch."""
        return masks.allocate(batch_size, self.vocab_size)

    def apply_bitmask(
        self,
        logits: torch.Tensor,
        bitmask: torch.Tensor,
        rows: list[int] | torch.Tensor | None = None,
    ) -> None:
        """Set disallowed logits to -inf in place, on the logits' device; only `rows`
        (all rows when None) are masked."""
        masks.apply(logits, bitmask, self.vocab_size, rows)

    def shutdown(self) -> None:
        """Stop the compile and fill threads."""
        if self._filler is not None:
            self._filler.shutdown(wait=True)
            self._filler = None


def default_mask_threads() -> int:
    """Threads that fill one step's masks: the cores this process may use but one (the
    scheduler's own thread keeps working while they fill), at most 8: past 8 threads the
    threads' start and join cost what they save (xgrammar_backend.ROWS_PER_THREAD). One
    row of a 128k vocabulary takes tens to hundreds of microseconds."""
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))
