"""loom's models against Hugging Face transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.args import ServerArgs
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.messages import GenerateRequest
from loom.runtime.models.registry import UnsupportedArchitectureError
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req
from loom.runtime.scheduler.scheduler import Scheduler
from tests.conftest import ARCHS
from tests.tiny_models import VOCAB, hf_greedy, load_reference

ATOL = 2e-4


def random_prompts(n: int, seed: int, lo: int = 4, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB - 2, (k,), generator=g).tolist() for k in lens]


def _runner(folder: str) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=folder, device="cpu", max_total_tokens=4096), folder)


def _start(runner: ModelRunner, prompts: list[list[int]], logprobs: bool = True) -> list[Req]:
    """Requests with their prompts' KV slots allocated (asking for prompt logprobs unless
    logprobs=False)."""
    reqs = []
    for i, p in enumerate(prompts):
        start = 0 if logprobs else -1
        req = Req(f"r{i}", p, SamplingParams(), return_logprob=logprobs, logprob_start_len=start)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(len(p)))
        req.kv_len = len(p)
        reqs.append(req)
    return reqs


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_transformers(arch, tiny_model_factory):
    folder = tiny_model_factory(arch)
    hf = load_reference(folder)
    runner = _runner(folder)
    prompts = random_prompts(3, seed=1)
    reqs = _start(runner, prompts)
    out = runner.forward(batching.extend_batch(reqs, [0] * 3, runner.req_to_token_pool, "cpu"))
    for req, logits in zip(reqs, out.prompt_logits):
        ref = hf(torch.tensor([req.origin_input_ids])).logits[0]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    seqs = [list(p) for p in prompts]
    next_logits = out.next_logits
    last_tokens = torch.zeros(runner.req_to_token_pool.num_slots, dtype=torch.int64)
    for _ in range(4):  # a few batched decode steps over all three requests
        for req, seq, row in zip(reqs, seqs, next_logits):
            token = int(row.argmax())
            req.output_ids.append(token)
            seq.append(token)
            last_tokens[req.req_pool_idx] = token
        slots = runner.allocator.alloc(len(reqs))
        for req, slot in zip(reqs, slots):
            runner.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slot.view(1))
            req.kv_len += 1
        batch = batching.decode_batch(reqs, slots, "cpu", last_tokens)
        next_logits = runner.forward(batch).next_logits
        for seq, row in zip(seqs, next_logits):
            ref = hf(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(row, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_reading_only_last_tokens_skips_the_rest_in_the_last_layer(
    arch, tiny_model_factory
):
    """With no prompt logprobs asked, the last layer's output projection and MLP run on each
    request's last token only, and the next-token logits still match transformers'."""
    folder = tiny_model_factory(arch)
    hf = load_reference(folder)
    runner = _runner(folder)
    prompts = random_prompts(3, seed=2)
    reqs = _start(runner, prompts, logprobs=False)
    rows_seen = []
    last_mlp = runner.model.layers[-1].mlp
    hook = last_mlp.register_forward_hook(lambda _m, args, _out: rows_seen.append(len(args[0])))
    try:
        out = runner.forward(batching.extend_batch(reqs, [0] * 3, runner.req_to_token_pool, "cpu"))
    finally:
        hook.remove()
    assert rows_seen == [3] and out.prompt_logits == [None] * 3
    for prompt, row in zip(prompts, out.next_logits, strict=True):
        ref = hf(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, ref, atol=ATOL, rtol=0)


def run_scheduler(sched: Scheduler, prompts, params: dict, arrive_every: int = 2) -> dict:
    """Submit prompts one every `arrive_every` steps (so batches mix prefill and decode);
    returns rid -> (output ids, last output message)."""
    results: dict = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or sched.has_work():
        if pending and step % arrive_every == 0:
            i, p = pending.pop(0)
            sched.add_request(GenerateRequest(f"r{i}", p, SamplingParams(**params)))
        if sched.has_work():
            sched.step()
        step += 1
        for o in sched.take_outputs():
            ids, _ = results.get(o.rid, ([], None))
            results[o.rid] = (ids + o.new_token_ids, o)
    return results


def make_scheduler(folder: str, **kw) -> Scheduler:
    args = dict(model_path=folder, device="cpu", grammar_backend="none", max_total_tokens=4096)
    return Scheduler(ServerArgs(**{**args, **kw}), folder)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuous_batching_matches_transformers(arch, tiny_model_factory):
    folder = tiny_model_factory(arch)
    hf = load_reference(folder)
    prompts = random_prompts(8, seed=2)
    results = run_scheduler(
        make_scheduler(folder), prompts, dict(max_new_tokens=32, temperature=0, ignore_eos=True)
    )
    for i, p in enumerate(prompts):
        assert results[f"r{i}"][0] == hf_greedy(hf, p, 32), f"prompt {i}"


def test_unknown_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        _runner(str(tmp_path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(dtype, tiny_model_factory):
    folder = tiny_model_factory("llama")
    hf = load_reference(folder)
    runner = ModelRunner(
        ServerArgs(model_path=folder, device="cpu", dtype=dtype, max_total_tokens=512), folder
    )
    prompt = random_prompts(1, seed=3)[0]
    reqs = _start(runner, [prompt])
    out = runner.forward(batching.extend_batch(reqs, [0], runner.req_to_token_pool, "cpu"))
    ref = hf(torch.tensor([prompt])).logits[0, -1]
    assert out.next_logits.dtype == getattr(torch, dtype)  # widened only where sampling needs
    torch.testing.assert_close(out.next_logits[0].float(), ref, atol=0.1, rtol=0.05)


def test_dummy_weights_load_any_config(tiny_model_factory):
    folder = tiny_model_factory("qwen2")
    runner = ModelRunner(
        ServerArgs(model_path=folder, device="cpu", load_format="dummy", max_total_tokens=256),
        folder,
    )
    reqs = _start(runner, [[5, 6, 7]])
    out = runner.forward(batching.extend_batch(reqs, [0], runner.req_to_token_pool, "cpu"))
    assert torch.isfinite(out.next_logits).all()
