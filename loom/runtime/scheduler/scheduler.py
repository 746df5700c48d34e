"""The scheduler: continuous batching over the KV pool and the prefix cache.

Each `step` runs one forward: an extend batch of newly admitted requests (or the next
chunk of a long prompt), or a decode batch of every running request. Extend and decode
alternate while both have work, so decode keeps going between prefill chunks.

Overlap scheduling (the default): step N + 1's forward is queued on the device, then
the host processes step N's tokens (grammar matchers, finish checks, streaming, freeing
KV) while it runs, then step N + 1's sampling is queued, its grammar masks and penalties
now seeing every earlier token. The device never waits for the host between steps as
long as processing a step takes less time than a forward. A decode step takes its input
tokens from the device (StepSampler.last_tokens) and counts tokens the host has not read
yet (req.pending) in positions and limits. A request that finishes in step N has also
run in step N + 1: that token is discarded. Jump-forward drafts and retraction need a
request's tokens processed before its next forward: they process the queued step first.
"""

from __future__ import annotations

import logging
import random

import torch
from transformers import AutoTokenizer

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.executor.host_copy import take_rows
from loom.runtime.executor.model_runner import ModelRunner
from loom.runtime.forward import ForwardBatch, LogitsOutput
from loom.runtime.sampling.logprobs import gather_prompt_logprobs
from loom.runtime.scheduler import admission, parts
from loom.runtime.scheduler import batch as batching
from loom.runtime.scheduler.faults import RowFaults, fault_reason
from loom.runtime.scheduler.finish import FinishChecker
from loom.runtime.scheduler.info import server_info
from loom.runtime.scheduler.jump_forward import JumpForward, drop_draft
from loom.runtime.scheduler.kv_ops import KVOps
from loom.runtime.scheduler.output import take_output
from loom.runtime.scheduler.policy import SchedulePolicy
from loom.runtime.scheduler.request import FinishReason, Req
from loom.runtime.scheduler.sampling import ForwardedStep, SampledStep
from loom.runtime.scheduler.waiting import WaitingQueue

logger = logging.getLogger(__name__)
NO_TOKEN_FITS = (
    "the constraint allows no token of this model's vocabulary here: it asks for text the "
    "tokenizer cannot write (check the schema, regex or grammar against the tokenizer)"
)


