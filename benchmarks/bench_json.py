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

`mask us/row` is the time of filling the masks (backend.fill_bitmasks, on its own
threads) over the rows filled; it is overlapped with the forward and with the scheduler's
bookkeeping, so json / plain is the figure that counts. `apply ms/step` is the time the
scheduler spends waiting for the fill to end and queuing the masks; `wait ms/step` the
time it waits for the device to hand it a step's tokens: near zero means the host, not
the device, sets the pace.

Walks (--walks): with dummy weights the model's tokens are a random walk through the
grammar, which lingers in states no real model visits (hundreds of tokens inside an
email's local part, the most expensive mask state of the person schema). `--walks replay`
forces instead the tokens of real outputs recorded for the person schema
(benchmarks/data/person_walks.json, Qwen2.5-Coder-0.5B-Instruct), in the json and the plain
run alike: the device still runs each forward, mask and sampling, and the grammar follows
what a real model writes.

    python benchmarks/bench_json.py --schemas person --concurrency 1 16 64 256 \
        --grammar-backends xgrammar llguidance --max-new-tokens 160 --walks model replay
    python benchmarks/bench_json.py --smoke        (CI: on CPU, two short requests)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import smoke
import torch

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.models.model_source import resolve_model_path
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler import sampling
from loom.runtime.scheduler.scheduler import Scheduler

WALKS = Path(__file__).parent / "data" / "person_walks.json"

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
    schemas="person",
    jump_forward=True,
    walks=["model", "replay"],
)


@dataclass
class Run:
    name: str
    seconds: float
    steps: int
    tokens: int
    outputs: list[list[int]]
    mask_seconds: float = 0.0  # time filling bitmasks, summed over the run
    mask_rows: int = 0  # rows filled (a verified draft fills one per row)
    wait_seconds: float = 0.0  # the scheduler waiting for a step's tokens
    apply_seconds: float = 0.0  # the scheduler waiting for the masks, then queuing them
    walk: str = "model"
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


def timed_waits(sched: Scheduler, run: Run):
    """Time the scheduler's waits for the device (SampledStep.read) and for the masks
    (StepSampler._apply_grammar_masks: the fill's end, then queuing upload and apply);
    undo with the result."""
    read, apply = sampling.SampledStep.read, sched.sampler._apply_grammar_masks

    def timed_read(step):
        start = time.perf_counter()
        tokens = read(step)
        run.wait_seconds += time.perf_counter() - start
        return tokens

    def timed_apply(*args):
        start = time.perf_counter()
        apply(*args)
        run.apply_seconds += time.perf_counter() - start

    sampling.SampledStep.read = timed_read
    sched.sampler._apply_grammar_masks = timed_apply

    def undo():
        sampling.SampledStep.read = read
        del sched.sampler._apply_grammar_masks

    return undo


class Replay:
    """Forces each request's sampled tokens to a recorded walk (its rid's token ids,
    ending with a stop token), after the step's real sampling has run on the device."""

    def __init__(self, sched: Scheduler, walks: dict[str, list[int]]):
        self.sched, self.walks = sched, walks

    def __enter__(self):
        sampler, walks, device = self.sched.sampler, self.walks, self.sched.device
        inner_step, inner_sample = sampler.sample, sampling.sample
        stop = min(self.sched.eos_ids)
        current: list = []

        def forced(logits, sb):
            inner_sample(logits, sb)
            ids = []
            for req in current:
                walk, at = walks.get(req.rid, []), len(req.output_ids) + req.pending - 1
                ids.append(walk[at] if at < len(walk) else stop)
            return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)

        def sample_step(step):
            current[:] = step.reqs
            return inner_step(step)

        sampler.sample, sampling.sample = sample_step, forced
        self._undo = lambda: (delattr(sampler, "sample"), setattr(sampling, "sample", inner_sample))
        return self

    def __exit__(self, *exc):
        self._undo()


def replay_walks(tokenizer, backend, n: int, stop: int) -> list[list[int]]:
    """The recorded person outputs as token ids of this tokenizer (each ends with a stop
    token), those the backend's grammar accepts whole; request i replays walk i % len."""
    texts = json.loads(WALKS.read_text())["texts"]
    walks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [stop]
        matcher = backend.get_matcher("json_schema", json.dumps(PERSON[1])).result()
        if all(matcher.accept_token(t) for t in ids):
            walks.append(ids)
    if not walks:
        raise SystemExit("the grammar accepts none of the recorded walks")
    return [walks[i % len(walks)] for i in range(n)]


