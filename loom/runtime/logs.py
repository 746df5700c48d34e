"""One log format for every loom process: the server (uvicorn's own lines included, it is
handed the same config), the scheduler and the detokenizer all write

    2026-12-02 10:00:00.123 INFO  [server rid=7f3a...] POST /generate 200 in 0.41s ...

to stderr, or with `--log-format json` one JSON object per line with the same fields
(time, level, process, logger, message, rid). A line about a request carries its id: on
the server from the request being served (the HTTP layer binds it, `bind_request`), in
any process from an explicit `extra={"rid": ...}`.
"""

from __future__ import annotations

import contextvars
import importlib.util
import json
import logging
import logging.config
import time
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# The request the server is serving in this context (an object with a `rid`): asyncio
# copies it into every task the request's handler starts, so lines logged anywhere on its
# way carry its id.
_request: contextvars.ContextVar[Any] = contextvars.ContextVar("loom_request", default=None)


def bind_request(request: Any) -> contextvars.Token:
    """Make `request` (anything with a `rid`) the one this context's log lines are about."""
    return _request.set(request)


def unbind_request(token: contextvars.Token) -> None:
    _request.reset(token)


def current_request() -> Any:
    return _request.get()


class _Context(logging.Filter):
    """Adds `process_name` and `rid` (None when the line is about no request)."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process
        if getattr(record, "rid", None) is None:
            record.rid = getattr(_request.get(), "rid", None)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        where = (
            record.process_name if record.rid is None else f"{record.process_name} rid={record.rid}"
        )
        line = (
            f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d} "
            f"{record.levelname:<5} [{where}] {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname,
            "process": record.process_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.rid is not None:
            entry["rid"] = record.rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(process: str, level: str = "info", fmt: str = "text") -> dict:
    """The dictConfig of a loom process; also what uvicorn is given (uvicorn.Config's
    log_config), so its lines come out in the same format."""
    check_logging_args(level, fmt)
    formatter = JSONFormatter if fmt == "json" else TextFormatter
    # uvicorn's loggers keep no handlers of their own: they reach the root's.
    uvicorn = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": _Context, "process": process}},
        "formatters": {"loom": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "loom",
                "filters": ["context"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: uvicorn for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure_logging(process: str, level: str = "info", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(process, level, fmt))
    _adopt_transformers_logs()


def _adopt_transformers_logs() -> None:
    """transformers gives its loggers a handler of their own (its format, no process name)
    and stops them there: send its lines (warnings and worse, its default) through ours.
    Every process that loads a model imports it anyway."""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def check_logging_args(level: str, fmt: str) -> None:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
