"""Programs run on a `loom serve` over HTTP.

`loom.RuntimeEndpoint(url)` is the HTTP client (`loom/backends/runtime_endpoint.py`); its
`generate` has the Engine's signature and results, so this backend is the Engine backend
over that client. It builds the server's tokenizer here from the files the server serves
(GET /tokenizer/files, the server's --chat-template included), for the chat template and
for scoring `select` choices by token ids, so a program runs the same on a server on
another machine. Without one (an older server), roles fall back to the plain template
and select is refused with a clear error.
"""

from __future__ import annotations

import logging
from typing import Any

from loom.backends.base import BackendError, Capabilities, ChoiceScore
from loom.backends.engine_backend import EngineBackend

logger = logging.getLogger(__name__)


class EndpointBackend(EngineBackend):
    def __init__(self, endpoint: Any, tokenizer: Any = None):
        self.engine = endpoint
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(endpoint)
        has_tokenizer = self.tokenizer is not None
        self.capabilities = Capabilities(
            grammar=True, chat_api=False, scoring=has_tokenizer, cache=True
        )

    def score_choices(
        self, prompt: str, choices: list[str], unconditional: bool = False
    ) -> list[ChoiceScore]:
        if self.tokenizer is None:
            raise BackendError(
                "select needs the server's tokenizer to score choices, and it could not be "
                "loaded here; pass tokenizer= to EndpointBackend"
            )
        return super().score_choices(prompt, choices, unconditional)

    def chat_template(self):
        return super().chat_template() if self.tokenizer is not None else None

    def shutdown(self) -> None:
        self.engine.close()


def _load_tokenizer(endpoint: Any) -> Any:
    try:
        return endpoint.get_tokenizer()
    except Exception as e:  # noqa: BLE001 - any failure: run without a local tokenizer
        logger.warning("cannot load the server's tokenizer here (%s); select is off", e)
        return None
