"""Every schema of JSONSchemaBench's dev split (tests/data/jsonschemabench-dev.jsonl.gz:
1,543 real-world schemas over 21 splits, with test instances) through loom's default
grammar choice (`auto`, strict): a schema loom compiles rejects every instance that
`jsonschema` finds invalid (fed as tokens, then the stop token), so no invalid output can
ever be generated; a schema it refuses gets an error that names the keyword, or the limit,
behind the refusal. Valid instances a strict grammar refuses (extra keys, compact literal
spelling, key order) are the documented narrowing, counted by
benchmarks/bench_schema_coverage.py, not failures here."""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from loom.constrain.base import GrammarError
from loom.constrain.factory import create_grammar_backend
from tests.grammar_helpers import make_tokenizer, model_vocab_size

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_schema_coverage import reference_verdict, refusal_reason  # noqa: E402

DATA = REPO / "tests" / "data" / "jsonschemabench-dev.jsonl.gz"


def _by_split() -> dict[str, list[dict]]:
    rows = defaultdict(list)
    with gzip.open(DATA, "rt") as f:
        for line in f:
            row = json.loads(line)
            rows[row["split"]].append(row)
    return rows


SPLITS = _by_split()


@pytest.fixture(scope="module")
def auto():
    tokenizer = make_tokenizer()
    backend = create_grammar_backend(
        "auto", tokenizer, model_vocab_size(tokenizer), compile_timeout=10.0, num_threads=2
    )
    yield backend, tokenizer
    backend.shutdown()


def test_the_dev_split_is_all_there():
    assert sum(map(len, SPLITS.values())) == 1543 and len(SPLITS) == 21


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_compiled_schemas_reject_every_invalid_instance_refused_ones_say_why(auto, split):
    backend, tokenizer = auto
    silent, unexplained, compiled = [], [], 0
    for row in SPLITS[split]:
        text = json.dumps(row["schema"])
        try:
            backend.validate("json_schema", text)
            backend.get_matcher("json_schema", text).result(timeout=15)
        except GrammarError as e:
            if refusal_reason(str(e)) in ("?", "exception", "crash"):
                unexplained.append(f"{row['id']}: {e}")
            continue
        compiled += 1
        for test in row["tests"]:
            if reference_verdict(row["schema"], test["data"]) is not False:
                continue
            matcher = backend.get_matcher("json_schema", text).result()
            ids = tokenizer.encode(json.dumps(test["data"])) + [tokenizer.eos_token_id]
            if all(matcher.accept_token(t) for t in ids):
                silent.append(f"{row['id']}: {json.dumps(test['data'])[:200]}")
    assert compiled, f"loom compiles none of {split}'s schemas"
    assert not silent, "invalid instances accepted:\n" + "\n".join(silent)
    assert not unexplained, "refusals that name no keyword:\n" + "\n".join(unexplained)
