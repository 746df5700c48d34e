"""Stopping a model that loops on whitespace inside JSON.

JSON grammars allow any whitespace between elements, as JSON does. A model can then
write blank lines forever (small models do, and a dummy-weight model's random walk
mostly picks whitespace where structure comes next). The grammars once capped each gap
at a number of characters, but a counted cap makes every state between elements depend
on the count, and their masks several times slower to compute (benchmarks/RESULTS.md,
2026-12-03). The cap lives here instead, at the token level: once a JSON-constrained
request's last MAX_RUN tokens are whitespace only (JSON's four whitespace characters),
its next mask also excludes whitespace-only tokens, so the next token makes progress.

Sound by construction: the guard only removes tokens from a mask the grammar filled, and
keeps the grammar's mask as it is when removing them would leave no token allowed (a
string whose pattern needs more whitespace). Inside JSON strings whitespace is content:
a run of MAX_RUN whitespace-only tokens there is stopped the same way, and the string
goes on with any token that holds something else.
"""

from __future__ import annotations

import torch

from loom.constrain import bitmask as masks

JSON_WHITESPACE = frozenset(" \t\n\r")
MAX_RUN = 8  # an indented gap takes one or two tokens (a newline, the indent)


def whitespace_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids below vocab_size whose text is one or more JSON whitespace characters."""
    ids = range(min(vocab_size, len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [i for i, text in zip(ids, texts) if text and set(text) <= JSON_WHITESPACE]


class WhitespaceGuard:
    def __init__(self, token_ids: list[int], vocab_size: int, max_run: int = MAX_RUN):
        self.token_ids = frozenset(token_ids)
        self.max_run = max_run
        keep = masks.allocate(1, vocab_size)[0]
        for token in token_ids:  # int32 words: clear bit b of word w
            keep[token // 32] &= ~(1 << (token % 32))
        self.keep = keep

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int) -> WhitespaceGuard:
        return cls(whitespace_token_ids(tokenizer, vocab_size), vocab_size)

    def looping(self, output_ids: list[int]) -> bool:
        """The last max_run tokens are all whitespace only."""
        if not output_ids or output_ids[-1] not in self.token_ids:  # the usual case, fast
            return False
        tail = output_ids[-self.max_run :]
        return len(tail) == self.max_run and all(t in self.token_ids for t in tail)

    def restrict(self, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Remove whitespace-only tokens from these rows of a filled CPU bitmask, but from
        none whose grammar allows nothing else. Runs on the fill's thread: the sampler's
        bitmasks are inference tensors, writable only in inference mode."""
        with torch.inference_mode():
            for row in rows:
                kept = bitmask[row] & self.keep
                if kept.any():
                    bitmask[row] = kept
