r"""The same programs through loom's frontend and SGLang's, against one loom server.

Both frontends send their requests to the same `loom serve` (SGLang's RuntimeEndpoint
speaks loom's /generate), so the model work is the same and the difference is the
frontend: its interpreter, its threads and its request pattern. Programs, identical text
in both languages: `one_turn` (system, user, one gen) and `three_turns` (system, then
three user / assistant-gen turns: each gen waits for the one before).

SGLang's frontend is pure Python; --sglang-path names a folder holding its `sglang`
package (the frontend files only). `--fetch-sglang DIR` builds one from PyPI: `pip
download sglang --no-deps`, its `sglang/lang` files, the small dependencies they import
(aiohttp, msgspec, pybase64) and an empty IPython.display stub.

    python benchmarks/bench_frontends.py --fetch-sglang /tmp/sglang-frontend
    python benchmarks/bench_frontends.py --sglang-path /tmp/sglang-frontend --num-programs 64
    python benchmarks/bench_frontends.py --sglang-path /tmp/sglang-frontend --smoke \
        --model-path TINY_MODEL                                          (CI, on CPU)
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
import zipfile

import smoke

import loom

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TOPICS = ["rivers", "stars", "bread", "chess", "rain", "bees", "glass", "maps"]
SMOKE = dict(device="cpu", num_programs=2, output_len=2, repeats=1, max_total_tokens=1024)


def questions(n: int) -> list[str]:
    return [f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def programs(lang, n_tokens: int) -> dict:
    """The benchmark's programs written with `lang`: the loom module or SGLang's
    sglang.lang.api, whose primitives have the same names and arguments."""

    @lang.function
    def one_turn(s, q):
        s += lang.system(SYSTEM)
        s += lang.user(q)
        s += lang.assistant(lang.gen("a", max_tokens=n_tokens, temperature=0, ignore_eos=True))

    @lang.function
    def three_turns(s, q):
        s += lang.system(SYSTEM)
        for i, follow in enumerate([q, "Why?", "Say it differently."]):
            s += lang.user(follow)
            gen = lang.gen(f"a{i}", max_tokens=n_tokens, temperature=0, ignore_eos=True)
            s += lang.assistant(gen)

    return {"one_turn": one_turn, "three_turns": three_turns}


def import_sglang(path: str):
    sys.path[:0] = [path, os.path.join(path, "_deps")]
    import sglang.lang.api as sgl
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    return sgl, RuntimeEndpoint


def fetch_sglang(dest: str, version: str | None = None) -> None:
    os.makedirs(dest, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    spec = f"sglang=={version}" if version else "sglang"
    subprocess.run([*pip, "download", spec, "--no-deps", "-d", dest], check=True)
    wheel = sorted(glob.glob(os.path.join(dest, "sglang-*.whl")))[-1]
    keep = ("sglang/lang/", "sglang/utils.py", "sglang/srt/environ.py", "sglang/version.py")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest, [n for n in z.namelist() if n.startswith(keep)])
    for package in ("sglang", "sglang/srt"):  # their real __init__ imports the runtime
        open(os.path.join(dest, package, "__init__.py"), "w").close()
    deps = os.path.join(dest, "_deps")
    subprocess.run(
        [*pip, "install", "-q", "--target", deps, "aiohttp", "msgspec", "pybase64"], check=True
    )
    os.makedirs(os.path.join(deps, "IPython"), exist_ok=True)  # notebook display only
    open(os.path.join(deps, "IPython", "__init__.py"), "w").close()
    with open(os.path.join(deps, "IPython", "display.py"), "w") as f:
        f.write("def HTML(*args, **kwargs):\n    return None\n\n\n")
        f.write("def display(*args, **kwargs):\n    return None\n")
    print(f"SGLang's frontend ({os.path.basename(wheel)}) is in {dest}")


def timed_batch(program, items, backend, meta_var: str) -> tuple[float, int, int]:
    """Seconds for run_batch, and the prompt and completion tokens of the last gen."""
    start = time.perf_counter()
    states = program.run_batch(items, backend=backend)
    elapsed = time.perf_counter() - start
    metas = [s.get_meta_info(meta_var) for s in states]
    prompt = sum(m["prompt_tokens"] for m in metas) // len(metas)
    completion = sum(m["completion_tokens"] for m in metas) // len(metas)
    return elapsed, prompt, completion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fetch-sglang", metavar="DIR", help="build SGLang's frontend in DIR, exit")
    p.add_argument("--sglang-version", help="with --fetch-sglang (default: the latest)")
    p.add_argument("--sglang-path", help="folder holding SGLang's frontend (see above)")
    p.add_argument("--url", default=None, help="a running loom serve (default: start one)")
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool (default: loom's)")
    p.add_argument("--num-programs", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = smoke.parse_args(p, SMOKE)
    if a.fetch_sglang:
        fetch_sglang(a.fetch_sglang, a.sglang_version)
        return
    if not a.sglang_path:
        p.error("--sglang-path is required (build one with --fetch-sglang DIR)")
    sgl, SglEndpoint = import_sglang(a.sglang_path)
    runtime = None
    if a.url is None:
        model = dict(device=a.device, load_format=a.load_format)
        if a.tokenizer_path:
            model["tokenizer_path"] = a.tokenizer_path
        if a.max_total_tokens:
            model["max_total_tokens"] = a.max_total_tokens
        runtime = loom.Runtime(a.model_path, **model)
        a.url = runtime.url
    try:
        run(a, sgl, SglEndpoint)
    finally:
        if runtime is not None:
            runtime.shutdown()


def run(a, sgl, SglEndpoint) -> None:
    backends = {"loom": loom.RuntimeEndpoint(a.url), "sglang": SglEndpoint(a.url)}
    progs = {"loom": programs(loom, a.output_len), "sglang": programs(sgl, a.output_len)}
    items = [{"q": q} for q in questions(a.num_programs)]
    flush = backends["loom"].flush_cache
    rows = []
    for name, last_var in (("one_turn", "a"), ("three_turns", "a2")):
        for frontend in ("loom", "sglang"):  # warm up: threads, templates, first requests
            progs[frontend][name].run_batch(items[:4], backend=backends[frontend])
        times: dict[str, list[float]] = {"loom": [], "sglang": []}
        tokens = {}
        for _ in range(a.repeats):  # interleaved, each from an empty cache
            for frontend in ("loom", "sglang"):
                flush()
                prog = progs[frontend][name]
                seconds, *tokens[frontend] = timed_batch(prog, items, backends[frontend], last_var)
                times[frontend].append(seconds)
        med = {f: statistics.median(t) for f, t in times.items()}
        rows.append((name, med, tokens))
    print(
        f"\nloom serve at {a.url}; {a.num_programs} programs per run_batch, {a.output_len} "
        f"tokens per gen, median of {a.repeats}"
    )
    print("| program | frontend | seconds | programs/s | last gen prompt / completion tokens |")
    print("|---|---|---|---|---|")
    for name, med, tokens in rows:
        for frontend in ("loom", "sglang"):
            prompt, completion = tokens[frontend]
            print(
                f"| {name} | {frontend} | {med[frontend]:.3f} | "
                f"{a.num_programs / med[frontend]:.1f} | {prompt} / {completion} |"
            )
        print(f"| {name} | sglang / loom time | {med['sglang'] / med['loom']:.2f}x | | |")


if __name__ == "__main__":
    main()
