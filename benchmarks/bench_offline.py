r"""Offline throughput: N requests at once through loom's Engine, and Hugging Face
transformers `generate` (static batches, left-padded) on the same model and requests as
the baseline, in one run. Output lengths are fixed (ignore_eos), so both do the same work;
transformers' padding and over-generation are not counted as output.

    python benchmarks/bench_offline.py --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --tokenizer-path ASSETS/tokenizer-llama3 \
        --dataset sharegpt --sharegpt-path ASSETS/sharegpt.json --num-prompts 1000
"""

from __future__ import annotations

import argparse
import json
import random
import time

import smoke
import torch

from loom.runtime.engine import Engine

SMOKE = dict(
    device="cpu",
    dtype="float32",
    num_prompts=2,
    random_input_len=16,
    random_output_len=4,
    hf_prompts=2,
    max_total_tokens=1024,
)


def load_requests(a, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs, the ids folded into the model's vocabulary (the
    random dataset draws ids up to 30000; a small model's vocabulary may be smaller)."""
    rng = random.Random(a.seed)
    if a.dataset == "sharegpt":
        with open(a.sharegpt_path) as f:
            rows = json.load(f)["rows"][: a.num_prompts]
        requests = [(r["input_ids"], r["output_len"]) for r in rows]
    else:
        lo = max(1, int(a.random_input_len * a.random_range_ratio))
        lo_out = max(1, int(a.random_output_len * a.random_range_ratio))
        requests = [
            (
                [rng.randrange(100, 30000) for _ in range(rng.randint(lo, a.random_input_len))],
                rng.randint(lo_out, a.random_output_len),
            )
            for _ in range(a.num_prompts)
        ]
    return [([t % vocab_size for t in ids], n) for ids, n in requests]


def run_loom(a, requests, overlap: bool = True) -> dict:
    kw = dict(
        device=a.device,
        disable_overlap_schedule=not overlap,
        load_format=a.load_format,
        dtype=a.dtype,
        tokenizer_path=a.tokenizer_path,
        grammar_backend="none",
        disable_cuda_graph=a.disable_cuda_graph,
    )
    if a.cuda_graph_max_bs:
        kw["cuda_graph_max_bs"] = a.cuda_graph_max_bs
    if a.max_running_requests:
        kw["max_running_requests"] = a.max_running_requests
    if a.mem_fraction_static:
        kw["mem_fraction_static"] = a.mem_fraction_static
    if a.max_total_tokens:
        kw["max_total_tokens"] = a.max_total_tokens
    if a.no_mixed_chunk:
        kw["enable_mixed_chunk"] = False
    with Engine(a.model_path, **kw) as engine:
        warm = [(ids[:16], 4) for ids, _ in requests[:8]]
        _generate(engine, warm)
        results = {}
        for name, subset in (("all", requests), ("subset", requests[: a.hf_prompts])):
            if name == "subset" and not a.hf_prompts:
                continue
            engine.flush_cache()
            start = time.perf_counter()
            outs = _generate(engine, subset)
            elapsed = time.perf_counter() - start
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            results[name] = dict(requests=len(subset), seconds=elapsed, output_tokens=tokens)
    return results


def _generate(engine, requests):
    params = [{"max_new_tokens": n, "ignore_eos": True, "temperature": 0} for _, n in requests]
    return engine.generate(input_ids=[ids for ids, _ in requests], sampling_params=params)


def run_transformers(a, requests) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from loom.runtime.executor.model_runner import resolve_device

    dtype, dev = getattr(torch, a.dtype), resolve_device(a.device)
    if a.load_format == "dummy":
        with dev:
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(a.model_path), dtype=dtype
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=dtype).to(dev)
    model.eval()
    model.generation_config.eos_token_id = None
    pad = 0
    useful, start = 0, time.perf_counter()
    for i in range(0, len(requests), a.hf_batch_size):
        batch = requests[i : i + a.hf_batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=dev)
        new = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        useful += sum(n for _, n in batch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return dict(requests=len(requests), seconds=time.perf_counter() - start, output_tokens=useful)


def main() -> None:
    from transformers import AutoConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto", help="loom's and the baseline's")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--sharegpt-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=0.5)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool (default: loom's)")
    p.add_argument("--no-mixed-chunk", action="store_true", help="prefill and decode apart")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None, help="default: the engine's")
    p.add_argument(
        "--overlap",
        choices=["on", "off", "both"],
        default="on",
        help="overlap scheduling; both: run loom with it and without it",
    )
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--hf-prompts", type=int, default=128, help="baseline subset (0: skip)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = smoke.parse_args(p, SMOKE)
    requests = load_requests(a, AutoConfig.from_pretrained(a.model_path).vocab_size)
    rows = []
    for overlap in {"on": [True], "off": [False], "both": [True, False]}[a.overlap]:
        tag = "" if a.overlap != "both" else ", overlap" if overlap else ", no overlap"
        results = run_loom(a, requests, overlap)
        rows += [(f"loom ({name}{tag})", r) for name, r in results.items()]
    for name, r in rows:  # printed now: the baseline below can take minutes
        print(f"{name}: {r['output_tokens'] / r['seconds']:.0f} output tok/s", flush=True)
    if a.hf_prompts:
        rows.append(("transformers (subset)", run_transformers(a, requests[: a.hf_prompts])))
    print(
        f"\noffline {a.dataset}: {len(requests)} requests, "
        f"{sum(len(i) for i, _ in requests)} prompt tokens, "
        f"{sum(n for _, n in requests)} output tokens; model {a.model_path} ({a.load_format})"
    )
    print(f"{'engine':<36} {'reqs':>5} {'seconds':>8} {'out tok/s':>10} {'req/s':>7}")
    for name, r in rows:
        print(
            f"{name:<36} {r['requests']:>5} {r['seconds']:>8.1f} "
            f"{r['output_tokens'] / r['seconds']:>10.0f} {r['requests'] / r['seconds']:>7.2f}"
        )
    loom_subset = next((r for name, r in rows if name.startswith("loom (subset")), None)
    hf = dict(rows).get("transformers (subset)")
    if loom_subset and hf:
        ratio = (loom_subset["output_tokens"] / loom_subset["seconds"]) / (
            hf["output_tokens"] / hf["seconds"]
        )
        print(f"loom / transformers on the same {a.hf_prompts} requests: {ratio:.1f}x")


if __name__ == "__main__":
    main()
