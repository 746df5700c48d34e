"""Jump-forward: append the text a grammar forces, retokenized at the boundary.

Where the grammar allows exactly one continuation (the `"name": ` after `{"` in a schema
with a fixed first key), that text can be appended in one extend step instead of one
decode step per token. It cannot simply be tokenized on its own and appended: BPE merges
across the boundary, so the tokens the model already produced and the forced text's
first tokens would not be what the tokenizer gives for the joined text. Output `{"na`
(tokens `{"`, `na`) + forced `me": ` must become `{"`, `name`, `":`, ` ` and not
`{"`, `na`, `me`, `":`, ` `: a token sequence the model never saw in training, which
degrades what it writes next. So the last few output tokens are decoded, joined with the
forced text, re-encoded, and the tokens that differ are replaced.

Invariant: decode(kept output + appended ids) == decode(output) + forced, checked on a
local window; when no window satisfies it (a tokenizer that adds a prefix space, a
boundary inside a multi-byte character) nothing is jumped, which is always correct.
The appended ids end where the forced text ends: a merge between its last token and
text the model writes afterwards cannot be known yet (the grammar accepts either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Tokens decoded before the retokenized tail; they absorb decoders that treat the first
# token of a sequence specially (SentencePiece drops its leading space there).
_ANCHOR_TOKENS = 4


@dataclass(frozen=True)
class JumpForward:
    num_dropped: int  # trailing output tokens to remove (and roll back in the matcher)
    token_ids: list[int]  # ids to append after dropping them

    @property
    def is_noop(self) -> bool:
        return self.num_dropped == 0 and not self.token_ids


NO_JUMP = JumpForward(0, [])


def jump_forward_tokens(
    tokenizer: Any, output_ids: Sequence[int], forced: str, *, window: int = 4
) -> JumpForward:
    """How to splice `forced` onto `output_ids`: retokenize the last `window` tokens (or
    fewer, down to none) together with it, and keep the ids that did not change."""
    if not forced:
        return NO_JUMP
    for k in range(min(window, len(output_ids)), -1, -1):
        plan = _retokenize_tail(tokenizer, list(output_ids), k, forced)
        if plan is not None:
            return plan
    return NO_JUMP


def _retokenize_tail(tokenizer: Any, ids: list[int], k: int, forced: str) -> JumpForward | None:
    split = len(ids) - k
    anchor = ids[max(0, split - _ANCHOR_TOKENS) : split]
    tail = ids[split:]
    anchor_text = _decode(tokenizer, anchor)
    local_text = _decode(tokenizer, anchor + tail)
    if not local_text.startswith(anchor_text) or "\ufffd" in local_text:
        return None  # the split falls inside a character: try a smaller window
    tail_text = local_text[len(anchor_text) :]
    new_tail = tokenizer.encode(tail_text + forced, add_special_tokens=False)
    if _decode(tokenizer, anchor + new_tail) != local_text + forced:
        return None  # the tokenizer changes the text when encoding it alone
    same = _common_prefix(tail, new_tail)
    return JumpForward(num_dropped=k - same, token_ids=new_tail[same:])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n
