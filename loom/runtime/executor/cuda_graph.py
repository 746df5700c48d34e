"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at
start-up, so a decode step costs one launch instead of hundreds.

A batch of size n runs in the smallest captured size >= n. Padding rows decode a dummy
token: they read req_to_token's spare last row, attend to one slot, and write their K/V
into pad slot 0, which no request owns. Their logits are discarded.
"""

from __future__ import annotations

import logging

import torch

from loom.runtime.forward import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [1]


class CudaGraphRunner:
    def __init__(self, runner, max_bs: int):
        self.runner = runner
        self.model = runner.model
        self.backend = runner.attn_backend
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        self.pad_row = runner.req_to_token_pool.num_slots - 1  # never handed to a request
        runner.req_to_token_pool.req_to_token[self.pad_row].zero_()
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.full(
            (self.max_bs,), self.pad_row, dtype=torch.int64, device=dev
        )
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        # All sizes share one page-table buffer (only one graph runs at a time).
        self.max_indices = self.max_bs * runner.context_len
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, ForwardBatch]] = {}
        self.pool = None
        self._capture_all()

    def _batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=seq_lens_cpu,
            in_cuda_graph=True,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        indices = torch.zeros(self.max_indices, dtype=torch.int32, device=self.runner.device)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            self.backend.init_cuda_graph_wrapper(bs, indices)
            batch = self._batch(bs, [1] * bs)
            self.backend.plan(batch)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels (and their lazy initialisation)
                    self.model.compute_logits(self.model(batch))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.model.compute_logits(self.model(batch))
            self.pool = graph.pool()
            self.graphs[bs] = (graph, logits, batch)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode is ForwardMode.DECODE
            and batch.batch_size <= self.max_bs
            and sum(batch.seq_lens_cpu) <= self.max_indices
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        padded = next(s for s in self.sizes if s >= bs)
        graph, logits, gbatch = self.graphs[padded]
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.req_pool_indices[bs:padded].fill_(self.pad_row)
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].zero_()
        gbatch.seq_lens_cpu = batch.seq_lens_cpu + [1] * (padded - bs)
        self.backend.plan(gbatch)
        graph.replay()
        return logits[:bs]
