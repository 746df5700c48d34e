"""The CUDA path: FlashInfer against torch_native, CUDA graphs against eager decoding.
Skipped where no CUDA device is present."""

from __future__ import annotations

import os

import pytest
import torch

from loom.runtime.args import ServerArgs
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.layers import small_batch
from loom.runtime.messages import GenerateRequest
from loom.runtime.sampling.params import SamplingParams
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.request import Req
from tests.grammar_helpers import BOUNDED, build_bpe_llama
from tests.test_models import make_scheduler, random_prompts, run_scheduler
from tests.tiny_models import VOCAB, word_tokenizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=[64, 128])
def gpu_model(request, tmp_path_factory):
    """A small Llama whose head_dim is one FlashInfer compiles (64 or 128), GQA 4:1."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    head_dim = request.param
    folder = str(tmp_path_factory.mktemp(f"gpu-llama-{head_dim}"))
    config = LlamaConfig(
        hidden_size=8 * head_dim,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        eos_token_id=VOCAB - 1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _runner(folder: str, backend: str, **kw) -> ModelRunner:
    args = dict(
        model_path=folder,
        device="cuda",
        dtype="bfloat16",
        attention_backend=backend,
        max_total_tokens=8192,
        disable_cuda_graph=True,
    )
    return ModelRunner(ServerArgs(**{**args, **kw}), folder)


def _prefill_then_decode(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a prefill of the prompts, then of one decode step that feeds each prompt's
    last token again. Not the argmax: two backends could break a bf16 near-tie apart,
    and the decode steps compared would then read different tokens."""
    reqs = []
    for i, p in enumerate(prompts):
        req = Req(f"r{i}", p, SamplingParams())
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(len(p)))
        req.kv_len = len(p)
        reqs.append(req)
    out = runner.forward(
        batching.extend_batch(reqs, [0] * len(reqs), runner.req_to_token_pool, "cuda")
    )
    logits = [out.next_logits.float()]  # the model's dtype (bf16) as the runner returns it
    for req, p in zip(reqs, prompts):
        req.output_ids.append(p[-1])
    slots = runner.allocator.alloc(len(reqs))
    for req, slot in zip(reqs, slots):
        runner.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slot.view(1))
        req.kv_len += 1
    last_tokens = torch.zeros(runner.req_to_token_pool.num_slots, dtype=torch.int64, device="cuda")
    for req in reqs:
        last_tokens[req.req_pool_idx] = req.output_ids[-1]
    batch = batching.decode_batch(reqs, slots, "cuda", last_tokens)
    logits.append(runner.forward(batch).next_logits.float())
    return logits


def test_flashinfer_matches_torch_native(gpu_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB - 2, (int(n),), generator=g).tolist() for n in (7, 130, 513)]
    ref = _prefill_then_decode(_runner(gpu_model, "torch_native"), prompts)
    got = _prefill_then_decode(_runner(gpu_model, "flashinfer"), prompts)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_flashinfer_cuda_core_decode_of_a_large_batch_matches_torch_native(gpu_model):
    """Past _TENSOR_CORE_DECODE_MAX_BS rows, decode takes FlashInfer's CUDA-core kernel."""
    from loom.runtime.layers.attention import flashinfer as fi

    n = fi._TENSOR_CORE_DECODE_MAX_BS + 8
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(2, 40, (n,), generator=g).tolist()
    prompts = [torch.randint(2, VOCAB - 2, (k,), generator=g).tolist() for k in lens]
    kw = dict(max_running_requests=n, max_total_tokens=32768)
    ref = _prefill_then_decode(_runner(gpu_model, "torch_native", **kw), prompts)
    runner = _runner(gpu_model, "flashinfer", **kw)
    assert not runner.attn_backend._tensor_cores(n)
    got = _prefill_then_decode(runner, prompts)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_cuda_graph_decoding_gives_the_eager_tokens(gpu_model):
    prompts = random_prompts(13, seed=2, hi=200)  # 13: a padded graph size
    params = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for disable in (True, False):
        sched = make_scheduler(
            gpu_model,
            device="cuda",
            dtype="bfloat16",
            attention_backend="flashinfer",
            disable_cuda_graph=disable,
        )
        assert (sched.runner.cuda_graphs is None) == disable
        outs[disable] = run_scheduler(sched, prompts, params, arrive_every=1)
    for rid in outs[True]:
        assert outs[False][rid][0] == outs[True][rid][0], rid


