"""One dataclass of server arguments; `loom serve` / `loom generate` flags are generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

from loom.runtime.logs import LOG_FORMATS, LOG_LEVELS

# Where `loom serve` and loom's clients (RuntimeEndpoint, Runtime) read the API key when
# no argument gives it: an environment variable stays out of the process list.
API_KEY_ENV = "LOOM_API_KEY"


def _arg(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ServerArgs:
    # Model and weights
    model_path: str | None = _arg(
        None, "HF folder, .gguf file or hub id; omitted: the embedded SmolLM2-135M-Instruct"
    )
    tokenizer_path: str | None = _arg(None, "tokenizer folder (defaults to the model's)")
    load_format: str = _arg(
        "auto",
        "weights to read: auto (*.safetensors, else pytorch_model*.bin), safetensors, pt "
        "(pytorch_model*.bin), gguf (--model-path is a .gguf file), dummy (random weights)",
        ("auto", "safetensors", "pt", "gguf", "dummy"),
    )
    dtype: str = _arg(
        "auto",
        "weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU)",
        ("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto")
    context_length: int | None = _arg(None, "max tokens of prompt + output (default: the model's)")
    served_model_name: str | None = _arg(None, "the model name the OpenAI API reports")
    chat_template: str | None = _arg(None, "a Jinja chat template file overriding the model's")

    # Memory
    max_total_tokens: int | None = _arg(None, "KV pool size in tokens (overrides the fraction)")
    mem_fraction_static: float | None = _arg(
        None, "fraction of free device memory for weights + KV pool (CUDA default 0.85)"
    )
    max_running_requests: int | None = _arg(None, "most requests decoded together")
    max_prefill_tokens: int = _arg(16384, "most new tokens in one prefill batch")
    chunked_prefill_size: int | None = _arg(
        None, "prefill long prompts in chunks of this many tokens (-1 disables)"
    )

    # Scheduling and caching
    schedule_policy: str = _arg("lpm", "waiting-queue order", ("lpm", "dfs-weight", "fcfs"))
    schedule_conservativeness: float = _arg(
        1.0, "weight of the KV reserve kept for running requests' future tokens"
    )
    disable_radix_cache: bool = _arg(False, "share no KV between requests (for comparison)")
    enable_mixed_chunk: bool = _arg(
        False, "decode the running requests in the same forward as a prefill"
    )
    max_queued_requests: int | None = _arg(None, "answer 503 beyond this many waiting requests")

    # Kernels
    attention_backend: str | None = _arg(
        None,
        "attention kernels (default: flashinfer on CUDA, torch_native elsewhere)",
        ("torch_native", "flashinfer"),
    )
    disable_cuda_graph: bool = _arg(False, "run decode eagerly")
    cuda_graph_max_bs: int = _arg(1024, "largest decode batch captured in a CUDA graph")
    disable_overlap_schedule: bool = _arg(False, "prepare batch N+1 only after batch N")
    disable_fused_kernels: bool = _arg(
        False, "run the reference torch layers on CUDA too (no fused norm / rotary / SiLU)"
    )
    disable_small_batch_kernels: bool = _arg(
        False, "decode small batches with cuBLAS instead of loom's Triton matrix-vector kernels"
    )
    disable_pdl: bool = _arg(
        False, "launch the small-batch kernels without programmatic dependent launch (Hopper)"
    )

    # Constrained decoding
    grammar_backend: str = _arg(
        "auto",
        "grammar engine (auto: per constraint, the first of xgrammar / llguidance that "
        "enforces it exactly)",
        ("auto", "llguidance", "xgrammar", "none"),
    )
    enable_jump_forward: bool = _arg(
        False, "run grammar-forced text as a verified draft (exact; steps wait for the host)"
    )
    grammar_compile_timeout: float = _arg(30.0, "seconds a grammar may take to compile")
    grammar_mask_threads: int | None = _arg(
        None, "threads filling a step's token masks (default: the cores but one, at most 8)"
    )

    # Server
    host: str = _arg("127.0.0.1", "HTTP host")
    port: int = _arg(30000, "HTTP port")
    random_seed: int | None = _arg(None, "seed for requests that give none")
    log_level: str = _arg("info", "logging level", LOG_LEVELS)
    log_format: str = _arg(
        "text", "log lines as text or as one JSON object per line (every process)", LOG_FORMATS
    )
    log_interval: float = _arg(
        10.0,
        "seconds between the scheduler's load lines (running, waiting, KV use, cache hits, "
        "tokens/s) while it has work; 0 turns them off",
    )
    watchdog_timeout: float = _arg(
        300.0,
        "seconds the scheduler or detokenizer may go without progress before it counts as "
        "hung: requests fail, /health answers 503 and the server exits with status 1; must "
        "exceed the longest step, first-use kernel compiles included",
    )
    api_key: str | None = _arg(
        None,
        "require `Authorization: Bearer <key>` on every route but /health, /health_generate "
        "and /metrics; LOOM_API_KEY sets it too, and keeps it out of the process list",
    )
    max_request_body_bytes: int = _arg(
        32 * 2**20,
        "answer 413 to a larger request body (32 MiB holds a 1M-token prompt as text, "
        "\\u-escaped text or token ids)",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        if self.schedule_conservativeness <= 0:
            raise ValueError("schedule_conservativeness must be > 0")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static must be in (0, 1)")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError("max_total_tokens must be at least 16")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("max_running_requests must be at least 1")
        if self.grammar_mask_threads is not None and self.grammar_mask_threads < 1:
            raise ValueError("grammar_mask_threads must be at least 1")
        if not self.watchdog_timeout > 0:  # NaN too
            raise ValueError("watchdog_timeout must be > 0 seconds")
        if not self.log_interval >= 0:  # NaN too
            raise ValueError("log_interval must be >= 0 seconds (0 turns the load lines off)")
        if self.load_format == "gguf" and not str(self.model_path or "x.gguf").endswith(".gguf"):
            raise ValueError("--load-format gguf needs --model-path to name a .gguf file")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be at least 1")

    @classmethod
    def from_kwargs(cls, **kwargs) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown server argument(s) {unknown}; valid: {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if hints[f.name] is bool:  # --flag / --no-flag
                action = argparse.BooleanOptionalAction
                parser.add_argument(flag, action=action, default=f.default, help=help_text)
                continue
            parser.add_argument(
                flag,
                type=scalar_type(hints[f.name]),
                default=f.default,
                choices=f.metadata.get("choices"),
                help=f"{help_text} (default: {f.default})",
            )

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> ServerArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def scalar_type(hint) -> type:
    """int | None -> int, so argparse converts flag values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
