"""Jump-forward drafts: the tokens of the text a grammar forces next.

Where the grammar allows exactly one continuation (the `"name": ` after `{"` in a schema
with a fixed first key), its tokens are a draft the scheduler verifies in one forward
(loom.runtime.scheduler.jump_forward) instead of decoding them one step each.

The draft is the tokenizer's encoding of the forced text as it continues the output: the
model's tokens so far are final (they were sampled and verified), so nothing before the
boundary is retokenized. How the model really spells the forced text (`":` as one token
or `"` then `:`) is not known in advance; verification keeps whatever the model samples,
so a draft that spells it differently costs compute, never correctness.

Invariant: decode(output + draft) == decode(output) + forced, checked on the last few
tokens; when it cannot hold (a tokenizer that adds a prefix space, output ending inside
a multi-byte character) the draft is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Output tokens decoded before the draft; they absorb decoders that treat the first token
# of a sequence specially (SentencePiece drops its leading space there).
_ANCHOR_TOKENS = 4


def forced_tokens(tokenizer: Any, output_ids: Sequence[int], forced: str) -> list[int]:
    """Token ids spelling `forced` after `output_ids`, or [] when they cannot be told."""
    if not forced:
        return []
    anchor = list(output_ids[-_ANCHOR_TOKENS:])
    anchor_text = _decode(tokenizer, anchor)
    if anchor_text.endswith("\ufffd"):
        return []  # the output ends inside a character: the forced text does not start it
    ids = tokenizer.encode(forced, add_special_tokens=False)
    if _decode(tokenizer, anchor + ids) != anchor_text + forced:
        return []  # encoding the text alone changes it (a prefix space, a merge)
    return ids


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