def run_once(
    sched: Scheduler,
    name: str,
    reqs: list[m.GenerateRequest],
    concurrency: int,
    walks: list[list[int]] | None = None,
) -> Run:
    for req in reqs:  # compile grammars (cached) before the clock starts
        if req.sampling.constraint:
            sched.grammar.get_matcher(*req.sampling.constraint).result()
    before = sched.server_info()
    run = Run(name, 0.0, 0, 0, [])
    timed_masks(sched, run)
    untime_waits = timed_waits(sched, run)
    replay = Replay(sched, {r.rid: w for r, w in zip(reqs, walks)}) if walks else None
    if replay is not None:
        replay.__enter__()
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
    untime_waits()
    if replay is not None:
        replay.__exit__()
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
    p.add_argument(
        "--walks",
        nargs="+",
        choices=("model", "replay"),
        default=["model"],
        help="model: the model's own tokens; replay: recorded real outputs (person schema)",
    )
    p.add_argument("--mask-threads", type=int, default=None, help="grammar mask fill threads")
    p.add_argument(
        "--mask-start",
        choices=("early", "late"),
        default="early",
        help="early (loom's way): a step's mask fill starts once the grammars took the "
        "previous tokens, beside the rest of the bookkeeping; late: when the step samples "
        "(an A/B of that overlap)",
    )
    p.add_argument(
        "--profile", action="store_true", help="print the scheduler thread's profile of json runs"
    )
    args = smoke.parse_args(p, SMOKE)
    folder = resolve_model_path(args.model_path)
    if "replay" in args.walks and args.schemas != "person":
        p.error("--walks replay replays outputs of the person schema: use --schemas person")
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
        grammar_mask_threads=args.mask_threads,
    )
    scheds = {False: Scheduler(ServerArgs(**common, enable_jump_forward=False), folder)}
    if args.jump_forward:
        scheds[True] = Scheduler(ServerArgs(**common, enable_jump_forward=True), folder)
    tokenizer = scheds[False].tokenizer
    for sched in scheds.values():
        if args.mask_start == "late":  # the step after is never handed to _process
            process = sched._process
            sched._process = lambda step, following=None, process=process: process(step)
        run_once(sched, "warm-up", make_requests(tokenizer, cases, 1, 4), 1)
    rows = []
    for walk in args.walks:
        for conc in args.concurrency:
            rows += run_concurrency(args, scheds, cases, backend, walk, conc)
    for sched in scheds.values():
        sched.grammar.shutdown()
    del scheds
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def run_concurrency(args, scheds, cases, backend: str, walk: str, conc: int) -> list:
    """plain, json (and json + jump-forward) at one concurrency and walk."""
    tokenizer = scheds[False].tokenizer
    n = args.num_requests or conc
    walks = None
    if walk == "replay":
        walks = replay_walks(tokenizer, scheds[False].grammar, n, min(scheds[False].eos_ids))
    max_new = args.max_new_tokens
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    json_off = run_once(
        scheds[False], "json", make_requests(tokenizer, cases, n, max_new), conc, walks
    )
    if profile is not None:
        profile.disable()
        print(f"## {backend}, {walk}, concurrency {conc}: the scheduler thread, json run")
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    lengths = [len(o) for o in json_off.outputs]
    plain = run_once(
        scheds[False],
        "plain, same lengths",
        make_requests(tokenizer, cases, n, 0, lengths),
        conc,
        walks,
    )
    runs = [plain, json_off]
    if args.jump_forward:
        json_on = run_once(
            scheds[True],
            "json + jump-forward",
            make_requests(tokenizer, cases, n, max_new),
            conc,
            walks,
        )
        check_jump_forward(json_on, json_off, conc, args.load_format)
        runs.append(json_on)
    for run in runs:
        run.walk = walk
    return [(backend, conc, run) for run in runs]


def check_jump_forward(json_on: Run, json_off: Run, conc: int, load_format: str) -> None:
    changed = sum(a != b for a, b in zip(json_on.outputs, json_off.outputs))
    if changed and load_format != "dummy":
        raise SystemExit(f"jump-forward changed the output at concurrency {conc}")
    if changed:  # random bf16 weights: near-flat logits flip argmax ties between kernels
        print(f"concurrency {conc}: {changed} outputs differ with jump-forward (dummy weights)")


def print_table(rows: list[tuple[str, int, Run]], file=None) -> None:
    out = functools.partial(print, file=file or sys.stdout, flush=True)
    out(
        "| backend | walk | conc | run | time s | tokens | tok/s | steps | tok/step | vs plain "
        "| mask ms/step | mask us/row | apply ms/step | wait ms/step | drafted | confirmed |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plain_s = {}
    for backend, conc, r in rows:
        if r.name.startswith("plain"):
            plain_s[backend, r.walk, conc] = r.seconds
        mask_step = 1000 * r.mask_seconds / r.steps
        mask_row = 1e6 * r.mask_seconds / r.mask_rows if r.mask_rows else 0.0
        ratio = r.seconds / plain_s[backend, r.walk, conc]
        out(
            f"| {backend} | {r.walk} | {conc} | {r.name} | {r.seconds:.2f} | {r.tokens} "
            f"| {r.tokens / r.seconds:.1f} | {r.steps} | {r.tokens / r.steps:.2f} | {ratio:.3f} "
            f"| {mask_step:.2f} | {mask_row:.0f} | {1000 * r.apply_seconds / r.steps:.2f} "
            f"| {1000 * r.wait_seconds / r.steps:.2f} "
            f"| {r.drafted} | {r.accepted} |"
        )


if __name__ == "__main__":
    main()
