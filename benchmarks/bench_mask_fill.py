"""Grammar mask fill on the host: microseconds per row for one step of a batch, per backend,
vocabulary, grammar state mix and fill-thread count (no model, no device).

Rows are matchers of bench_json's person schema, each advanced to a state:
- replay: a random position of a recorded real output (benchmarks/data/person_walks.json),
  the states a real model's batch is in;
- email: inside an email's local part after random characters, where a dummy-weight
  model's random walk lingers (the most expensive state of the schema for xgrammar).

`us/row` is the wall time of one backend.fill_bitmasks call over the batch divided by its
rows (the scheduler's cost per row and step); `cpu us/row` multiplies by the threads (the
work one row costs). Compare one step's fill (`ms/step`) with the forward it must hide
behind.

    python benchmarks/bench_mask_fill.py --tokenizers ASSETS/tokenizer-llama3 \
        ASSETS/tokenizer-qwen2.5 --rows 1 16 64 256 --threads 1 4 8 15
    python benchmarks/bench_mask_fill.py --smoke     (CI: the default model's tokenizer)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import smoke
from json_workload import PERSON, WALKS
from transformers import AutoTokenizer

from loom.constrain.factory import create_grammar_backend
from loom.runtime.models.model_source import resolve_model_path

SMOKE = dict(tokenizers=[None], rows=[1, 4], threads=[1, 2], repeats=2)
EMAIL_PREFIX = '{"name": "Ann", "email": "qx'


def advanced(backend, schema: str, ids: list[int]):
    matcher = backend.get_matcher("json_schema", schema).result()
    for token in ids:
        if not matcher.accept_token(token):
            return None
    return matcher


def batch(backend, tokenizer, states: str, rows: int, seed: int = 0) -> list:
    """`rows` matchers in the named state mix."""
    schema = json.dumps(PERSON[1])
    rng = random.Random(seed)
    if states == "email":
        letters = "abcdefghijklmnopqrstuvwxyz0123456789._"
        out = []
        for _ in range(rows):
            text = EMAIL_PREFIX + "".join(rng.choice(letters) for _ in range(rng.randrange(12)))
            ids = tokenizer(text.replace("..", ".a"), add_special_tokens=False).input_ids
            out.append(advanced(backend, schema, ids))
        return [m for m in out if m is not None] or out
    walks = [tokenizer(t, add_special_tokens=False).input_ids for t in _texts()]
    out = []
    while len(out) < rows:
        walk = rng.choice(walks)
        matcher = advanced(backend, schema, walk[: rng.randrange(len(walk))])
        if matcher is not None:  # a walk this backend's grammar refuses is skipped
            out.append(matcher)
    return out


def _texts() -> list[str]:
    return json.loads(WALKS.read_text())["texts"]


def time_fill(backend, tokenizer, states: str, rows: int, repeats: int) -> float:
    """Median seconds of one fill of every row, each repeat on matchers never filled
    before (a matcher may keep its last mask until it moves), at other positions of the
    walks; a first batch warms what the compiled grammar builds lazily."""
    bitmask = backend.allocate_bitmask(rows)
    times = []
    for seed in range(repeats + 1):
        matchers = batch(backend, tokenizer, states, rows, seed)
        start = time.perf_counter()
        backend.fill_bitmasks(matchers, list(range(rows)), bitmask)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", nargs="+", default=[None], help="default: the default model's")
    p.add_argument("--backends", nargs="+", default=["xgrammar", "llguidance"])
    p.add_argument("--states", nargs="+", default=["replay", "email"])
    p.add_argument("--rows", type=int, nargs="+", default=[256])
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 4, 8, 15],
        help="most fill threads (xgrammar takes one per ROWS_PER_THREAD rows up to this)",
    )
    p.add_argument("--repeats", type=int, default=5)
    args = smoke.parse_args(p, SMOKE)
    print(
        "| tokenizer | vocab | backend | states | rows | threads | ms/step | us/row | cpu us/row |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.tokenizers:
        tokenizer = AutoTokenizer.from_pretrained(path or resolve_model_path(None))
        name = (path or "default model").rstrip("/").split("/")[-1]
        for backend_name in args.backends:
            for threads in args.threads:
                backend = create_grammar_backend(
                    backend_name, tokenizer, len(tokenizer), mask_threads=threads
                )
                for states in args.states:
                    for rows in args.rows:
                        seconds = time_fill(backend, tokenizer, states, rows, args.repeats)
                        per_row = 1e6 * seconds / rows
                        print(
                            f"| {name} | {len(tokenizer)} | {backend_name} | {states} | {rows} "
                            f"| {threads} | {1e3 * seconds:.2f} | {per_row:.1f} "
                            f"| {per_row * threads:.1f} |",
                            flush=True,
                        )
                backend.shutdown()


if __name__ == "__main__":
    main()
