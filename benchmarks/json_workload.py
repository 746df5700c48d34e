"""bench_json's workload: the schemas its requests ask for, and recorded walks forced as
the model's tokens.

With dummy weights a model's tokens are a random walk through the grammar, lingering in
states no real model visits. A replay forces instead the tokens of real JSON outputs, in
the json and the plain run alike: the device still runs each forward, mask and sampling,
and the grammar follows what a real model writes. Two sources of walks:

- person: 64 outputs of a real model for the person schema (data/person_walks.json);
- jsonschemabench: real-world schemas of JSONSchemaBench's dev split (vendored in
  tests/data), each walked along one of its own valid instances, written as json.dumps
  writes it (the spacing models use).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

from loom.runtime.scheduler import sampling
from loom.runtime.scheduler.scheduler import Scheduler

DATA = Path(__file__).parent / "data"
WALKS = DATA / "person_walks.json"
JSONSCHEMABENCH = Path(__file__).parents[1] / "tests" / "data" / "jsonschemabench-dev.jsonl.gz"

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


def accepted_whole(backend, schema: dict, ids: list[int]) -> bool:
    matcher = backend.get_matcher("json_schema", json.dumps(schema)).result()
    return all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()


def person_walks(tokenizer, backend, schema: dict, stop: int) -> list[list[int]]:
    """The recorded person outputs as token ids of this tokenizer (each ends with a stop
    token), those the backend's grammar accepts whole."""
    walks = []
    for text in json.loads(WALKS.read_text())["texts"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [stop]
        if accepted_whole(backend, schema, ids):
            walks.append(ids)
    if not walks:
        raise SystemExit("the grammar accepts none of the recorded walks")
    return walks


def jsonschemabench_cases(
    tokenizer, backend, stop: int, count: int, max_tokens: int, seed: int = 0
) -> list[tuple[str, dict, list[int]]]:
    """`count` (prompt, schema, walk) cases drawn at random (fixed seed) from the dev
    split: schemas the backend compiles, with a valid instance of at most `max_tokens`
    tokens that its grammar accepts whole. One case per schema."""
    rows = [json.loads(line) for line in gzip.open(JSONSCHEMABENCH, "rt")]
    random.Random(seed).shuffle(rows)
    cases = []
    for row in rows:
        schema = row["schema"]
        instances = [t["data"] for t in row["tests"] if t["valid"]]
        if not instances or not isinstance(schema, dict):
            continue
        try:
            backend.validate("json_schema", json.dumps(schema))
        except Exception:  # refused (a keyword the backend cannot enforce): not drawn
            continue
        ids = tokenizer(json.dumps(instances[0]), add_special_tokens=False).input_ids + [stop]
        if 8 <= len(ids) <= max_tokens and accepted_whole(backend, schema, ids):
            prompt = f"Write JSON for this schema ({row['split']}): {json.dumps(schema)[:200]}"
            cases.append((prompt, schema, ids))
        if len(cases) == count:
            return cases
    raise SystemExit(f"only {len(cases)} dev-split schemas fit; ask for fewer")
