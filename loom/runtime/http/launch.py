"""`loom serve`: the server process. Binds the port, starts the Engine (scheduler and
detokenizer processes), and serves the app with uvicorn on the Engine's event loop, where
the tokenizer manager runs: one loop for HTTP and the manager, no thread hop per token.

The main thread only waits: SIGINT / SIGTERM (or, with exit_with_parent, the parent's
death) stop uvicorn, then the Engine shuts its processes down and removes its ipc sockets.

A child process that exits or hangs (the Engine's watchdog, --watchdog-timeout) cannot be
replaced in place: the Engine fails every request in flight, /health answers 503 for
FAILED_EXIT_DELAY_S (load balancers see it, errors reach their clients), and then the
server stops and exits with status 1, for its supervisor to restart it (as SGLang does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import socket
import threading
import time

from loom.runtime.args import ServerArgs
from loom.runtime.logs import logging_config

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5  # in-flight responses get this long to finish on SIGTERM
FAILED_EXIT_DELAY_S = 5.0  # a server whose child failed answers 503 this long, then exits
EXIT_CHILD_FAILED = 1
SERVER_PROCESS = "server"  # how its log lines name this process


class _Stop(BaseException):
    """A stop signal arrived before the server was up."""


def run_server(args: ServerArgs, exit_with_parent: bool = False) -> int:
    import uvicorn

    from loom.runtime.engine import Engine
    from loom.runtime.http.guard import configured_api_key
    from loom.runtime.http.server import create_app, served_model_name

    sock = bind_socket(args.host, args.port)  # fail fast, before loading a model
    stopper = _Stopper()
    stopper.install(exit_with_parent)
    api_key = configured_api_key(args.api_key)
    engine = None
    try:
        try:
            # The key stays in this process: the Engine's children have no use for it.
            engine = Engine(**dataclasses.asdict(dataclasses.replace(args, api_key=None)))
        except Exception as e:  # noqa: BLE001 - a start-up failure is reported, not a crash
            logger.error("loom serve cannot start: %s: %s", type(e).__name__, e)
            return 1
        config = uvicorn.Config(
            create_app(engine, api_key),
            # The server's own logging config, so uvicorn's lines share its format; each
            # request's line comes from request_log (uvicorn's access line has no id).
            log_config=logging_config(SERVER_PROCESS, args.log_level, args.log_format),
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)
        stopper.server = server
        engine.on_failure(lambda reason: _exit_later(stopper))
        logger.info(
            "loom serving %s (%s) at http://%s:%d - KV capacity %d tokens, context %d",
            served_model_name(engine),
            engine.model_folder,
            args.host,
            sock.getsockname()[1],
            engine.info.max_total_tokens,
            engine.info.context_length,
        )
        if api_key is None:
            logger.info("no API key: any process that reaches the port may use every route")
        future = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), engine.loop)
        _wait(future)
        return 0 if engine.failure is None else EXIT_CHILD_FAILED
    except _Stop:
        logger.info("stopped during start-up")
        return 0
    finally:
        if engine is not None:
            engine.shutdown()
        sock.close()
        logger.info("loom server stopped")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted sockets only when it is IPPROTO_TCP.
    # Without it, a keep-alive client waited ~40 ms per response (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        message = f"cannot listen on {host}:{port}: {e.strerror}; pick another --port"
        raise SystemExit(message) from e
    sock.set_inheritable(False)
    return sock


def _exit_later(stopper: _Stopper) -> None:
    """The Engine failed (it logged why): stop serving after FAILED_EXIT_DELAY_S."""
    logger.error(
        "a child process failed: the server answers 503 for %gs, then exits with status %d "
        "for a supervisor to restart it",
        FAILED_EXIT_DELAY_S,
        EXIT_CHILD_FAILED,
    )
    timer = threading.Timer(FAILED_EXIT_DELAY_S, stopper.stop, ("a child process failed",))
    timer.daemon = True
    timer.start()


def _wait(future: concurrent.futures.Future) -> None:
    # A timed wait, so the main thread keeps running its signal handlers.
    while True:
        try:
            future.result(timeout=0.5)
            return
        except concurrent.futures.TimeoutError:
            continue


class _Stopper:
    """First signal: graceful stop. Second SIGINT: stop now, cancelling open responses."""

    def __init__(self) -> None:
        self.server = None
        self.stopping = False

    def install(self, exit_with_parent: bool) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if exit_with_parent:
            threading.Thread(target=self._watch_parent, daemon=True, name="parent-watch").start()

    def _on_signal(self, signum: int, _frame) -> None:
        self.stop(signal.Signals(signum).name)

    def stop(self, why: str) -> None:
        server = self.server
        if server is None:
            if threading.current_thread() is threading.main_thread():
                raise _Stop()
            os.kill(os.getpid(), signal.SIGTERM)  # deliver it to the main thread
            return
        if self.stopping:
            server.force_exit = True
            return
        logger.info("%s: shutting down", why)
        self.stopping = True
        server.should_exit = True

    def _watch_parent(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(0.5)
        self.stop("the parent process exited")
