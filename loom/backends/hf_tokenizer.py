"""What a backend holding the model's Hugging Face tokenizer can do locally: render the chat
template, and build / read the one batched request that scores `select` choices with the
token boundary between prompt and choice handled right."""

from __future__ import annotations

from dataclasses import dataclass

from loom.backends.base import ChatTemplate, ChoiceScore


def encode(tokenizer, text: str) -> list[int]:
    """Token ids exactly as the runtime tokenizes a text prompt."""
    return list(tokenizer(text).input_ids)


def chat_template_of(tokenizer) -> ChatTemplate | None:
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return ChatTemplate(render, implicit_prefix=_implicit_bos(tokenizer), source=source)


def _implicit_bos(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ""
    ids = encode(tokenizer, "a")
    return tokenizer.bos_token if ids and ids[0] == bos else ""


@dataclass(frozen=True)
class ChoiceBatch:
    """The scoring request: one prompt per choice (prompt + choice, tokenized whole), scored
    from `start`, then (when asked) one per choice with the choice alone after a BOS."""

    input_ids: list[list[int]]
    logprob_start_len: list[int]
    num_choices: int


def choice_batch(tokenizer, prompt: str, choices: list[str], unconditional: bool) -> ChoiceBatch:
    prompt_ids = encode(tokenizer, prompt)
    fulls = [encode(tokenizer, prompt + c) for c in choices]
    # Score from the first token where any prompt+choice tokenization leaves the prompt's:
    # a choice may merge with the prompt's last characters into one token, so scoring
    # "the choice's tokens" alone would condition on a token the model never saw.
    start = min(_common_prefix(prompt_ids, f) for f in fulls)
    start = min([start] + [len(f) - 1 for f in fulls])
    context = _context_token(tokenizer)
    if start < 1:  # nothing to condition on: put a BOS in front
        fulls = [[context, *f] for f in fulls]
        start += 1
    inputs, starts = fulls, [start] * len(fulls)
    if unconditional:
        for c in choices:
            inputs.append([context, *tokenizer(c, add_special_tokens=False).input_ids])
            starts.append(1)
    return ChoiceBatch(inputs, starts, len(choices))


def choice_scores(batch: ChoiceBatch, results: list[dict]) -> list[ChoiceScore]:
    """Read the per-choice logprobs out of the batch's results (in batch order)."""
    n = batch.num_choices
    cond = [_logprobs(r) for r in results[:n]]
    uncond = [_logprobs(r) for r in results[n:]] if len(results) > n else [None] * n
    return [
        ChoiceScore(
            tuple(lp for lp, _ in c),
            None if u is None else tuple(lp for lp, _ in u),
            tuple(t for _, t in c),
            r["meta_info"].get("prompt_tokens", 0),
            r["meta_info"].get("cached_tokens", 0),
        )
        for c, u, r in zip(cond, uncond, results)
    ]


def _logprobs(result: dict) -> list[tuple[float, str]]:
    entries = result["meta_info"].get("input_token_logprobs") or []
    return [(float(e[0]), e[2] or "") for e in entries if e[0] is not None]


def _context_token(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return tid
    return 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
