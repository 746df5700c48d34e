"""A scripted program backend for model-free language tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from loom.backends.base import (
    Capabilities,
    ChatTemplate,
    ChoiceScore,
    GenRequest,
    GenResult,
    ProgramBackend,
)

FULL = Capabilities(grammar=True, chat_api=False, scoring=True, cache=True)


class FakeBackend(ProgramBackend):
    """`reply(request) -> text` answers gens (default: "<out N>"); `scores` maps a choice to
    its token logprobs; every call is recorded."""

    def __init__(
        self,
        reply: Callable[[GenRequest], str] | None = None,
        scores: dict[str, list[float]] | None = None,
        capabilities: Capabilities = FULL,
        template: ChatTemplate | None = None,
    ):
        self.reply = reply or (lambda req: f"<out {len(self.requests)}>")
        self.scores = scores or {}
        self.capabilities = capabilities
        self.template = template
        self.lock = threading.Lock()
        self.requests: list[GenRequest] = []
        self.cached: list[str] = []
        self.scored: list[tuple[str, list[str]]] = []

    def generate(self, req: GenRequest) -> GenResult:
        with self.lock:
            self.requests.append(req)
        text = self.reply(req)
        meta = {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(text),
            "cached_tokens": 0,
            "finish_reason": {"type": "stop"},
        }
        return GenResult(text, meta)

    def stream(self, req: GenRequest) -> Iterator[GenResult]:
        result = self.generate(req)
        for i in range(0, len(result.text), 3):
            yield GenResult(result.text[i : i + 3], result.meta_info)

    def score_choices(self, prompt, choices, unconditional=False):
        with self.lock:
            self.scored.append((prompt, list(choices)))
        return [
            ChoiceScore(
                tuple(self.scores.get(c, [-1.0])),
                tuple(self.scores.get("uncond:" + c, [-1.0])) if unconditional else None,
            )
            for c in choices
        ]

    def cache_prefix(self, prompt: str) -> None:
        with self.lock:
            self.cached.append(prompt)

    def chat_template(self) -> ChatTemplate | None:
        return self.template
