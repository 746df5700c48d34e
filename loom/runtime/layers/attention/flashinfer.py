"""FlashInfer attention over the token-granular KV pool (a paged cache with page size 1).

Each layer's K/V buffer (slots, kv_heads, head_dim) is viewed as (pages, 1, kv_heads,
head_dim). A batch's page table is the concatenation of its requests' req_to_token rows:
indptr from the host-side sequence lengths, indices gathered on the device. `plan` runs
once per batch; every layer then calls `run` on the same plan.

Decode under CUDA graphs uses one wrapper per captured batch size whose index buffers
never move: `plan` (outside the graph) rewrites them before each replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import flashinfer
import torch

from loom.runtime.forward import ForwardBatch, ForwardMode
from loom.runtime.layers.attention.base import Attention, AttentionBackend
from loom.runtime.memory.kv_pool import KVCachePool
from loom.runtime.memory.req_to_token import ReqToTokenPool

_WORKSPACE_BYTES = 256 << 20
# Above this many rows, decode uses the CUDA-core kernel even when query heads share KV
# heads: with the batch alone filling the card, it reads the KV at 85-91% of copy
# bandwidth against 78-81% for the tensor-core kernel (H100, contexts 25-475; see
# benchmarks/RESULTS.md). At 256 rows and fewer the tensor-core kernel is as fast or faster.
_TENSOR_CORE_DECODE_MAX_BS = 512
# The query-heads-per-KV-head ratios FlashInfer's CUDA-core decode kernel is built for
# (its DISPATCH_GQA_GROUP_SIZE, 0.7.x). Any other ratio (Qwen2.5-0.5B and -7B have 7,
# Qwen2.5-14B/32B 5) decodes on the tensor-core kernel at every batch size.
CUDA_CORE_DECODE_GROUP_SIZES = frozenset({1, 2, 3, 4, 6, 8, 16})


@dataclass
class _Plan:
    wrapper: object


class FlashInferBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, req_to_token_pool: ReqToTokenPool, kv_pool: KVCachePool, model):
        super().__init__(req_to_token_pool)
        layer = next(m for m in model.modules() if isinstance(m, Attention))
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.head_dim, self.scale = layer.head_dim, layer.scale
        self.device = req_to_token_pool.req_to_token.device
        self.dtype = kv_pool.dtype
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        group = self.num_heads // self.num_kv_heads
        # Tensor-core decode pays off once several query heads share a KV head.
        self.tensor_core_decode = group >= 4
        self.cuda_core_decode = group in CUDA_CORE_DECODE_GROUP_SIZES
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        kinds = {self._tensor_cores(1), self._tensor_cores(_TENSOR_CORE_DECODE_MAX_BS + 1)}
        self.decode_wrappers = {tc: self._decode_wrapper(tc) for tc in kinds}
        self.graph_wrappers: dict[int, object] = {}
        # A wrapper's plan fills a pinned host buffer and queues its upload: under overlap
        # the next plan may come before that upload ran, so it waits for it first.
        self._plan_uploaded = torch.cuda.Event()
        self._plan_pending = False
        self._ones: torch.Tensor | None = None
        # (pages, 2, page_size 1, kv_heads, head_dim): FlashInfer's combined NHD layout.
        self.caches = [kv_pool.layer(i).buffer.unsqueeze(2) for i in range(kv_pool.num_layers)]

    def _tensor_cores(self, bs: int) -> bool:
        """Whether a decode batch of bs rows takes the tensor-core kernel: the faster one
        for grouped heads up to _TENSOR_CORE_DECODE_MAX_BS rows, and the only one for
        group sizes the CUDA-core kernel lacks."""
        if not self.cuda_core_decode:
            return True
        return self.tensor_core_decode and bs <= _TENSOR_CORE_DECODE_MAX_BS

    def _decode_wrapper(
        self, tensor_cores: bool, graph_bs: int | None = None, indices: torch.Tensor | None = None
    ):
        if graph_bs is None:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=tensor_cores
            )
        dev = self.device
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(graph_bs + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=torch.ones(graph_bs, dtype=torch.int32, device=dev),
        )

    def init_cuda_graph_wrapper(self, bs: int, indices: torch.Tensor) -> None:
        """A decode wrapper for graphs of batch size bs; `indices` is a page-table buffer
        shared by all sizes."""
        self.graph_wrappers[bs] = self._decode_wrapper(self._tensor_cores(bs), bs, indices)

    # ---- planning ------------------------------------------------------------------------

    def _page_table(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """indptr (host, int32) and indices (device, int32) of the batch's KV slots.
        Host indptrs let FlashInfer plan without waiting on the device."""
        indptr = _indptr(batch.seq_lens_cpu)
        total = int(indptr[-1])
        lens_dev = batch.seq_lens.to(torch.int64)
        rows = torch.repeat_interleave(
            torch.arange(batch.batch_size, device=self.device), lens_dev, output_size=total
        )
        starts = torch.repeat_interleave(
            torch.cumsum(lens_dev, 0) - lens_dev, lens_dev, output_size=total
        )
        cols = torch.arange(total, device=self.device) - starts
        table = self.req_to_token_pool.req_to_token
        indices = table[batch.req_pool_indices[rows], cols].to(torch.int32)
        return indptr, indices

    def plan(self, batch: ForwardBatch) -> None:
        if self._plan_pending:
            self._plan_uploaded.synchronize()
        indptr, indices = self._page_table(batch)
        last_page_len = self._ones_host(batch.batch_size)
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale)
        if batch.mode is ForwardMode.DECODE:
            wrapper = self.graph_wrappers[batch.batch_size] if batch.in_cuda_graph else None
            wrapper = wrapper or self.decode_wrappers[self._tensor_cores(batch.batch_size)]
            shape = (self.num_heads, self.num_kv_heads, self.head_dim, 1)
            wrapper.plan(indptr, indices, last_page_len, *shape, **common)
        else:
            wrapper = self.prefill
            wrapper.plan(
                _indptr(batch.extend_seq_lens_cpu),
                indptr,
                indices,
                last_page_len,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                1,
                causal=True,
                **common,
            )
        self._plan_uploaded.record()
        self._plan_pending = True
        batch.attn_metadata = _Plan(wrapper)

    def _ones_host(self, n: int) -> torch.Tensor:
        """Pinned int32 ones (every page holds one token): never written, so shared."""
        if self._ones is None or self._ones.numel() < n:
            self._ones = torch.ones(max(n, 1024), dtype=torch.int32).pin_memory()
        return self._ones[:n]

    # ---- per layer -----------------------------------------------------------------------

    def extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        return batch.attn_metadata.wrapper.run(q.contiguous(), self.caches[layer.layer_id])

    def decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        return batch.attn_metadata.wrapper.run(q.contiguous(), self.caches[layer.layer_id])


def _indptr(lengths: list[int]) -> torch.Tensor:
    """Host int32 prefix sums [0, l0, l0+l1, ...] (FlashInfer plans without a device sync).

    Pinned: FlashInfer uploads its host arguments with non_blocking copies, and a copy from
    pageable memory first waits for the stream to drain, i.e. for the step still running,
    which would leave the device idle while the host finishes the next step's set-up."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, pin_memory=True)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=out[1:])
    return out
