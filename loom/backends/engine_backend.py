"""Programs run in-process on a `loom.Engine`."""

from __future__ import annotations

from collections.abc import Iterator

from loom.backends.base import (
    Capabilities,
    ChatTemplate,
    ChoiceScore,
    GenRequest,
    GenResult,
    ProgramBackend,
)
from loom.backends.hf_tokenizer import chat_template_of, choice_batch, choice_scores

_SCORE_PARAMS = {"max_new_tokens": 0, "temperature": 0.0}


class EngineBackend(ProgramBackend):
    """Wraps an Engine (or anything with its `generate` and `tokenizer`). The backend does
    not own the engine: shutting the backend down leaves the engine running."""

    capabilities = Capabilities(grammar=True, chat_api=False, scoring=True, cache=True)

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def generate(self, req: GenRequest) -> GenResult:
        out = self.engine.generate(req.prompt, req.sampling_params, **_logprob_args(req))
        return GenResult(out["text"], out["meta_info"])

    def generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        if not reqs:
            return []
        outs = self.engine.generate(
            [r.prompt for r in reqs],
            [r.sampling_params for r in reqs],
            return_logprob=[r.return_logprob for r in reqs],
            top_logprobs_num=[r.top_logprobs_num for r in reqs],
            return_text_in_logprobs=True,
        )
        return [GenResult(o["text"], o["meta_info"]) for o in outs]

    def stream(self, req: GenRequest) -> Iterator[GenResult]:
        chunks = self.engine.generate(
            req.prompt, req.sampling_params, stream=True, **_logprob_args(req)
        )
        for chunk in chunks:
            yield GenResult(chunk["text"], chunk["meta_info"])

    def score_choices(
        self, prompt: str, choices: list[str], unconditional: bool = False
    ) -> list[ChoiceScore]:
        batch = choice_batch(self.tokenizer, prompt, choices, unconditional)
        results = self.engine.generate(
            input_ids=batch.input_ids,
            sampling_params=_SCORE_PARAMS,
            return_logprob=True,
            logprob_start_len=batch.logprob_start_len,
            return_text_in_logprobs=True,
        )
        return choice_scores(batch, results)

    def cache_prefix(self, prompt: str) -> None:
        if prompt:
            self.engine.generate(prompt, {"max_new_tokens": 0})

    def chat_template(self) -> ChatTemplate | None:
        return chat_template_of(self.tokenizer)


def _logprob_args(req: GenRequest) -> dict:
    if not req.return_logprob:
        return {}
    return {
        "return_logprob": True,
        "top_logprobs_num": req.top_logprobs_num,
        "return_text_in_logprobs": True,
    }
