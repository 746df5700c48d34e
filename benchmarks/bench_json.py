"""JSON-schema decoding: throughput against unconstrained decoding of the same lengths,
per grammar backend, and the host time the grammar masks take per row and step.

Runs the scheduler in this process (no server) so steps and mask time can be measured
inside the loop. For each backend and concurrency level, `concurrency` requests run at
once, each way:

- json: every token is a decode step with a grammar mask;
- json + jump-forward (--jump-forward): grammar-forced drafts verified in the decode step
  (the output must be identical to the run above; the script fails if it is not);
- plain: no grammar, each request forced to the length of its JSON output
  (min_new_tokens = max_new_tokens), so the model does the same work unmasked.

`mask us/row` is the host time of filling the masks (backend.fill_bitmasks) over the
rows filled; it is overlapped with the forward, so json / plain is the figure that counts.

    python benchmarks/bench_json.py --schemas person --concurrency 1 16 64 256 \
        --grammar-backends xgrammar llguidance --max-new-tokens 160
    python benchmarks/bench_json.py --smoke        (CI: on CPU, two short requests)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
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
# The 8-field person: length-limited strings, an email, patterns, an enum array,
# a nested object, an integer range.
PERSON = (
    "Describe a fictional person as JSON.",
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "email": {"type": "string", "format": "email"},
            "phone": {"type": "string", "pattern": "^[+]?[0-9][0-9 -]{6,14}[0-9]$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {
                "type": "array",
                "items": {"enum": ["friend", "work", "family", "other"]},
                "maxItems": 4,
            },
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "maxLength": 60},
                    "city": {"type": "string", "maxLength": 40},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
            },
            "active": {"type": "boolean"},
            "bio": {"type": "string", "maxLength": 200},
        },
        "required": ["name", "email", "phone", "age", "tags", "address", "active", "bio"],
    },
)
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
SMOKE = dict(
    device="cpu",
    concurrency=[2],
    max_new_tokens=8,
    max_total_tokens=2048,
    grammar_backends=["xgrammar", "llguidance"],
    schemas="cases",
    jump_forward=True,
)


@dataclass
class Run:
    name: str
    seconds: float
    steps: int
    tokens: int
    outputs: list[list[int]]
    mask_seconds: float = 0.0  # host time filling bitmasks, summed over the run
    mask_rows: int = 0  # rows filled (a verified draft fills one per row)
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


def make_requests(
    tokenizer, cases: list, n: int, max_new: int, lengths=None
) -> list[m.GenerateRequest]:
    reqs = []
    for i in range(n):
        prompt, schema = cases[i % len(cases)]
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
    """Time the host's mask fills. No device sync: the fill overlaps the forward, and a
    sync here would take that away."""
    inner = sched.grammar.fill_bitmasks

    def fill(matchers, rows, bitmask):
        start = time.perf_counter()
        inner(matchers, rows, bitmask)
        run.mask_seconds += time.perf_counter() - start
        run.mask_rows += len(rows)

    sched.grammar.fill_bitmasks = fill


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
    if sched.device.type == "cuda":
        torch.cuda.synchronize()
    run.seconds = time.perf_counter() - start
    del sched.grammar.fill_bitmasks
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
    p.add_argument("--num-requests", type=int, default=None, help="default: the concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--schemas", choices=("person", "cases"), default="person")
    p.add_argument("--grammar-backends", nargs="+", default=["auto"])
    p.add_argument("--jump-forward", action="store_true", help="also run with jump-forward")
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (GPU runs)")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--max-total-tokens", type=int, default=65536, help="KV pool of each run")
    args = smoke.parse_args(p, SMOKE)
    folder = resolve_model_path(args.model_path)
    cases = [PERSON] if args.schemas == "person" else CASES
    rows = []
    for backend in args.grammar_backends:
        rows += run_backend(args, folder, backend, cases)
        if backend != args.grammar_backends[-1]:  # in case a long GPU run is cut short
            print_table(rows, file=sys.stderr)
    print_table(rows)


def run_backend(args, folder: str, backend: str, cases: list) -> list[tuple[str, int, Run]]:
    common = dict(
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        disable_radix_cache=True,
        load_format=args.load_format,
        tokenizer_path=args.tokenizer_path,
        grammar_backend=backend,
    )
    scheds = {False: Scheduler(ServerArgs(**common, enable_jump_forward=False), folder)}
    if args.jump_forward:
        scheds[True] = Scheduler(ServerArgs(**common, enable_jump_forward=True), folder)
    tokenizer = scheds[False].tokenizer
    for sched in scheds.values():
        run_once(sched, "warm-up", make_requests(tokenizer, cases, 1, 4), 1)
    rows = []
    for conc in args.concurrency:
        n = args.num_requests or conc
        json_off = run_once(
            scheds[False], "json", make_requests(tokenizer, cases, n, args.max_new_tokens), conc
        )
        lengths = [len(o) for o in json_off.outputs]
        plain = run_once(
            scheds[False],
            "plain, same lengths",
            make_requests(tokenizer, cases, n, 0, lengths),
            conc,
        )
        rows += [(backend, conc, plain), (backend, conc, json_off)]
        if args.jump_forward:
            json_on = run_once(
                scheds[True],
                "json + jump-forward",
                make_requests(tokenizer, cases, n, args.max_new_tokens),
                conc,
            )
            check_jump_forward(json_on, json_off, conc, args.load_format)
            rows.append((backend, conc, json_on))
    for sched in scheds.values():
        sched.grammar.shutdown()
    del scheds
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def check_jump_forward(json_on: Run, json_off: Run, conc: int, load_format: str) -> None:
    changed = sum(a != b for a, b in zip(json_on.outputs, json_off.outputs))
    if changed and load_format != "dummy":
        raise SystemExit(f"jump-forward changed the output at concurrency {conc}")
    if changed:  # random bf16 weights: near-flat logits flip argmax ties between kernels
        print(f"concurrency {conc}: {changed} outputs differ with jump-forward (dummy weights)")


def print_table(rows: list[tuple[str, int, Run]], file=None) -> None:
    out = functools.partial(print, file=file or sys.stdout, flush=True)
    out(
        "| backend | conc | run | time s | tokens | tok/s | steps | tok/step | vs plain "
        "| mask ms/step | mask us/row | drafted | confirmed |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plain_s = {}
    for backend, conc, r in rows:
        if r.name.startswith("plain"):
            plain_s[backend, conc] = r.seconds
        mask_step = 1000 * r.mask_seconds / r.steps
        mask_row = 1e6 * r.mask_seconds / r.mask_rows if r.mask_rows else 0.0
        ratio = r.seconds / plain_s[backend, conc]
        out(
            f"| {backend} | {conc} | {r.name} | {r.seconds:.2f} | {r.tokens} "
            f"| {r.tokens / r.seconds:.1f} | {r.steps} | {r.tokens / r.steps:.2f} | {ratio:.3f} "
            f"| {mask_step:.2f} | {mask_row:.0f} | {r.drafted} | {r.accepted} |"
        )


if __name__ == "__main__":
    main()
