"""Loads the model, owns the KV pools and runs one ForwardBatch to logits."""

from __future__ import annotations

import itertools
import logging

import torch
from transformers import AutoConfig

from loom.runtime.args import ServerArgs
from loom.runtime.executor.host_copy import to_device
from loom.runtime.forward import ForwardBatch, ForwardMode, LogitsOutput
from loom.runtime.layers import switches
from loom.runtime.layers.attention.base import Attention, AttentionBackend
from loom.runtime.layers.rotary import RotaryEmbedding
from loom.runtime.memory.allocator import KVAllocator
from loom.runtime.memory.kv_pool import KVCachePool
from loom.runtime.memory.req_to_token import ReqToTokenPool
from loom.runtime.models.llama import head_dim_of
from loom.runtime.models.loader import init_dummy_weights, iter_folder_weights
from loom.runtime.models.registry import model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, args: ServerArgs, model_folder: str):
        self.args = args
        switches.configure(
            fused=not args.disable_fused_kernels,
            small_batch=not args.disable_small_batch_kernels,
            pdl=not args.disable_pdl,
        )
        self.device = resolve_device(args.device)
        self.config = AutoConfig.from_pretrained(model_folder)
        self.dtype = self._pick_dtype()
        self.context_len = self._context_len()
        self.model = self._load_model(model_folder)
        self.vocab_size = self.config.vocab_size
        self.max_total_tokens = self._kv_capacity()
        self.max_running_requests = args.max_running_requests or min(
            1024 if self.device.type == "cuda" else 64, self.max_total_tokens
        )
        self._init_pools()
        self.attn_backend = self._make_attention_backend()
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.bind(self.attn_backend, self.kv_pool.layer(module.layer_id))
        self.cuda_graphs = self._maybe_capture_cuda_graphs()

    # ---- setup -------------------------------------------------------------------------

    def _pick_dtype(self) -> torch.dtype:
        if self.args.dtype != "auto":
            return _DTYPES[self.args.dtype]
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _context_len(self) -> int:
        model_max = getattr(self.config, "max_position_embeddings", 4096)
        window = getattr(self.config, "sliding_window", None)
        use_window = getattr(self.config, "use_sliding_window", True)
        if window and use_window and window < model_max:
            # Full attention equals sliding-window attention while sequences fit the window.
            logger.info("capping context to the sliding window (%d tokens)", window)
            model_max = window
        if self.args.context_length is None:
            return model_max
        if self.args.context_length > model_max:
            raise ValueError(
                f"context_length {self.args.context_length} exceeds the model's {model_max}"
            )
        return self.args.context_length

    def _load_model(self, folder: str) -> torch.nn.Module:
        cls = model_class(self.config)
        max_positions = max(self.context_len, getattr(self.config, "max_position_embeddings", 0))
        with torch.device("meta"):
            model = cls(self.config, max_positions)
        model = model.to_empty(device=self.device).to(self.dtype)
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):  # buffers were on meta: rebuild them
                fresh = RotaryEmbedding(self.config, head_dim_of(self.config), max_positions)
                for name in ("cos", "sin", "cos_sin"):
                    setattr(module, name, getattr(fresh, name).to(self.device))
        if self.args.load_format == "dummy":
            init_dummy_weights(model, self.args.random_seed or 0)
        else:
            model.load_weights(iter_folder_weights(folder, self.args.load_format))
        return model.eval()

    def _kv_capacity(self) -> int:
        cfg = self.config
        per_token = KVCachePool.bytes_per_token(
            cfg.num_hidden_layers,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim_of(cfg),
            self.dtype,
        )
        if self.args.max_total_tokens is not None:
            return self.args.max_total_tokens
        if self.device.type == "cuda":
            # Memory the loader freed (float32 parameters before the cast) stays in torch's
            # cache and would count as used: Llama-3.1-8B lost ~15 GB of KV to it.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = self.args.mem_fraction_static or 0.85
            budget = free - total * (1 - fraction)
        else:
            budget = min(_available_host_memory() * 0.2, 4 << 30)
        tokens = int(budget // per_token)
        if tokens < 256:
            raise RuntimeError(
                f"only {tokens} tokens of KV cache fit; lower --context-length or raise "
                "--mem-fraction-static / --max-total-tokens"
            )
        return tokens

    def _init_pools(self) -> None:
        cfg = self.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.req_to_token_pool = ReqToTokenPool(
            self.max_running_requests, self.context_len + 4, self.device
        )
        self.kv_pool = KVCachePool(
            self.max_total_tokens,
            cfg.num_hidden_layers,
            kv_heads,
            head_dim_of(cfg),
            self.dtype,
            self.device,
        )
        self.allocator = KVAllocator(self.max_total_tokens, self.device)

    def _make_attention_backend(self) -> AttentionBackend:
        name = self.args.attention_backend or (
            "flashinfer" if self.device.type == "cuda" else "torch_native"
        )
        if name == "flashinfer":
            try:
                from loom.runtime.layers.attention.flashinfer import FlashInferBackend
            except ImportError as e:
                logger.warning("flashinfer unavailable (%s); using torch_native", e)
            else:
                return FlashInferBackend(self.req_to_token_pool, self.kv_pool, self.model)
        from loom.runtime.layers.attention.torch_native import TorchNativeBackend

        return TorchNativeBackend(self.req_to_token_pool)

    def _maybe_capture_cuda_graphs(self):
        if self.device.type != "cuda" or self.args.disable_cuda_graph:
            return None
        if not self.attn_backend.supports_cuda_graph:
            logger.info("CUDA graphs need the flashinfer backend; decoding eagerly")
            return None
        from loom.runtime.executor.cuda_graph import CudaGraphRunner

        return CudaGraphRunner(self, min(self.args.cuda_graph_max_bs, self.max_running_requests))

    # ---- forward -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(batch):
            return LogitsOutput(self.cuda_graphs.replay(batch), [None] * batch.batch_size)
        self.attn_backend.plan(batch)
        if batch.mode is ForwardMode.DECODE:
            hidden = self.model(batch)
            return LogitsOutput(self.model.compute_logits(hidden), [None] * batch.batch_size)
        last_rows = list(itertools.accumulate(batch.extend_seq_lens_cpu, initial=-1))[1:]
        last_rows = to_device(last_rows, torch.int64, self.device)
        if all(start < 0 for start in batch.logits_start_cpu):
            # Only each request's last token is read: the model returns just those rows.
            batch.output_rows = last_rows
            hidden = self.model(batch)
            return LogitsOutput(self.model.compute_logits(hidden), [None] * batch.batch_size)
        hidden = self.model(batch)
        next_logits = self.model.compute_logits(hidden[last_rows])
        prompt_logits: list[torch.Tensor | None] = []
        offset = 0
        for ext_len, start in zip(batch.extend_seq_lens_cpu, batch.logits_start_cpu):
            if start >= 0:
                logits = self.model.compute_logits(hidden[offset + start : offset + ext_len])
                prompt_logits.append(logits.float())
            else:
                prompt_logits.append(None)
            offset += ext_len
        return LogitsOutput(next_logits, prompt_logits)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
