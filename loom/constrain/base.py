"""The grammar-backend interface the scheduler talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

import torch


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
    """Compiles constraints (cached, off the caller's thread) and applies token masks."""

    @abstractmethod
    def validate(self, kind: str, text: str, lenient: bool = False) -> None:
        """Cheap up-front check (malformed schema, unsupported keyword, bad regex);
        raises GrammarError naming the problem. Called before a request is scheduled."""

    @abstractmethod
    def get_matcher(self, kind: str, text: str) -> Future[GrammarMatcher]:
        """A future matcher; compilation is cached by (kind, text) and runs in a thread pool.
        The future raises GrammarError when the constraint does not compile."""

    @abstractmethod
    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU bitmask with one row per request of a batch."""

    @abstractmethod
    def apply_bitmask(
        self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None
    ) -> None:
        """Set disallowed logits to -inf in place, on the logits' device; only `rows`
        (all rows when None) are masked."""

    def shutdown(self) -> None:
        """Stop the compile threads."""