def test_fused_cuda_layers_match_transformers(gpu_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, VOCAB - 2, (int(n),), generator=g).tolist() for n in (9, 77)]
    got = _prefill_then_decode(_runner(gpu_model, "flashinfer"), prompts)[0]
    with torch.no_grad():
        ref = torch.stack(
            [hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts]
        )
    torch.testing.assert_close(got, ref, atol=6e-2, rtol=3e-2)


def test_small_batch_decode_matches_transformers_and_the_unfused_layers(gpu_model, monkeypatch):
    """Decode of DECODE_ROWS rows runs small_batch's fused kernels; its logits match
    transformers on the same tokens, and loom's unfused layers."""
    from transformers import AutoModelForCausalLM

    calls = []
    fused = small_batch.qkv_rope_store
    monkeypatch.setattr(
        small_batch, "qkv_rope_store", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    g = torch.Generator().manual_seed(6)
    lengths = (5, 300, 77, 40)[: small_batch.DECODE_ROWS]
    prompts = [torch.randint(2, VOCAB - 2, (int(n),), generator=g).tolist() for n in lengths]
    decode = _prefill_then_decode(_runner(gpu_model, "flashinfer"), prompts)[1]
    assert calls, "the decode step did not take the small-batch kernels"
    calls.clear()
    unfused_runner = _runner(gpu_model, "flashinfer", disable_small_batch_kernels=True)
    unfused = _prefill_then_decode(unfused_runner, prompts)[1]
    assert not calls
    torch.testing.assert_close(decode, unfused, atol=5e-2, rtol=2e-2)

    hf = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref = torch.stack(
            [hf(torch.tensor([p + p[-1:]], device="cuda")).logits[0, -1].float() for p in prompts]
        )
    torch.testing.assert_close(decode, ref, atol=6e-2, rtol=3e-2)


def test_overlap_scheduling_gives_the_same_greedy_tokens(gpu_model):
    # Batch sizes differ between the two modes by design (under overlap a finished request
    # decodes one discarded step more), and the small-batch kernels round differently from
    # cuBLAS: a step whose size crosses DECODE_ROWS in one mode only may flip a bf16 tie.
    # This test is about scheduling, so both modes run cuBLAS at every size.
    prompts = random_prompts(24, seed=5, hi=300)
    outs, deferred = {}, {}
    for disable in (True, False):
        # Mixed steps off: they move tokens between kernels, and bf16 ties then flip.
        sched = make_scheduler(
            gpu_model,
            device="cuda",
            disable_overlap_schedule=disable,
            enable_mixed_chunk=False,
            disable_small_batch_kernels=True,
        )
        params = dict(temperature=0, ignore_eos=False, max_new_tokens=40)
        outs[disable] = run_scheduler(sched, prompts, params, arrive_every=1)
        deferred[disable] = sched.stats["deferred_steps"]
    assert deferred[True] == 0 and deferred[False] > 0
    for rid in outs[True]:
        assert outs[False][rid][0] == outs[True][rid][0], rid


@pytest.fixture(scope="module")
def gpu_bpe_model(tmp_path_factory):
    """A small Llama over a real byte-level BPE tokenizer (grammars need real tokens)."""
    folder = str(tmp_path_factory.mktemp("gpu-bpe-llama"))
    return folder, build_bpe_llama(folder, hidden=512, heads=8, context=1024)


def test_json_schema_on_the_gpu_path_validates(gpu_bpe_model):
    """Masks applied on the device, with CUDA graphs and overlap on, jump-forward on and
    off: every output is a complete instance of the schema."""
    import json

    import jsonschema

    folder, tok = gpu_bpe_model
    prompts = [tok.encode(f"the answer {i} is") for i in range(12)]
    for jump in (False, True):
        sched = make_scheduler(
            folder, device="cuda", grammar_backend="xgrammar", enable_jump_forward=jump
        )
        params = dict(json_schema=json.dumps(BOUNDED), max_new_tokens=160, temperature=0.8)
        results = run_scheduler(sched, prompts, params, arrive_every=1)
        for rid, (ids, last) in results.items():
            text = tok.decode(ids, skip_special_tokens=True)
            assert last.finished_reason["type"] == "stop", (rid, text)
            jsonschema.validate(json.loads(text), BOUNDED)
        if jump:
            assert sched.server_info().jump_forward_draft_tokens_total > 0


CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "configs")
BENCH_CONFIGS = sorted(os.listdir(CONFIG_ROOT))


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("word-tokenizer"))
    word_tokenizer().save_pretrained(folder)
    return folder


