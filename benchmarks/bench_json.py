"""JSON-schema decoding: throughput against unconstrained decoding of the same lengths,
jump-forward on and off, and the grammar mask's cost per step.

Runs the scheduler in this process (no server) so steps and mask time can be measured
inside the loop. For each concurrency level, the same chat prompts run three ways:

- json, jump-forward off: every token is a decode step with a grammar mask;
- json, jump-forward on: grammar-forced drafts verified in the decode step (the output
  must be identical to the run above; the script fails if it is not);
- plain: no grammar, each request forced to the length of its JSON output
  (min_new_tokens = max_new_tokens), so the model does the same work unmasked.

    python benchmarks/bench_json.py --concurrency 1 8 --max-new-tokens 96
    python benchmarks/bench_json.py --smoke        (CI: on CPU, two short requests)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import smoke
import torch

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.models.model_source import resolve_model_path
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler.scheduler import Scheduler

_STR = {"type": "string"}
_INT = {"type": "integer"}
CASES = [
    (
        "Describe a fictional person as JSON.",
        {
            "type": "object",
            "properties": {"name": _STR, "age": {"type": "integer", "minimum": 0}, "city": _STR},
            "required": ["name", "age", "city"],
        },
    ),
    (
        "Give the capital of France and its population as JSON.",
        {
            "type": "object",
            "properties": {"country": _STR, "capital": _STR, "population": _INT},
            "required": ["country", "capital", "population"],
        },
    ),
    (
        "Write a to-do item with up to three tags as JSON.",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "tags": {"type": "array", "items": _STR, "maxItems": 3},
                "priority": {"enum": ["low", "medium", "high"]},
                "done": {"type": "boolean"},
            },
            "required": ["title", "tags", "priority", "done"],
        },
    ),
    (
        "Describe a book as JSON.",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "author": {
                    "type": "object",
                    "properties": {"first_name": _STR, "last_name": _STR},
                    "required": ["first_name", "last_name"],
                },
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                "genre": {"enum": ["fiction", "non-fiction", "poetry", "science-fiction"]},
            },
            "required": ["title", "author", "year", "genre"],
        },
    ),
]

# Two short requests on CPU. The tokenizer must spell JSON: the default model's does, a tiny
# test model's word tokenizer does not.
SMOKE = dict(device="cpu", num_requests=2, concurrency=[2], max_new_tokens=8, max_total_tokens=2048)


@dataclass
class Run:
    name: str
    seconds: float
    steps: int
    tokens: int
    outputs: list[list[int]]
    mask_seconds: float = 0.0  # bitmask fill + apply, summed over the run
    mask_rows: int = 0  # constrained rows masked (a verified draft masks one per row)
    drafted: int = 0
    accepted: int = 0


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as a user turn of the model's chat template; as plain text for a tokenizer
    without one (the Llama-3 tokenizer of the dummy-weight GPU runs, a test's tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt).input_ids
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )


def make_requests(tokenizer, n: int, max_new: int, lengths=None) -> list[m.GenerateRequest]:
    reqs = []
    for i in range(n):
        prompt, schema = CASES[i % len(CASES)]
        ids = prompt_ids(tokenizer, prompt)
        if lengths is None:
            params = SamplingParams(
                temperature=0, max_new_tokens=max_new, json_schema=json.dumps(schema)
            )
        else:  # the same work without a grammar: exactly the JSON run's length
            params = SamplingParams(
                temperature=0, max_new_tokens=lengths[i], min_new_tokens=lengths[i], ignore_eos=True
            )
        reqs.append(m.GenerateRequest(f"r{i}", ids, params))
    return reqs


def timed_masks(sched: Scheduler, run: Run) -> None:
    """Wrap the scheduler's mask step (bitmask fill + apply) with a timer."""
    inner = sched.sampler._apply_grammar_masks

    def apply(reqs, rows, logits):  # rows: the indices in reqs of the rows to mask
        if logits.is_cuda:  # time the mask alone: not the forward queued before it
            torch.cuda.synchronize()
        start = time.perf_counter()
        inner(reqs, rows, logits)
        if logits.is_cuda:  # the apply kernel is queued: time it too
            torch.cuda.synchronize()
        run.mask_seconds += time.perf_counter() - start
        run.mask_rows += len(rows)

    sched.sampler._apply_grammar_masks = apply


