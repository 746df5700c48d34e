"""loom: a structured-generation language and radix-attention runtime for LLMs."""

from __future__ import annotations

from loom.version import __version__ as __version__

# The language: name -> the module that defines it (imported on first use).
_LANG = {
    **dict.fromkeys(
        "gen gen_int gen_float gen_bool gen_string select system user assistant system_begin "
        "system_end user_begin user_end assistant_begin assistant_end tools_prompt".split(),
        "loom.lang.api",
    ),
    **dict.fromkeys(["function", "Program"], "loom.lang.program"),
    **dict.fromkeys(
        "token_length_normalized greedy_token_selection unconditional_likelihood_normalized".split(),
        "loom.lang.choices",
    ),
    **dict.fromkeys(["set_default_backend", "get_default_backend"], "loom.lang.backend_context"),
    **dict.fromkeys(["LoomError", "ProgramError", "RoleError"], "loom.lang.errors"),
    "ProgramState": "loom.lang.state",
    "RequestGraph": "loom.lang.graph",
    "EngineBackend": "loom.backends.engine_backend",
    "EndpointBackend": "loom.backends.endpoint_backend",
    "RuntimeEndpoint": "loom.backends.runtime_endpoint",
    "OpenAI": "loom.backends.openai_backend",
}

__all__ = ["Engine", "Runtime", "ServerArgs", *_LANG]


def __getattr__(name: str):
    if name in _LANG:
        import importlib

        value = getattr(importlib.import_module(_LANG[name]), name)
        globals()[name] = value
        return value
    # The runtime pulls in torch and transformers: import it only when asked for.
    if name == "Engine":
        from loom.runtime.engine import Engine

        return Engine
    if name == "Runtime":
        from loom.backends.runtime import Runtime

        return Runtime
    if name == "ServerArgs":
        from loom.runtime.args import ServerArgs

        return ServerArgs
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
