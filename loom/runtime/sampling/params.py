"""Per-request sampling parameters (SGLang's field names), validated before scheduling."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from loom.constrain.strictness import open_schema_text


class InvalidRequestError(ValueError):
    """A request the caller must fix; nothing was scheduled."""


MAX_N = 128  # completions of one request: each holds its own KV and decode slot

# SGLang's frontend sends these with every request; loom accepts them while unset.
_ACCEPTED_WHEN_UNSET = ("stop_regex",)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    # Constraints (one at most): compiled by the grammar backend.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_object: bool = False
    # Accept JSON schemas with keywords the grammar cannot enforce; the output is then
    # validated afterwards and a violation reported in meta_info instead of a 400.
    json_schema_lenient: bool = False
    # Extra object keys / array items where the schema says nothing about them: refused
    # (strict, as xgrammar's strict mode, SGLang and vLLM) or allowed (JSON Schema's own
    # meaning). loom/constrain/strictness.py.
    json_schema_strict: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> SamplingParams:
        d = dict(d or {})
        for key in _ACCEPTED_WHEN_UNSET:
            if d.get(key) not in (None, [], ""):
                raise InvalidRequestError(
                    f"{key} is not supported; use stop (strings) or stop_token_ids"
                )
            d.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; valid: {sorted(names)}"
            )
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if isinstance(d.get("stop_token_ids"), int):
            d["stop_token_ids"] = [d["stop_token_ids"]]
        for key in ("stop", "stop_token_ids"):
            if d.get(key) is None and key in d:
                d[key] = []
        params = cls(**d)
        params.validate()
        return params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the grammar constraint, or None."""
        if self.json_schema is not None:
            if not self.json_schema_strict and isinstance(self.json_schema, str):
                return ("json_schema", open_schema_text(self.json_schema))
            return ("json_schema", self.json_schema)
        if self.regex is not None:
            return ("regex", self.regex)
        if self.ebnf is not None:
            return ("ebnf", self.ebnf)
        if self.json_object:
            return ("json_object", "")
        return None

    def validate(self) -> None:
        _check_types(self)
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            problems.append(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            problems.append(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.n > MAX_N:
            problems.append(f"n must be <= {MAX_N} (OpenAI's limit too), got {self.n}")
        if any(s == "" for s in self.stop):
            problems.append("stop strings must be non-empty")
        if not all(is_valid_unicode(s) for s in self.stop):
            problems.append("stop strings must be valid Unicode (a lone surrogate is not)")
        for name in ("json_schema", "regex", "ebnf"):
            if isinstance(getattr(self, name), str) and not is_valid_unicode(getattr(self, name)):
                problems.append(f"{name} must be valid Unicode (a lone surrogate is not)")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty")
        for name in (*floats, "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            problems.append(f"seed must fit in 64 bits, got {self.seed}")
        if any(t >= 2**63 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be token ids of the model's vocabulary")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be >= 0")
        kinds = [k for k in ("json_schema", "regex", "ebnf") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) > 1:
            problems.append(f"give one constraint per request, got {kinds}")
        if problems:
            raise InvalidRequestError("; ".join(problems))


def is_valid_unicode(text: str) -> bool:
    """Whether text can be UTF-8 encoded (JSON may carry lone surrogates; no text holds them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_FIELD_TYPES = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
}


def _check_types(p: SamplingParams) -> None:
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        base = {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" ")[0])
        if value is None:
            if f.type.endswith("None"):
                continue
            raise InvalidRequestError(f"{f.name} must not be null")
        if base is not None:
            ok = isinstance(value, _FIELD_TYPES[base]) and (
                base is bool or not isinstance(value, bool)
            )
            if not ok:
                raise InvalidRequestError(
                    f"{f.name} must be {base.__name__}, got {type(value).__name__} {value!r}"
                )
        elif f.type.startswith("list[str]"):
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise InvalidRequestError(f"{f.name} must be a string or a list of strings")
        elif f.type.startswith("list[int]"):
            if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in value
            ):
                raise InvalidRequestError(f"{f.name} must be an int or a list of ints")
        elif f.type.startswith("str"):
            if not isinstance(value, str):
                raise InvalidRequestError(f"{f.name} must be a string")