class Scheduler:
    def __init__(self, args: ServerArgs, model_folder: str):
        self.args = args
        self.runner = ModelRunner(args, model_folder)
        self.device = self.runner.device
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or model_folder)
        self.eos_ids = parts.eos_token_ids(self.runner.config, self.tokenizer, model_folder)
        self.kv = KVOps(self.runner, parts.make_cache(args, self.runner))
        self.finish = FinishChecker(self.tokenizer, self.eos_ids, self.runner.context_len)
        self.grammar = parts.make_grammar_backend(
            args, self.tokenizer, self.runner.vocab_size, self.eos_ids
        )
        self.prefill_limits = parts.prefill_limits(args, self.runner)
        self.sampler = parts.step_sampler(self.runner, self.grammar, self.tokenizer, self.eos_ids)
        self.jump = None
        if args.enable_jump_forward:
            ctx = self.runner.context_len
            self.jump = JumpForward(self.tokenizer, ctx, self.kv, self.sampler, self.device, self)
        self.overlap = not args.disable_overlap_schedule
        self.inflight: SampledStep | None = None  # queued, its tokens not yet processed
        self.launched: ForwardedStep | None = None  # a decode step launched early
        self.early_decode = True  # _early_decode (measured: benchmarks/RESULTS.md)
        self.rng = random.Random(args.random_seed)

        policy = SchedulePolicy(args.schedule_policy, self.kv.cache, self.kv.match)
        self.waiting = WaitingQueue(policy, args.grammar_compile_timeout)
        self.running: list[Req] = []
        self.chunked: Req | None = None  # mid-prefill: gets its next chunk before others
        self.outbox: list[m.ReqOutput] = []
        self.last_was_extend = False
        self.token_ratio = admission.NewTokenRatio(args.schedule_conservativeness)
        self.stats = dict.fromkeys(parts.STATS, 0)

    # ---- requests in -------------------------------------------------------------------

    def add_request(self, msg: m.GenerateRequest) -> None:
        seed = msg.sampling.seed if msg.sampling.seed is not None else self.rng.getrandbits(62)
        req = Req.from_message(msg, seed)
        try:
            self._enqueue(req, msg)
        except Exception as exc:  # noqa: BLE001 - one request's fault (faults.py)
            self.fail(req, exc)

    def _enqueue(self, req: Req, msg: m.GenerateRequest) -> None:
        problem = admission.admissibility_problem(req, self.runner, self.grammar is not None)
        if problem:
            self._finish(req, FinishReason("abort", None, problem))
            return
        constraint, lenient = msg.sampling.constraint, msg.sampling.json_schema_lenient
        matcher = None if constraint is None else self.grammar.get_matcher(*constraint, lenient)
        self.waiting.add(req, matcher)

    def abort(self, rid: str) -> None:
        for req in self.waiting.remove(rid):
            self._finish(req, FinishReason("abort", None, "aborted by the client"))
        for req in self.running + ([self.chunked] if self.chunked else []):
            if req.rid == rid and not req.finished:
                self._finish(req, FinishReason("abort", None, "aborted by the client"))
                self.kv.release(req, finished=True)
        self.running = [r for r in self.running if not r.finished]
        if self.chunked is not None and self.chunked.finished:
            self.chunked = None

    def flush_cache(self) -> m.FlushCacheResult:
        self.drain()
        if self.running or self.chunked or self.waiting or self.launched:
            return m.FlushCacheResult(False, "requests are in flight; flush when idle")
        self.kv.cache.reset()
        return m.FlushCacheResult(True)

    def server_info(self) -> m.ServerInfo:
        running = len(self.running) + (1 if self.chunked else 0)
        waiting = len(self.waiting) + len(self.waiting.compiling)
        return server_info(self.runner, self.kv, self.stats, self.jump, running, waiting)

    def has_work(self) -> bool:
        return self.can_step() or bool(self.waiting.compiling)

    def can_step(self) -> bool:  # work a step can do now, not only grammars compiling
        return bool(self.waiting or self.chunked or self.running or self.inflight or self.launched)

    def take_outputs(self) -> list[m.ReqOutput]:
        out, self.outbox = self.outbox, []
        return out

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> None:
        """Queue the next step; process the previous one's (overlap) or this one's tokens."""
        self._poll_grammars()
        forwarded, self.launched = self.launched or self._queue_step(), None
        self.drain(forwarded)
        if forwarded is None:
            return
        early = self._early_decode(forwarded)
        queued = self._sample(forwarded)
        if self.overlap:
            self.inflight = queued
            self.stats["deferred_steps"] += 1
        else:
            self._process(queued)
        if early is not None:
            reqs, batch = early
            batch = batching.take_last_tokens(batch, self.sampler.last_tokens)
            self.launched = self.sampler.forwarded(reqs, self.forward(batch).next_logits)

    def _early_decode(self, step: ForwardedStep) -> tuple[list[Req], ForwardBatch] | None:
        """While a step's grammar masks fill, the host part of the decode step after it
        (its requests, KV slots and inputs but the tokens, which that step samples), so the
        fill hides behind it; launched once the step is sampled. Only when that next step
        is surely a decode of the same requests: nothing waiting, nothing to retract."""
        if not (self.overlap and self.early_decode and step.masks is not None):
            return None
        if self.waiting or self.chunked or self.jump is not None or not self.running:
            return None
        if self._needs_host_state(self.running):  # retraction may be due
            return None
        reqs, slots = self._decoders_with_slots()
        if not reqs:
            return None
        self.token_ratio.decay()
        self.last_was_extend = False
        self.stats["early_decode_steps"] += 1
        return reqs, batching.decode_batch(reqs, slots, self.device, None)

    def drain(self, following: ForwardedStep | None = None) -> None:
        """Process the queued step's tokens now (waits for the device). `following`, the
        step queued after it, has its grammar masks started as soon as its requests'
        grammars have seen these tokens."""
        if self.inflight is not None:
            step, self.inflight = self.inflight, None
            self._process(step, following)

    def _queue_step(self) -> ForwardedStep | None:
        decode_first = self.last_was_extend and self.running
        if not decode_first:
            ran, queued = self._run_extend_step()
            if ran:
                return queued
        self.last_was_extend = False
        return self._run_decode_step() if self.running else None

    def _poll_grammars(self) -> None:
        for req, why in self.waiting.poll_grammars():
            self._finish(req, FinishReason("abort", None, why))

    def _plan_prefill(self) -> admission.PrefillPlan:
        """The next extend batch (admission.py): the chunked request's next chunk first,
        then waiting requests in policy order. The admitted leave `waiting`."""
        adder = admission.PrefillAdder(self.prefill_limits, self.kv, self.running, self.token_ratio)
        chunked, self.chunked = self.chunked, None
        if chunked is not None and not adder.continue_chunk(chunked):
            self.retract(chunked)
        if not adder.full and self.waiting:
            adder.add_from(self.waiting.in_admission_order(), self.waiting.aged)
        plan = adder.plan()
        self.stats["cache_hit_tokens"] += plan.cache_hit_tokens
        self.stats["prompt_tokens"] += plan.prompt_tokens
        self.waiting.take(plan.reqs)
        return plan

    def _run_extend_step(self) -> tuple[bool, ForwardedStep | None]:
        if not self.waiting and self.chunked is None:
            return False, None  # nothing to prefill: skip planning over every running request
        plan = self._plan_prefill()
        if not plan.reqs:
            return False, None
        riders = self._decode_riders()
        batch = batching.extend_batch(
            plan.reqs + riders,
            plan.starts + [r.kv_len - 1 for r in riders],
            self.runner.req_to_token_pool,
            self.device,
            self.sampler.last_tokens,
            len(riders),
        )
        out = self.forward(batch)
        # A mixed step decoded the running requests too: no decode step is owed next.
        self.last_was_extend = not riders
        self.stats["mixed_steps"] += bool(riders)
        gather_prompt_logprobs(plan.reqs, plan.starts, out)
        done = [r for r in plan.reqs if r.kv_len == r.seqlen]
        self.chunked = plan.chunked
        for req in plan.reqs:  # siblings arriving from now on share these prompts at once
            self.kv.cache_unfinished(req)
        # max_new_tokens == 0 asks only for the prompt's logprobs: nothing is sampled.
        for req in done:
            if req.sampling.max_new_tokens == 0:
                self._finish(req, FinishReason("length", None))
                self.kv.release(req, finished=True)
        rows = [i for i, r in enumerate(plan.reqs) if r.kv_len == r.seqlen and not r.finished]
        done = [plan.reqs[i] for i in rows]
        self.running.extend(done)
        rows += range(len(plan.reqs), len(plan.reqs) + len(riders))
        sampled = done + riders
        if not sampled:
            return True, None
        return True, self.sampler.forwarded(sampled, take_rows(out.next_logits, rows))

    def _decode_riders(self) -> list[Req]:
        """Running requests that decode in the coming prefill's forward (mixed step): the
        weights are read once for both, and decoding does not stall behind prefills.
        None when the step needs the host's view first (drafts) or KV is short."""
        if not self.args.enable_mixed_chunk or not self.running:
            return []
        if self._needs_host_state(self.running):
            return []
        riders, _ = self._decoders_with_slots()  # budget checked: no retraction
        return riders

    def _run_decode_step(self) -> ForwardedStep | None:
        if self.inflight is not None and self._needs_host_state(self.running):
            self.drain()
        reqs, slots = self._decoders_with_slots()
        if not reqs:
            return None
        self.token_ratio.decay()
        if self.jump is not None and any(r.draft_len for r in reqs):
            self.jump.run_decode_step(reqs)  # drafts exist only with nothing in flight
            self.running = [r for r in self.running if not r.finished]
            return None
        batch = batching.decode_batch(reqs, slots, self.device, self.sampler.last_tokens)
        return self.sampler.forwarded(reqs, self.forward(batch).next_logits)

    def _decoders_with_slots(self) -> tuple[list[Req], torch.Tensor | None]:
        """The running requests that decode now, each given the KV slot of its next token
        (retracting the least advanced when even eviction cannot make room). A request
        whose queued token reaches its length limit is done: it is skipped."""
        reqs = [r for r in self.running if not self.finish.out_of_room(r)]
        slots = self.kv.alloc_decode_slots(reqs, self.retract)
        return reqs, slots

    def _needs_host_state(self, reqs: list[Req]) -> bool:
        """Whether the next forward needs the queued step's tokens on the host first:
        a jump-forward draft follows the grammar's state after them, and retraction must
        not take a request whose token is still on its way."""
        if self.jump is not None and any(r.grammar is not None or r.draft_len for r in reqs):
            return True
        return self.kv.budget() < len(reqs)

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        self.stats["forward_steps"] += 1
        return self.runner.forward(batch)

    def retract(self, req: Req) -> None:
        """Preempt: free the request's KV and requeue it at the front; it restarts later
        from its tokens so far (the result is the same, only recomputed). A request that
        alone outgrew the pool is finished instead (length): requeued, it could never be
        admitted again. It leaves `running` either way."""
        assert not req.pending, "a request is retracted only once its tokens are processed"
        drop_draft(req)
        self.running = [r for r in self.running if r is not req]
        # Nothing else holds KV, or its tokens and the next fill the pool even alone.
        if not self.running and self.chunked is None or not self.kv.fits_alone(req.seqlen + 1):
            self._finish(req, FinishReason("length", None, self.kv.full_message(req.seqlen)))
            self.kv.release(req, finished=True)
            return
        self.kv.release(req, finished=False)
        if not req.output_ids:  # prompt logprobs are gathered again on re-prefill
            req.input_token_logprobs.clear()
            req.input_top_logprobs.clear()
        req.retractions += 1
        self.stats["retractions"] += 1
        self.token_ratio.reset()
        self.waiting.requeue(req)
        logger.info("retracted %s (%d tokens generated) to free KV", req.rid, len(req.output_ids))

    # ---- tokens out --------------------------------------------------------------------

    def _process(self, step: SampledStep, following: ForwardedStep | None = None) -> None:
        """Append a step's tokens to its requests: finish, stream, free, draft. The
        grammars take the tokens first; then `following`'s masks fill in the background
        while the rest is done here (which then leaves its matchers alone: with
        jump-forward, which drafts from them, masks start only when sampling)."""
        tokens = step.read()
        live = []
        for req, token in zip(step.reqs, tokens):
            req.pending -= 1
            if req.finished:  # finished after this step was queued: the token is discarded
                continue
            try:
                live.append((req, token, req.accept_grammar(token)))
            except Exception as exc:  # noqa: BLE001 - one request's fault (faults.py)
                self.fail(req, exc)
        if following is not None and self.jump is None:
            self.sampler.start_masks(following)
        for req, token, grammar_ok in live:
            try:
                self.advance(req, token, grammar_ok)
                self.settle(req)
            except Exception as exc:  # noqa: BLE001 - one request's fault (faults.py)
                self.fail(req, exc)
        self.running = [r for r in self.running if not r.finished]

    def _sample(self, step: ForwardedStep) -> SampledStep:
        """Queue the step's sampling. Requests whose values its batch cannot be built
        from are aborted and the others sampled (faults.py)."""
        try:
            return self.sampler.sample(step)
        except RowFaults as fault:
            for i, exc in fault.rows:
                step.reqs[i].pending -= 1  # it leaves the step: its token never comes
                self.fail(step.reqs[i], exc)
            return self.sampler.sample(self.sampler.without(step, [i for i, _ in fault.rows]))

    def fail(self, req: Req, exc: Exception) -> None:
        """Abort a request an error was raised for (faults.py) and free its KV, never
        caching it: the error may have left its tokens half-processed."""
        logger.error("request %s raised %r: aborted", req.rid, exc, exc_info=exc)
        if not req.finished:
            self._finish(req, fault_reason(exc))
        self.kv.release(req, finished=False)
        self.running = [r for r in self.running if r is not req]

    def sample_and_advance(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """Sample and process at once (nothing may be in flight)."""
        if reqs:
            self._process(self._sample(self.sampler.forwarded(reqs, logits)))

    def advance(self, req: Req, token: int, grammar_ok: bool | None = None) -> None:
        """Append one sampled token; finish the request if it is done. `grammar_ok`:
        whether the grammar already took the token (None: it is given it here)."""
        req.output_ids.append(token)
        self.stats["generation_tokens"] += 1
        if grammar_ok is None:
            grammar_ok = req.accept_grammar(token)
        if not grammar_ok:  # masked sampling draws only allowed tokens: the mask was empty
            self._finish(req, FinishReason("abort", None, NO_TOKEN_FITS))
            return
        reason = self.finish.check(req)
        if reason is not None:
            self._finish(req, reason)

    def settle(self, req: Req) -> None:
        """After a request's new tokens: free it if finished, else stream them and draft
        what its grammar forces next (jump-forward)."""
        if req.finished:
            self.kv.release(req, finished=True)
            return
        if req.stream:
            self._emit(req)
        if self.jump is not None and req.grammar is not None:
            self.jump.draft(req)

    def _finish(self, req: Req, reason: FinishReason) -> None:
        drop_draft(req)  # only verified tokens are ever returned
        self.finish.conclude(req, reason)
        self._emit(req)

    def _emit(self, req: Req) -> None:
        self.outbox.append(take_output(req))
