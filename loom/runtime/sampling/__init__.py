"""Sampling: a request's parameters (params.py), the per-step batch of them on the device
(batch.py), penalties and bans on the logits (penalties.py), the draw of the next tokens
(sampler.py) and the logprobs a request asked for (logprobs.py).

The scheduler's step pipeline (scheduler/sampling.py) runs them in order each step; this
package never imports the scheduler: it reads requests through small protocols.
"""
