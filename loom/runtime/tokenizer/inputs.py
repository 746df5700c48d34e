"""A generate call (single or batch, text or ids) -> validated per-completion requests.

Everything a caller can get wrong is checked here, before anything reaches the scheduler,
so a bad request never touches its state.
"""

from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass
from typing import Any

from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import InvalidRequestError, SamplingParams, is_valid_unicode

MAX_TOP_LOGPROBS = 64


@dataclass
class GenerateInput:
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False


@dataclass
class Item:
    """One completion: `index` is its place in the caller's (flattened) result list.
    `names` are the ids it is known by, outermost first, ending with its own
    (request.rid): the caller's rid, then those loom derived from it for a batch
    (`rid-p<i>`) and for n > 1 (`...-<j>`). Aborting any of them aborts it; no other
    request answers to them."""

    index: int
    request: GenerateRequest
    return_text_in_logprobs: bool
    names: tuple[str, ...]


class InputLimits:
    def __init__(
        self,
        tokenizer,
        context_len: int,
        max_total_tokens: int,
        vocab_size: int,
        grammar_check=None,
    ):
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.max_total_tokens = max_total_tokens  # the KV pool's size
        self.vocab_size = vocab_size
        self.grammar_check = grammar_check  # (kind, text, lenient) -> None or raises


def expand(obj: GenerateInput, limits: InputLimits) -> tuple[list[Item], bool]:
    """Returns the items and whether the caller asked with a batch (so expects a list)."""
    prompts, is_batch = _prompts(obj, limits.tokenizer)
    count = len(prompts)
    params = _per_prompt(obj.sampling_params, count, "sampling_params", default=None)
    names = _prompt_names(obj.rid, count, is_batch)
    logprob = _per_prompt(obj.return_logprob, count, "return_logprob", default=False)
    starts = _per_prompt(obj.logprob_start_len, count, "logprob_start_len", default=-1)
    tops = _per_prompt(obj.top_logprobs_num, count, "top_logprobs_num", default=0)
    if not all(isinstance(flag, bool) for flag in logprob):
        raise InvalidRequestError("return_logprob must be true or false (or a list of them)")
    items: list[Item] = []
    for i, ids in enumerate(prompts):
        where = f"prompt {i}" if is_batch else "the prompt"
        _check_prompt(ids, limits, where)
        sp = _sampling(params[i], limits)
        _check_new_tokens(params[i], sp, len(ids), limits, where)
        _check_logprob_args(starts[i], tops[i], len(ids))
        for j in range(sp.n):
            copy = sp if sp.n == 1 else SamplingParams(**{**sp.to_dict(), "n": 1})
            if sp.n > 1 and sp.seed is not None:
                copy.seed = sp.seed + j  # distinct yet reproducible completions
            own = names[i] if sp.n == 1 else (*names[i], f"{names[i][-1]}-{j}")
            req = GenerateRequest(own[-1], ids, copy, logprob[i], starts[i], tops[i], obj.stream)
            items.append(Item(len(items), req, obj.return_text_in_logprobs, own))
    _check_unique([item.request.rid for item in items])
    return items, is_batch or len(items) > 1  # n > 1 also answers with a list


def _prompt_names(rid: Any, count: int, is_batch: bool) -> list[tuple[str, ...]]:
    """Per prompt, the ids that name it: the caller's own for each prompt, or one for the
    whole batch and `rid-p<i>` derived from it; a fresh uuid where none is given."""
    rids = rid if isinstance(rid, list) else [rid]
    if not all(r is None or (isinstance(r, str) and is_valid_unicode(r)) for r in rids):
        raise InvalidRequestError("`rid` must be a string of valid Unicode (or a list of them)")
    if isinstance(rid, list):
        if len(rid) != count:
            raise InvalidRequestError(f"`rid` has {len(rid)} entries for {count} prompts")
        return [(r or uuid.uuid4().hex,) for r in rid]
    base = rid or uuid.uuid4().hex
    if not is_batch:
        return [(base,)]
    return [(base, f"{base}-p{i}") for i in range(count)]


def _check_unique(rids: list[str]) -> None:
    twice = sorted(r for r, count in collections.Counter(rids).items() if count > 1)
    if twice:
        raise InvalidRequestError(f"`rid` names more than one request {twice}; make each unique")


