"""The scheduler's parts that ServerArgs and the model decide: stop ids, prefix cache,
grammar backend, step sampler, prefill chunk size and limits; and the counters it keeps."""

from __future__ import annotations

import torch

from loom.radix.base import PrefixCache
from loom.runtime.args import ServerArgs
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.scheduler.admission import PrefillLimits


def eos_token_ids(config, tokenizer, folder: str) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(folder).eos_token_id
        ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    except OSError:
        pass
    return ids


def make_cache(args: ServerArgs, runner: ModelRunner) -> PrefixCache:
    if args.disable_radix_cache:
        from loom.radix.chunk_cache import ChunkCache

        return ChunkCache(runner.allocator)
    from loom.radix.cache import RadixCache

    return RadixCache(runner.allocator)


def make_grammar_backend(args: ServerArgs, tokenizer, vocab_size: int, eos_ids: set[int]):
    from loom.constrain.factory import create_grammar_backend

    return create_grammar_backend(
        args.grammar_backend,
        tokenizer,
        vocab_size,
        compile_timeout=args.grammar_compile_timeout,
        stop_token_ids=sorted(eos_ids),
        mask_threads=args.grammar_mask_threads,
    )


# The scheduler process's GIL switch interval (Python's default: 5 ms). A step's grammar
# masks fill on a background thread without the GIL, but that thread needs the GIL for a
# moment to start and to finish; while the scheduler thread runs Python, a waiting thread
# gets it only when the interval ends. With 5 ms the fill of a step started beside the
# step's bookkeeping ran after it, not beside it (a 1.9 ms fill submitted before 4 ms of
# Python work ended 1.6 ms after that work; at 1 ms and below it ended within it: this
# repository's 2-core machine, xgrammar, Qwen2.5 vocabulary). The scheduler process's other
# threads are idle compile workers, so the shorter interval costs nothing measurable.
GIL_SWITCH_INTERVAL_S = 0.0005

# Scheduler.stats: counters since start (server_info reports them).
STATS = (
    "cache_hit_tokens",
    "prompt_tokens",
    "generation_tokens",
    "retractions",
    "forward_steps",
    "deferred_steps",  # steps whose tokens were processed while the next ran (overlap)
    "mixed_steps",  # prefill steps that also decoded the running requests
    "early_decode_steps",  # decode steps built while the step before filled its masks
)


def step_sampler(runner: ModelRunner, grammar, tokenizer, eos_ids: set[int]):
    from loom.runtime.scheduler.sampling import StepSampler

    return StepSampler(
        grammar,
        runner.vocab_size,
        eos_ids,
        runner.req_to_token_pool.num_slots,
        runner.device,
        whitespace_guard(grammar, tokenizer, runner.vocab_size),
    )


def whitespace_guard(grammar, tokenizer, vocab_size: int):
    """The sampler's stop for whitespace loops in JSON output; None without a grammar."""
    if grammar is None:
        return None
    from loom.constrain.whitespace import WhitespaceGuard

    return WhitespaceGuard.for_tokenizer(tokenizer, vocab_size)


def chunk_size(args: ServerArgs, device: torch.device) -> int | None:
    size = args.chunked_prefill_size
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    return None if size <= 0 else size


def prefill_limits(args: ServerArgs, runner: ModelRunner) -> PrefillLimits:
    return PrefillLimits(
        max_prefill_tokens=args.max_prefill_tokens,
        chunk_size=chunk_size(args, runner.device),
        max_len=min(runner.context_len, runner.max_total_tokens),
        max_running_requests=runner.max_running_requests,
    )
