"""Which backend a program runs on, and the role template that goes with it."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from loom.backends.base import ProgramBackend
from loom.lang.chat_template import RoleTemplate, named_template, role_template
from loom.lang.errors import LoomError

_lock = threading.Lock()
_default: ProgramBackend | None = None
_default_template: str | RoleTemplate | None = None
_wrapped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_roles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_default_backend(backend: Any, chat_template: str | RoleTemplate | None = None) -> None:
    """Programs run on `backend` unless `run` names another. A `loom.Engine` is accepted
    as is. `chat_template` names a template to use instead of the model's own."""
    global _default, _default_template
    resolved = resolve_backend(backend) if backend is not None else None
    with _lock:
        _default, _default_template = resolved, chat_template


def get_default_backend() -> ProgramBackend | None:
    return _default


def resolve_backend(backend: Any = None) -> ProgramBackend:
    if backend is None:
        if _default is None:
            raise LoomError(
                "no backend: call loom.set_default_backend(loom.Engine()) (or pass backend=)"
            )
        return _default
    if isinstance(backend, ProgramBackend):
        return backend
    if hasattr(backend, "endpoint") and hasattr(backend, "url"):  # a loom.Runtime
        return resolve_backend(backend.endpoint)
    if hasattr(backend, "generate") and hasattr(backend, "get_model_info"):
        return _wrap(backend, "loom.backends.endpoint_backend", "EndpointBackend")
    if hasattr(backend, "generate") and hasattr(backend, "tokenizer"):  # a loom.Engine
        return _wrap(backend, "loom.backends.engine_backend", "EngineBackend")
    raise LoomError(
        f"{type(backend).__name__} is not a backend: use loom.Engine(), "
        "loom.RuntimeEndpoint(url) or loom.OpenAI(model, base_url=...)"
    )


def _wrap(obj: Any, module: str, name: str) -> ProgramBackend:
    """The backend over a runtime object, made once per object."""
    with _lock:
        wrapped = _wrapped.get(obj)
    if wrapped is None:
        import importlib

        wrapped = getattr(importlib.import_module(module), name)(obj)
        with _lock:
            wrapped = _wrapped.setdefault(obj, wrapped)
    return wrapped


def roles_for(backend: ProgramBackend, override: str | RoleTemplate | None = None) -> RoleTemplate:
    override = override if override is not None else _default_template
    if isinstance(override, RoleTemplate):
        return override
    if isinstance(override, str):
        return named_template(override)
    with _lock:
        cached = _roles.get(backend)
    if cached is None:
        cached = role_template(backend.chat_template())
        with _lock:
            _roles[backend] = cached
    return cached
