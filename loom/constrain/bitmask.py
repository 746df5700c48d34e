"""Token bitmasks: row r, int32 word w, bit b allows token 32 * w + b.

xgrammar and llguidance both fill this layout, so one step's rows may come from either;
xgrammar's kernel applies it to the logits on their device.
"""

from __future__ import annotations

import torch
import xgrammar as xgr


def allocate(batch_size: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """A CPU bitmask of batch_size rows, every token allowed."""
    words = (vocab_size + 31) // 32
    return torch.full((batch_size, words), -1, dtype=torch.int32, pin_memory=pin)


def apply(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    vocab_size: int,
    rows: list[int] | torch.Tensor | None = None,
) -> None:
    """Set the logits of disallowed tokens to -inf in place (only `rows` when given). Ids
    past the grammar's vocabulary (the model's padding) are never allowed. On the hot path
    `rows` comes as a tensor already on the logits' device: a list goes up from pageable
    memory, which on CUDA first waits for everything queued, the running forward included."""
    if rows is not None and len(rows) == 0:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    indices = None
    if rows is not None:
        indices = torch.as_tensor(rows, dtype=torch.int32, device=logits.device)
    width = min(logits.shape[-1], vocab_size, bitmask.shape[-1] * 32)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, indices=indices)
    if logits.shape[-1] > width:
        if indices is None:
            logits[:, width:] = float("-inf")
        else:
            logits[indices.long(), width:] = float("-inf")


class MaskRing:
    """Pinned host bitmasks handed out in turn, so a step's mask uploads without making
    the host wait for the device (a pageable upload waits for the running forward).

    Invariant: a buffer is refilled only after the device has read its last upload; the
    event recorded after that upload is waited on first (long complete in steady state,
    as `depth` steps have passed)."""

    def __init__(self, vocab_size: int, device: torch.device, depth: int = 3):
        self.vocab_size = vocab_size
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0

    def take(self, batch_size: int) -> tuple[torch.Tensor, int]:
        """A host bitmask of batch_size rows and its slot. Rows hold stale values: fill
        every row the step applies."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        event = self._events[slot]
        if event is not None:
            event.synchronize()
        buf = self._buffers[slot]
        if buf is None or buf.shape[0] < batch_size:
            rows = max(batch_size, 64 if buf is None else 2 * buf.shape[0])
            buf = self._buffers[slot] = allocate(rows, self.vocab_size, self.pinned)
        return buf[:batch_size], slot

    def upload(self, bitmask: torch.Tensor, slot: int) -> torch.Tensor:
        """bitmask on the device, its host buffer guarded until the copy has run."""
        if self.device.type != "cuda":
            return bitmask
        on_device = bitmask.to(self.device, non_blocking=True)
        event = self._events[slot] or torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return on_device