def run_once(sched: Scheduler, name: str, reqs: list[m.GenerateRequest], concurrency: int) -> Run:
    for req in reqs:  # compile grammars (cached) before the clock starts
        if req.sampling.constraint:
            sched.grammar.get_matcher(*req.sampling.constraint).result()
    before = sched.server_info()
    run = Run(name, 0.0, 0, 0, [])
    timed_masks(sched, run)
    outs: dict[str, list[int]] = {r.rid: [] for r in reqs}
    start = time.perf_counter()
    for first in range(0, len(reqs), concurrency):
        for req in reqs[first : first + concurrency]:
            sched.add_request(req)
        while sched.has_work():
            sched.step()
            for o in sched.take_outputs():
                outs[o.rid].extend(o.new_token_ids)
    run.seconds = time.perf_counter() - start
    del sched.sampler._apply_grammar_masks
    after = sched.server_info()
    run.steps = after.forward_steps_total - before.forward_steps_total
    run.tokens = after.generation_tokens_total - before.generation_tokens_total
    run.drafted = after.jump_forward_draft_tokens_total - before.jump_forward_draft_tokens_total
    run.accepted = after.jump_forward_tokens_total - before.jump_forward_tokens_total
    run.outputs = [outs[r.rid] for r in reqs]
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None)
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (GPU runs)")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool of each run")
    args = smoke.parse_args(p, SMOKE)
    folder = resolve_model_path(args.model_path)
    common = dict(
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        disable_radix_cache=True,
        load_format=args.load_format,
        tokenizer_path=args.tokenizer_path,
    )
    off = Scheduler(ServerArgs(**common, enable_jump_forward=False), folder)
    on = Scheduler(ServerArgs(**common, enable_jump_forward=True), folder)
    tokenizer = off.tokenizer
    warm = make_requests(tokenizer, 1, 4)
    run_once(off, "warm-up", warm, 1), run_once(on, "warm-up", warm, 1)
    rows = []
    for conc in args.concurrency:
        json_off = run_once(
            off, "json", make_requests(tokenizer, args.num_requests, args.max_new_tokens), conc
        )
        json_on = run_once(
            on,
            "json + jump-forward",
            make_requests(tokenizer, args.num_requests, args.max_new_tokens),
            conc,
        )
        changed = sum(a != b for a, b in zip(json_on.outputs, json_off.outputs))
        if changed and args.load_format != "dummy":
            raise SystemExit(f"jump-forward changed the output at concurrency {conc}")
        if changed:  # random bf16 weights: near-flat logits flip argmax ties between kernels
            print(f"concurrency {conc}: {changed} outputs differ with jump-forward (dummy weights)")
        lengths = [len(o) for o in json_off.outputs]
        plain = run_once(
            off,
            "plain, same lengths",
            make_requests(tokenizer, args.num_requests, 0, lengths),
            conc,
        )
        rows += [(conc, r) for r in (plain, json_off, json_on)]
    print_table(rows)


def print_table(rows: list[tuple[int, Run]]) -> None:
    print(
        "| conc | run | time s | tokens | tok/s | steps | tok/step | mask ms/step "
        "| mask us/row | drafted | confirmed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for conc, r in rows:
        mask_step = 1000 * r.mask_seconds / r.steps
        mask_row = 1e6 * r.mask_seconds / r.mask_rows if r.mask_rows else 0.0
        print(
            f"| {conc} | {r.name} | {r.seconds:.2f} | {r.tokens} | {r.tokens / r.seconds:.1f} "
            f"| {r.steps} | {r.tokens / r.steps:.2f} | {mask_step:.2f} | {mask_row:.0f} "
            f"| {r.drafted} | {r.accepted} |"
        )


if __name__ == "__main__":
    main()
