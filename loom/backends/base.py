"""The program-backend interface: where a loom program's gens, selects and prefix warm-ups run.

A backend sees plain requests (prompt text plus SGLang-named sampling parameters); it never
sees the language's expressions. Three implementations: `EngineBackend` (in-process),
`RuntimeEndpoint` (HTTP to `loom serve`), `OpenAI` (any OpenAI-compatible server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class BackendError(RuntimeError):
    """The backend could not serve a request; the message says why and what to change."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the interpreter adapts to it."""

    grammar: bool  # regex / json_schema / ebnf enforced while decoding
    chat_api: bool  # gens go through a chat API (messages), not raw prompt text
    scoring: bool  # prompt-token logprobs, so `select` can score choices
    cache: bool  # a prefix cache that `cache_prefix` can warm
    # continues text the program wrote: raw prompt text, or on a chat API a begun assistant
    # message (so literal text a constraint forces can be sent as prompt text)
    continue_text: bool = True


@dataclass(frozen=True)
class GenRequest:
    prompt: str
    sampling_params: dict  # SGLang's names: max_new_tokens, stop, regex, json_schema, ...
    messages: tuple[dict, ...] = ()  # the conversation so far, for chat-API backends
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class GenResult:
    """A completion, or (from `stream`) a piece of one: `text` is then the new text and
    `meta_info` the meta info so far. meta_info carries at least prompt_tokens,
    completion_tokens, cached_tokens and finish_reason."""

    text: str
    meta_info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChoiceScore:
    """Log-probabilities of one `select` choice's tokens after the prompt.

    `logprobs` covers every token from the first one where the prompt+choice tokenizations
    part (shared by all choices, so choices are compared under the same context);
    `unconditional` the choice's own tokens with no context (None unless asked for)."""

    logprobs: tuple[float, ...]
    unconditional: tuple[float, ...] | None = None
    tokens: tuple[str, ...] = ()
    prompt_tokens: int = 0  # of the prompt+choice request
    cached_tokens: int = 0


@dataclass(frozen=True)
class ChatTemplate:
    """The model's chat template as a renderer: (messages, add_generation_prompt) -> text.
    `implicit_prefix` is text the tokenizer adds by itself (a BOS the template writes
    too); the language drops it from the rendered text so it is not sent twice."""

    render: Callable[[list[dict], bool], str]
    implicit_prefix: str = ""
    name: str = "model"
    source: str | None = None  # the Jinja text, where known (tool-call format detection)


class ProgramBackend(ABC):
    """Runs the requests of a program. Methods may be called from many threads at once."""

    capabilities: Capabilities

    @abstractmethod
    def generate(self, req: GenRequest) -> GenResult:
        """One completion of `req.prompt` (or of `req.messages` on chat-API backends)."""

    def generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Several completions submitted together (so shared prefixes are computed once)."""
        if len(reqs) <= 1:
            return [self.generate(r) for r in reqs]
        with ThreadPoolExecutor(len(reqs)) as pool:
            return list(pool.map(self.generate, reqs))

    def stream(self, req: GenRequest) -> Iterator[GenResult]:
        """The completion as pieces of new text; the last piece has the final meta_info."""
        yield self.generate(req)

    def score_choices(
        self, prompt: str, choices: list[str], unconditional: bool = False
    ) -> list[ChoiceScore]:
        """Score each choice as a continuation of `prompt`, in one batched request."""
        raise BackendError(f"{type(self).__name__} cannot score choices (no prompt logprobs)")

    def cache_prefix(self, prompt: str) -> None:
        """Compute and cache the KV of `prompt` (no tokens generated); a no-op by default."""

    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template, or None (the language then uses a plain one)."""
        return None

    def shutdown(self) -> None:
        """Release what the backend holds (it owns nothing by default)."""
