r"""Shared-prefix workload (SGLang's generated-shared-prefix): groups of prompts that share
a long system prompt, each with its own question. Runs loom with the radix cache on and
off in one process and prints throughput and cache-hit rate.

    python benchmarks/bench_shared_prefix.py --num-groups 8 --prompts-per-group 8 \
        --system-prompt-len 256 --question-len 32 --output-len 16
"""

from __future__ import annotations

import argparse
import time

import smoke
import torch

from loom.runtime.engine import Engine

SMOKE = dict(
    device="cpu",
    max_total_tokens=1024,
    num_groups=1,
    prompts_per_group=2,
    system_prompt_len=16,
    question_len=4,
    output_len=4,
)


def make_prompts(args, vocab_size: int, special: set[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    pool = torch.tensor([t for t in range(vocab_size) if t not in special])

    def draw(n: int) -> list[int]:
        return pool[torch.randint(0, len(pool), (n,), generator=g)].tolist()

    prompts = []
    for _ in range(args.num_groups):
        system = draw(args.system_prompt_len)
        prompts += [system + draw(args.question_len) for _ in range(args.prompts_per_group)]
    # Interleave groups so arrival order does not hand the cache its best case.
    order = torch.randperm(len(prompts), generator=g).tolist()
    return [prompts[i] for i in order]


def run(args, disable_cache: bool) -> dict:
    engine_args = dict(
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        disable_radix_cache=disable_cache,
        grammar_backend="none",
        tokenizer_path=args.tokenizer_path,
    )
    if args.max_total_tokens:
        engine_args["max_total_tokens"] = args.max_total_tokens
    with Engine(args.model_path, **engine_args) as engine:
        tok = engine.tokenizer
        prompts = make_prompts(args, engine.info.vocab_size, set(tok.all_special_ids))
        params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": args.output_len}
        engine.generate(input_ids=prompts[0][:8], sampling_params={**params, "max_new_tokens": 2})
        engine.flush_cache()  # the warm-up must not seed the cache
        before = engine.get_server_info()
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - start
        after = engine.get_server_info()
    prompt_tokens = after.prompt_tokens_total - before.prompt_tokens_total
    hits = after.cache_hit_tokens - before.cache_hit_tokens
    output_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "cache": "off" if disable_cache else "on",
        "requests": len(prompts),
        "seconds": elapsed,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "req_s": len(prompts) / elapsed,
        "hit_rate": hits / max(prompt_tokens, 1),
        "outputs": [o["output_ids"] for o in outs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--num-groups", type=int, default=8)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = smoke.parse_args(p, SMOKE)
    rows = [run(args, disable_cache=False), run(args, disable_cache=True)]
    same = rows[0]["outputs"] == rows[1]["outputs"]
    print(
        f"\nshared prefix: {args.num_groups} groups x {args.prompts_per_group} prompts, "
        f"system {args.system_prompt_len}, question {args.question_len}, "
        f"output {args.output_len} tokens"
    )
    print(
        f"{'cache':>6} {'reqs':>5} {'time s':>8} {'out tok/s':>10} {'total tok/s':>12} "
        f"{'req/s':>7} {'hit rate':>9}"
    )
    for r in rows:
        print(
            f"{r['cache']:>6} {r['requests']:>5} {r['seconds']:>8.2f} {r['output_tok_s']:>10.1f} "
            f"{r['total_tok_s']:>12.1f} {r['req_s']:>7.2f} {r['hit_rate']:>9.1%}"
        )
    print(
        f"speedup with cache: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x; "
        f"greedy outputs identical: {same}"
    )


if __name__ == "__main__":
    main()
