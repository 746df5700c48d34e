"""Jump-forward: when the grammar forces the next text whatever the model picks (the
`"name": "` between two JSON fields), append it in one extend step instead of one decode
step per token.

The forced text is tokenized as the tokenizer would (loom.constrain.jump_forward) and
appended after the model's own tokens, minus its last token (see try_jump_forward).
"""

from __future__ import annotations

from loom.constrain.jump_forward import JumpForward, jump_forward_tokens
from loom.runtime.scheduler.kv_ops import KVOps
from loom.runtime.scheduler.request import Req


def try_jump_forward(req: Req, tokenizer, kv: KVOps) -> bool:
    """Splice the grammar's forced text onto req; True when req now needs an extend step."""
    forced = req.grammar.find_jump_forward_string()
    if not forced:
        return False
    # The model's own tokens stay (window 0): it conditions on what it chose. The forced
    # text's last token is held back so the model writes the boundary token itself: it may
    # merge with what follows (`":` rather than `"` then `:`), which the grammar cannot know.
    plan = jump_forward_tokens(tokenizer, req.output_ids, forced, window=0)
    if len(plan.token_ids) < 2:
        return False
    plan = JumpForward(plan.num_dropped, plan.token_ids[:-1])
    new_len = len(req.output_ids) - plan.num_dropped + len(plan.token_ids)
    if new_len >= req.sampling.max_new_tokens:
        return False  # the spliced text would overrun the budget: decode token by token
    keep = len(req.origin_input_ids) + len(req.output_ids) - plan.num_dropped
    if keep < len(req.prefix_indices):
        return False  # the tokens to replace sit in the shared cache: leave them
    req.grammar.rollback(plan.num_dropped)
    for token in plan.token_ids:
        if not req.grammar.accept_token(token):
            # The retokenized text must spell the forced string; if the grammar disagrees,
            # undo and continue token by token.
            req.grammar.rollback(plan.token_ids.index(token))
            dropped = req.output_ids[len(req.output_ids) - plan.num_dropped :]
            for t in dropped:
                req.grammar.accept_token(t)
            return False
    if plan.num_dropped:
        del req.output_ids[-plan.num_dropped :]
    req.output_ids.extend(plan.token_ids)
    kv.truncate(req, min(req.kv_len, keep))
    return True