def _prompts(obj: GenerateInput, tokenizer) -> tuple[list[list[int]], bool]:
    if (obj.text is None) == (obj.input_ids is None):
        raise InvalidRequestError("give exactly one of `text` (or prompt) and `input_ids`")
    if obj.text is not None:
        texts = [obj.text] if isinstance(obj.text, str) else obj.text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("`text` must be a string or a list of strings")
        if not texts:
            raise InvalidRequestError("`text` is an empty list")
        if not all(is_valid_unicode(t) for t in texts):
            raise InvalidRequestError("`text` must be valid Unicode (a lone surrogate is not)")
        return [tokenizer(t).input_ids for t in texts], not isinstance(obj.text, str)
    ids = obj.input_ids
    if isinstance(ids, list) and ids and _all_ints(ids):
        return [list(ids)], False
    if isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids):
        if not all(_all_ints(p) for p in ids):
            raise InvalidRequestError("`input_ids` must hold integers")
        return [list(p) for p in ids], True
    raise InvalidRequestError("`input_ids` must be a non-empty list of ints or of lists of ints")


def _all_ints(values: list) -> bool:
    """Whether every value is an int (not a bool). A batch of long prompts is many
    values: the exact-type test is the fast path, subclasses take the full one."""
    return all(type(x) is int for x in values) or all(_is_int(x) for x in values)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _per_prompt(value, count: int, name: str, default) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise InvalidRequestError(f"`{name}` has {len(value)} entries for {count} prompts")
        return value
    return [value if value is not None else default] * count


def _check_prompt(ids: list[int], limits: InputLimits, where: str) -> None:
    """A prompt that can never run is refused here: past the context, past the KV pool
    (the pool holds every token of a running request, so such a prompt could never be
    admitted), or holding ids outside the vocabulary."""
    if not ids:
        raise InvalidRequestError(f"{where} is empty")
    if len(ids) >= limits.context_len:
        raise InvalidRequestError(
            f"{where} has {len(ids)} tokens, but the context length is {limits.context_len}; "
            "shorten it (or start the server with a larger --context-length)"
        )
    if len(ids) >= limits.max_total_tokens:
        raise InvalidRequestError(
            f"{where} has {len(ids)} tokens, but the KV cache holds "
            f"{limits.max_total_tokens} tokens in all; "
            "shorten it (or start the server with a larger --max-total-tokens)"
        )
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        raise InvalidRequestError(
            f"{where} has token ids outside [0, {limits.vocab_size}): {bad[:5]}"
        )


def _sampling(d: Any, limits: InputLimits) -> SamplingParams:
    if d is not None and not isinstance(d, dict):
        raise InvalidRequestError("`sampling_params` must be an object (or a list of them)")
    d = dict(d or {})
    schema = d.get("json_schema")
    if schema is not None and not isinstance(schema, str):
        import json

        d["json_schema"] = json.dumps(schema)  # accept a dict as well as a JSON string
    params = SamplingParams.from_dict(d)
    constraint = params.constraint
    if constraint is not None and limits.grammar_check is not None:
        try:
            limits.grammar_check(*constraint, params.json_schema_lenient)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
    return params


def _check_new_tokens(
    asked: Any, params: SamplingParams, prompt_len: int, limits: InputLimits, where: str
) -> None:
    """max_new_tokens, when given, must fit the context after the prompt: a request for
    more is a 400, as SGLang and vLLM (and the OpenAI routes here) answer it. Left unset,
    the default is cut at the context length while generating (finish reason length). A
    request that fits the context but not the KV pool runs until the pool is full and
    finishes with length then (scheduler.retract)."""
    if not isinstance(asked, dict) or asked.get("max_new_tokens") is None:
        return
    room = limits.context_len - prompt_len
    if params.max_new_tokens > room:
        raise InvalidRequestError(
            f"max_new_tokens is {params.max_new_tokens}, but {where} has {prompt_len} tokens "
            f"and the context length is {limits.context_len}; lower max_new_tokens to at most "
            f"{room} (or shorten the prompt)"
        )


def _check_logprob_args(start: Any, top: Any, prompt_len: int) -> None:
    if not _is_int(start) or start < -1 or start >= prompt_len:
        raise InvalidRequestError(
            f"logprob_start_len must be -1 (no prompt logprobs) or in [0, {prompt_len}), "
            f"got {start!r}"
        )
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {top!r}"
        )
