"""The language's overhead: `run_batch` of many small programs against the same prompts sent
as one batched generate (in-process Engine, or one POST /generate to `loom serve` with
--url). Every program is one chat turn with one gen of a fixed length (ignore_eos), so
both sides do the same model work; the ratio is what the language costs on top.

    python benchmarks/bench_lang_overhead.py --num-programs 64 --output-len 8
    python benchmarks/bench_lang_overhead.py --serve     (start a loom serve, use /generate)
    python benchmarks/bench_lang_overhead.py --url http://127.0.0.1:30000
    python benchmarks/bench_lang_overhead.py --smoke --model-path TINY_MODEL   (CI, on CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import smoke

import loom
from loom.backends.base import Capabilities, GenRequest, GenResult, ProgramBackend
from loom.lang.backend_context import resolve_backend, roles_for
from loom.lang.chat_template import RoleTemplate

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
SMOKE = dict(num_programs=2, output_len=2, repeats=1, max_total_tokens=1024)


@loom.function
def ask(s, question: str, output_len: int):
    s += loom.system(SYSTEM)
    s += loom.user(question)
    s += loom.assistant(loom.gen("answer", max_tokens=output_len))


class InstantBackend(ProgramBackend):
    """Answers every gen at once: run_batch on it times the interpreter alone."""

    capabilities = Capabilities(grammar=True, chat_api=False, scoring=True, cache=True)

    def generate(self, req: GenRequest) -> GenResult:
        return GenResult(" ok", {"prompt_tokens": 0, "completion_tokens": 1, "cached_tokens": 0})


def interpreter_cost(num_programs: int, chat_template) -> float:
    """Seconds of language overhead per program (run_batch on an instant backend)."""
    backend = InstantBackend()
    items = [{"question": q, "output_len": 8} for q in questions(num_programs)]
    ask.run_batch(items[:8], backend=backend, chat_template=chat_template)
    start = time.perf_counter()
    ask.run_batch(items, backend=backend, chat_template=chat_template)
    return (time.perf_counter() - start) / num_programs


def questions(n: int) -> list[str]:
    topics = ["rivers", "stars", "bread", "chess", "rain", "bees", "glass", "maps"]
    return [f"Tell me one fact about {topics[i % len(topics)]} (#{i})." for i in range(n)]


def run_programs(backend, qs: list[str], args) -> float:
    start = time.perf_counter()
    states = ask.run_batch(
        [{"question": q, "output_len": args.output_len} for q in qs],
        backend=backend,
        temperature=0,
        ignore_eos=True,
    )
    elapsed = time.perf_counter() - start
    assert all(s.error() is None for s in states), [s.error() for s in states if s.error()]
    return elapsed


def chat_prompt(tokenizer, roles: RoleTemplate, question: str) -> str:
    """The text `ask` sends: the conversation in the model's chat template, or, for a model
    without one, in the roles the language falls back to."""
    if not getattr(tokenizer, "chat_template", None):
        turns = (("system", SYSTEM), ("user", question))
        text = "".join(
            roles.prefix(r, i == 0) + c + roles.suffix(r) for i, (r, c) in enumerate(turns)
        )
        return text + roles.prefix("assistant", False)
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )


def run_batched_generate(generator, tokenizer, roles, qs: list[str], args, warm=None) -> float:
    prompts = [chat_prompt(tokenizer, roles, q) for q in qs]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    if warm is not None:
        warm()
    outs = generator.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert len(outs) == len(qs)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-programs", type=int, default=64)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--url", default=None, help="a running loom serve (default: an Engine)")
    p.add_argument("--serve", action="store_true", help="start a loom serve and use it")
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (GPU runs)")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool (default: loom's)")
    p.add_argument("--verbose", action="store_true", help="print every repeat's time")
    args = smoke.parse_args(p, SMOKE)

    engine = runtime = None
    model = dict(device=args.device, load_format=args.load_format)
    if args.tokenizer_path:
        model["tokenizer_path"] = args.tokenizer_path
    if args.max_total_tokens:
        model["max_total_tokens"] = args.max_total_tokens
    if args.serve:
        runtime = loom.Runtime(args.model_path, **model)
        args.url = runtime.url
    if args.url:
        generator = loom.RuntimeEndpoint(args.url)
    else:
        engine = generator = loom.Engine(args.model_path, **model)
    backend = resolve_backend(generator)
    flush = generator.flush_cache
    tokenizer, roles = backend.tokenizer, roles_for(backend)
    qs = questions(args.num_programs)
    run_batched_generate(generator, tokenizer, roles, qs[:4], args)  # warm up both paths
    run_programs(backend, qs[:4], args)

    def warm() -> None:  # what run_batch does first: send the shared prefix once
        ask.cache(backend=backend)

    times: dict[str, list[float]] = {"generate": [], "generate+warm": [], "run_batch": []}
    for _ in range(args.repeats):  # interleaved, each from an empty cache
        flush()
        times["generate"].append(run_batched_generate(generator, tokenizer, roles, qs, args))
        flush()
        times["generate+warm"].append(
            run_batched_generate(generator, tokenizer, roles, qs, args, warm)
        )
        flush()
        times["run_batch"].append(run_programs(backend, qs, args))
    median = {k: statistics.median(v) for k, v in times.items()}
    if args.verbose:
        print({k: [round(t, 3) for t in v] for k, v in times.items()})
    where = f"loom serve at {args.url} (/generate)" if args.url else "in-process Engine"
    print(
        f"{where}; programs: {args.num_programs}, output tokens each: {args.output_len}, "
        f"repeats: {args.repeats} (median)"
    )
    for name, t in median.items():
        print(f"{name:14s}: {t:8.3f} s  ({args.num_programs / t:7.2f} programs/s)")
    print(
        f"overhead ratio: {median['run_batch'] / median['generate+warm']:.3f}x "
        "(run_batch / batched generate with the same prefix warm-up)"
    )
    print(
        f"vs cold batch : {median['run_batch'] / median['generate']:.3f}x "
        "(run_batch / batched generate without it)"
    )
    per_program = interpreter_cost(1000, roles)
    print(
        f"interpreter   : {per_program * 1e6:8.1f} us per program (run_batch of 1000 on an "
        f"instant backend) = {per_program / (median['run_batch'] / args.num_programs):.2%} "
        "of a program's time here"
    )
    for owned in (engine, runtime):
        if owned is not None:
            owned.shutdown()


if __name__ == "__main__":
    main()
