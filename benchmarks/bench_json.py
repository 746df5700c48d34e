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

Walks (--walks, json_workload.py): `model`, the dummy-weight model's own tokens (a random
walk through the grammar); `replay`, real JSON forced as the model's tokens in the json and
the plain run alike (recorded outputs of a real model for the person schema; for
`--schemas jsonschemabench`, real-world schemas of JSONSchemaBench's dev split each
walking one of its valid instances).

    python benchmarks/bench_json.py --schemas person --concurrency 1 16 64 256 \
        --grammar-backends xgrammar llguidance --max-new-tokens 160 --walks model replay
    python benchmarks/bench_json.py --schemas jsonschemabench --walks replay
    python benchmarks/bench_json.py --smoke        (CI: on CPU, two short requests)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from dataclasses import dataclass

import smoke
import torch
from json_workload import CASES, PERSON, Replay, jsonschemabench_cases, person_walks

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.models.model_source import resolve_model_path
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import sampling
from loom.runtime.scheduler.parts import GIL_SWITCH_INTERVAL_S
from loom.runtime.scheduler.scheduler import Scheduler

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
        prompt, schema = cases[i % len(cases)][:2]
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
    p.add_argument(
        "--schemas",
        choices=("person", "cases", "jsonschemabench"),
        default="person",
        help="jsonschemabench: --bench-schemas real-world schemas of the dev split, drawn "
        "among those the backend compiles, each replaying one of its valid instances",
    )
    p.add_argument("--bench-schemas", type=int, default=64)
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
        help="model: the model's own tokens; replay: recorded real outputs (person schema) "
        "or valid instances (jsonschemabench)",
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
        "--repeats",
        type=int,
        default=1,
        help="run json and plain this many times each, alternately; each row is the run of "
        "median time (runs on one machine vary by tens of percent at high concurrency)",
    )
    p.add_argument(
        "--gil-switch-ms",
        type=float,
        default=1000 * GIL_SWITCH_INTERVAL_S,
        help="the GIL switch interval (default: the scheduler process's, parts.py; "
        "Python's own is 5 ms)",
    )
    p.add_argument(
        "--early-decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build each decode step while the step before fills its masks "
        "(Scheduler._early_decode, loom's default; --no-early-decode for the A/B)",
    )
    p.add_argument(
        "--profile", action="store_true", help="print the scheduler thread's profile of each run"
    )
    args = smoke.parse_args(p, SMOKE)
    sys.setswitchinterval(args.gil_switch_ms / 1e3)
    folder = resolve_model_path(args.model_path)
    if "replay" in args.walks and args.schemas == "cases":
        p.error("--walks replay: recorded walks exist for --schemas person and jsonschemabench")
    cases = [PERSON] if args.schemas == "person" else CASES
    table = Table()  # each row printed as it is measured: a run cut short keeps its rows
    for backend in args.grammar_backends:
        run_backend(args, folder, backend, cases, table)


def run_backend(args, folder: str, backend: str, cases: list, table: Table) -> None:
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
    if args.schemas == "jsonschemabench":  # drawn among what this backend compiles
        stop = min(scheds[False].eos_ids)
        cases = jsonschemabench_cases(
            tokenizer, scheds[False].grammar, stop, args.bench_schemas, args.max_new_tokens
        )
    for sched in scheds.values():
        sched.early_decode = args.early_decode
        if args.mask_start == "late":  # the step after is never handed to _process
            process = sched._process
            sched._process = lambda step, following=None, process=process: process(step)
        run_once(sched, "warm-up", make_requests(tokenizer, cases, 1, 4), 1)
    for walk in args.walks:
        for conc in args.concurrency:
            for run in run_concurrency(args, scheds, cases, backend, walk, conc):
                table.add(backend, conc, run)
    for sched in scheds.values():
        sched.grammar.shutdown()
    del scheds
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_concurrency(args, scheds, cases, backend: str, walk: str, conc: int) -> list:
    """plain, json (and json + jump-forward) at one concurrency and walk."""
    tokenizer = scheds[False].tokenizer
    n = args.num_requests or conc
    walks = replayed(scheds[False], cases, n) if walk == "replay" else None
    max_new = args.max_new_tokens
    sched, title = scheds[False], f"{backend}, {walk}, concurrency {conc}: the scheduler thread"

    def json_run() -> Run:
        reqs = make_requests(tokenizer, cases, n, max_new)
        return run_once(sched, "json", reqs, conc, walks)

    def plain_run() -> Run:  # the same work unconstrained: the first json run's lengths
        reqs = make_requests(tokenizer, cases, n, 0, [len(o) for o in json_runs[0].outputs])
        return run_once(sched, "plain, same lengths", reqs, conc, walks)

    json_runs, plain_runs = [], []
    for _ in range(args.repeats):  # alternately, so drift on the machine hits both alike
        json_runs.append(profiled(args.profile, f"{title}, json run", json_run))
        plain_runs.append(profiled(args.profile, f"{title}, plain run", plain_run))
    json_off, plain = median_run(json_runs), median_run(plain_runs)
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
    return runs


def median_run(runs: list[Run]) -> Run:
    """The run of median time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def profiled(enabled: bool, title: str, run):
    """run(), with the profile of this thread printed (--profile)."""
    if not enabled:
        return run()
    profile = cProfile.Profile()
    profile.enable()
    result = run()
    profile.disable()
    print(f"## {title}")
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats("loom/", 30)
    return result


def replayed(sched: Scheduler, cases: list, n: int) -> list[list[int]]:
    """Request i's walk: a recorded person output, or its dev-split case's instance."""
    if len(cases[0]) == 3:
        walks = [walk for _, _, walk in cases]
    else:
        walks = person_walks(sched.tokenizer, sched.grammar, PERSON[1], min(sched.eos_ids))
    return [walks[i % len(walks)] for i in range(n)]


def check_jump_forward(json_on: Run, json_off: Run, conc: int, load_format: str) -> None:
    changed = sum(a != b for a, b in zip(json_on.outputs, json_off.outputs))
    if changed and load_format != "dummy":
        raise SystemExit(f"jump-forward changed the output at concurrency {conc}")
    if changed:  # random bf16 weights: near-flat logits flip argmax ties between kernels
        print(f"concurrency {conc}: {changed} outputs differ with jump-forward (dummy weights)")


class Table:
    """The results table, printed a row at a time; each json row is read against the plain
    run of its backend, walk and concurrency, printed before it."""

    def __init__(self):
        self.plain_seconds: dict[tuple, float] = {}
        print(
            "| backend | walk | conc | run | time s | tokens | tok/s | steps | tok/step "
            "| vs plain | mask ms/step | mask us/row | apply ms/step | wait ms/step "
            "| drafted | confirmed |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def add(self, backend: str, conc: int, r: Run) -> None:
        if r.name.startswith("plain"):
            self.plain_seconds[backend, r.walk, conc] = r.seconds
        mask_step = 1000 * r.mask_seconds / r.steps
        mask_row = 1e6 * r.mask_seconds / r.mask_rows if r.mask_rows else 0.0
        ratio = r.seconds / self.plain_seconds[backend, r.walk, conc]
        print(
            f"| {backend} | {r.walk} | {conc} | {r.name} | {r.seconds:.2f} | {r.tokens} "
            f"| {r.tokens / r.seconds:.1f} | {r.steps} | {r.tokens / r.steps:.2f} | {ratio:.3f} "
            f"| {mask_step:.2f} | {mask_row:.0f} | {1000 * r.apply_seconds / r.steps:.2f} "
            f"| {1000 * r.wait_seconds / r.steps:.2f} | {r.drafted} | {r.accepted} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
