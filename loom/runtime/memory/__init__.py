"""KV memory: the token-slot allocator, the request-to-token table and the per-layer KV
pool they index. The prefix cache (loom/radix) only decides which slots stay shared.

Slot 0 of the KV pool is never handed out: padded rows of a batch (CUDA graphs) write
their K/V there, so it must not belong to any request.
"""
