"""Runtime: `loom serve` in a subprocess on a free port, for programs that want a server of
their own (`loom.Runtime(model_path=...)`). It waits until the server is healthy, and stops
it at `shutdown()`, at exit, or (through --exit-with-parent) when this process dies. An
`api_key=` reaches the server in its environment and is sent by `runtime.endpoint`."""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time

from loom.backends.runtime_endpoint import RuntimeEndpoint
from loom.runtime.args import API_KEY_ENV, ServerArgs

LOG_TAIL_CHARS = 4000


class RuntimeStartError(RuntimeError):
    """The server did not become healthy; the message ends with its log."""


class Runtime:
    def __init__(
        self, model_path: str | None = None, *, start_timeout: float = 300.0, **server_args
    ):
        server_args.setdefault("host", "127.0.0.1")
        server_args.setdefault("port", free_port(server_args["host"]))
        self.args = ServerArgs.from_kwargs(model_path=model_path, **server_args)
        self.url = f"http://{_url_host(self.args.host)}:{self.args.port}"
        self._endpoint: RuntimeEndpoint | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="loom-serve-", suffix=".log", delete=False)
        self.log_path = self._log.name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loom.serve", *cli_flags(self.args), "--exit-with-parent"],
            env=_server_env(self.args.api_key),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C reaches us; we stop the server
        )
        atexit.register(self.shutdown)
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.shutdown()
            raise

    @property
    def endpoint(self) -> RuntimeEndpoint:
        if self._endpoint is None:
            self._endpoint = RuntimeEndpoint(self.url, api_key=self.args.api_key)
        return self._endpoint

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeStartError(
                    f"loom serve exited with code {code} during start-up:\n{self.log_tail()}"
                )
            if self.endpoint.health(timeout=2.0):
                return
            time.sleep(0.2)
        raise RuntimeStartError(
            f"loom serve was not healthy after {timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no log)"

    def shutdown(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`: the server stops its own children."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        atexit.unregister(self.shutdown)
        if self._endpoint is not None:
            self._endpoint.close()
        if not self._log.closed:
            self._log.close()
            os.unlink(self.log_path)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cli_flags(args: ServerArgs) -> list[str]:
    """The `loom serve` flags that reproduce `args` (defaults left out)."""
    flags: list[str] = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value == f.default or value is None or f.name == "api_key":  # see _server_env
            continue
        name = f.name.replace("_", "-")
        if isinstance(value, bool):  # every bool flag has its --no- form
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def _server_env(api_key: str | None) -> dict[str, str]:
    """The server's environment: ours, and the API key if one is given. A flag would show
    the key to every local user in the process list (/proc/<pid>/cmdline)."""
    env = dict(os.environ)
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
