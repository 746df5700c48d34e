"""A step's next tokens: sampled on the device when the step is queued, read on the host
when the scheduler processes the step (at once, or one step later under overlap).

Each request's newest sampled token is also scattered into `last_tokens` (indexed by
req_to_token row) on the device, so the next decode step can take its input from there
before the host has seen the token.
"""

from __future__ import annotations

from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch

from loom.constrain.bitmask import MaskRing
from loom.constrain.whitespace import WhitespaceGuard
from loom.runtime.executor.host_copy import HostCopy, take_rows, to_device
from loom.runtime.sampling import batch as sampling_batches
from loom.runtime.sampling.batch import SamplingBatch
from loom.runtime.sampling.logprobs import OutputLogprobs
from loom.runtime.sampling.penalties import apply_penalties
from loom.runtime.sampling.sampler import sample
from loom.runtime.scheduler.faults import find_culprits
from loom.runtime.scheduler.request import Req


@dataclass
class ForwardedStep:
    """A queued forward whose logits row i is reqs[i]'s next token, not yet sampled.
    Sampling waits until the previous step's tokens are processed, so grammar masks and
    penalties see every token before the one they shape."""

    reqs: list[Req]
    logits: torch.Tensor
    masks: PendingMasks | None = None  # started once the grammars saw the step before


@dataclass
class PendingMasks:
    """A step's grammar masks being filled in the background: row i of `bitmask` for
    reqs[i], i in `rows`."""

    rows: list[int]
    bitmask: torch.Tensor
    slot: int
    filled: Future[None]


@dataclass
class SampledStep:
    """reqs[i] sampled the token in row i; each has it counted in req.pending."""

    reqs: list[Req]
    tokens: HostCopy
    logprobs: OutputLogprobs | None

    def read(self) -> list[int]:
        """Wait for this step's tokens (only), record their logprobs, return the ids."""
        (tokens,) = self.tokens.get()
        if self.logprobs is not None:
            self.logprobs.record(self.reqs)
        return tokens.tolist()


JSON_KINDS = ("json_schema", "json_object")


class StepSampler:
    def __init__(
        self,
        grammar,
        vocab_size: int,
        eos_ids: set[int],
        num_rows: int,
        device,
        whitespace: WhitespaceGuard | None = None,
    ):
        self.grammar = grammar
        self.whitespace = whitespace
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self.last_tokens = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.masks = MaskRing(vocab_size, torch.device(device))

    def forwarded(self, reqs: list[Req], logits: torch.Tensor) -> ForwardedStep:
        """Count the step's token in req.pending as soon as its forward is queued: later
        steps place their tokens after it."""
        for req in reqs:
            req.pending += 1
        return ForwardedStep(reqs, logits)

    def start_masks(self, step: ForwardedStep) -> None:
        """Start filling the step's grammar masks in the background. Call once every
        earlier token is accepted by the grammars; the caller's own work then overlaps
        the fill as well as the forward. A request finished by then is left out; one
        that finishes later is sampled unmasked (its token is discarded)."""
        rows = [
            i
            for i, r in enumerate(step.reqs)
            if r.grammar is not None and not r.finished and not r.grammar.is_terminated()
        ]
        if not rows:
            return
        bitmask, slot = self.masks.take(len(step.reqs))
        matchers = [step.reqs[i].grammar for i in rows]
        guarded = self._whitespace_loops(step.reqs, rows)
        then = (lambda: self.whitespace.restrict(bitmask, guarded)) if guarded else None
        filled = self.grammar.start_fill(matchers, rows, bitmask, then)
        step.masks = PendingMasks(rows, bitmask, slot, filled)

    def _whitespace_loops(self, reqs: list[Req], rows: list[int]) -> list[int]:
        """The JSON rows whose output ends in a whitespace loop (whitespace.py)."""
        if self.whitespace is None:
            return []
        return [
            i
            for i in rows
            if self.whitespace.looping(reqs[i].output_ids)
            and (reqs[i].sampling.constraint or ("",))[0] in JSON_KINDS
        ]

    def queue(self, reqs: list[Req], logits: torch.Tensor) -> SampledStep:
        return self.sample(self.forwarded(reqs, logits))

    @torch.inference_mode()  # penalties, bans and masks edit the runner's logits in place
    def sample(self, step: ForwardedStep) -> SampledStep:
        """Sample each row's token on the device; nothing waits for the device. Requests
        finished since the forward was queued are sampled unmasked (the token is dropped)."""
        reqs, logits = step.reqs, step.logits
        sb = self._sampling_batch(reqs)
        logprob_rows = [i for i, r in enumerate(reqs) if r.return_logprob]
        raw = take_rows(logits, logprob_rows) if logprob_rows else None
        masked = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished]
        if masked and step.masks is None:
            self.start_masks(step)
        penalized = sb.repetition_penalties is not None or sb.frequency_penalties is not None
        if not sb.all_greedy or penalized or masked:
            logits = logits.float()  # bf16 -> a float32 copy; a plain argmax reads bf16 as is
        apply_penalties(logits, sb)
        self._apply_grammar_masks(step, masked, logits)
        next_ids = sample(logits, sb)
        pad = self.last_tokens.numel() - 1  # finished requests gave their row back
        rows = [pad if r.req_pool_idx is None else r.req_pool_idx for r in reqs]
        rows = to_device(rows, torch.int64, self.device)
        self.last_tokens[rows] = next_ids
        logprobs = None
        if raw is not None:
            logprobs = OutputLogprobs(reqs, logprob_rows, raw, take_rows(next_ids, logprob_rows))
        return SampledStep(reqs, HostCopy(next_ids), logprobs)

    def _sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        """The requests' sampling settings on the device. Raises RowFaults naming the
        requests it cannot be built for, when they alone explain a failure (faults.py)."""
        try:
            return self._build_sampling_batch(reqs)
        except Exception as exc:
            culprits = find_culprits(reqs, self._build_sampling_batch)
            if culprits is None:
                raise
            raise culprits from exc

    def _build_sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        return sampling_batches.sampling_batch(reqs, self.vocab_size, self.device, self.eos_ids)

    def without(self, step: ForwardedStep, rows: list[int]) -> ForwardedStep:
        """The step less some rows (their requests no longer sample in it)."""
        if step.masks is not None:
            wait([step.masks.filled])  # its ring slot is reused: let the fill end first
        dropped = set(rows)
        keep = [i for i in range(len(step.reqs)) if i not in dropped]
        return ForwardedStep([step.reqs[i] for i in keep], take_rows(step.logits, keep))

    def _apply_grammar_masks(self, step: ForwardedStep, rows: list[int], logits: torch.Tensor):
        """Wait for the constrained rows' masks (filled in parallel, off the GIL, while the
        forward ran), upload them without waiting for the device, apply them on it.
        Every row in `rows` was filled: a grammar that had terminated at start_masks
        belongs to a request finished since."""
        pending, step.masks = step.masks, None
        if not rows or pending is None:
            return
        pending.filled.result()
        filled = set(pending.rows)
        rows = [i for i in rows if i in filled]
        if not rows:
            return
        device_mask = self.masks.upload(pending.bitmask, pending.slot)
        self.grammar.apply_bitmask(logits, device_mask, to_device(rows, torch.int32, self.device))