def _spread_weights(model: torch.nn.Module) -> None:
    """Dummy weights at fan-in scale, so logits spread out and greedy picks are rarely
    bf16 near-ties (the loader's dummy values are nearly flat). Same seeds, same values."""
    for i, (_, param) in enumerate(sorted(model.named_parameters())):
        if param.dim() == 2:
            gen = torch.Generator(device=param.device).manual_seed(i)
            bound = (3.0 / param.shape[1]) ** 0.5
            param.data.uniform_(-bound, bound, generator=gen)


def _teacher_forced_logits(runner: ModelRunner, sequences: list[list[int]], n: int):
    """float32 logits predicting each sequence's last n tokens, in one prefill (logits
    from position logprob_start_len - 1 to the end: n + 1 rows, the last one unused)."""
    reqs = []
    for i, seq in enumerate(sequences):
        start = len(seq) - n
        req = Req(f"r{i}", seq, SamplingParams(), return_logprob=True, logprob_start_len=start)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        runner.req_to_token_pool.write(req.req_pool_idx, 0, runner.allocator.alloc(len(seq)))
        req.kv_len = len(seq)
        reqs.append(req)
    out = runner.forward(
        batching.extend_batch(reqs, [0] * len(reqs), runner.req_to_token_pool, "cuda")
    )
    assert all(logits.shape[0] == n + 1 for logits in out.prompt_logits)
    return [logits[:n] for logits in out.prompt_logits]


@pytest.mark.parametrize("config", BENCH_CONFIGS)
def test_each_benchmark_config_starts_and_decodes_torch_natives_greedy_tokens(
    config, word_tokenizer_dir
):
    """The default CUDA path (FlashInfer, CUDA graphs of 1-1024 rows, overlap, small-batch
    kernels) starts for every config, whatever its query-heads-per-KV-head ratio, and its
    greedy tokens in batches of 2 and of 600 rows are torch_native's on the same tokens:
    each pick is the reference's argmax, up to bf16 near-ties."""
    folder = os.path.join(CONFIG_ROOT, config)
    common = dict(load_format="dummy", tokenizer_path=word_tokenizer_dir, dtype="bfloat16")
    sched = make_scheduler(folder, device="cuda", max_total_tokens=32768, **common)
    assert sched.runner.cuda_graphs is not None and sched.runner.cuda_graphs.max_bs == 1024
    _spread_weights(sched.runner.model)
    small, large = random_prompts(2, seed=8, hi=300), random_prompts(600, seed=9, hi=24)
    steps = {"small": 8, "large": 3}
    got = {}
    for name, prompts in (("small", small), ("large", large)):
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=steps[name], temperature=0, ignore_eos=True)
            sched.add_request(GenerateRequest(f"{name}{i}", p, params))
        while sched.has_work():
            sched.step()
        for out in sched.take_outputs():
            got.setdefault(out.rid, []).extend(out.new_token_ids)
    del sched
    torch.cuda.empty_cache()

    ref = _runner(folder, "torch_native", max_total_tokens=32768, **common)
    _spread_weights(ref.model)
    for name, prompts in (("small", small), ("large", large)):
        tokens = [got[f"{name}{i}"] for i in range(len(prompts))]
        assert all(len(t) == steps[name] for t in tokens)
        seqs = [p + t for p, t in zip(prompts, tokens)]
        for logits, picks in zip(_teacher_forced_logits(ref, seqs, steps[name]), tokens):
            for row, pick in zip(logits, picks):
                top2 = row.topk(2).values
                tol = 0.05 + 0.02 * float(top2[0].abs())
                assert float(row[pick]) >= float(top2[0]) - tol, (name, pick)
                if float(top2[0] - top2[1]) > tol:
                    assert pick == int(row.argmax()), (name, pick)
