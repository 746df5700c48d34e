"""Child processes (scheduler, detokenizer) started as `python -m loom.runtime.launch`.

A fresh interpreter, not multiprocessing's spawn: spawn re-imports the caller's __main__,
which breaks scripts and notebooks that create an Engine at top level. The payload (role,
arguments) arrives pickled on stdin; the child reports readiness on an inherited pipe.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys


def spawn_child(role: str, kwargs: dict) -> tuple[subprocess.Popen, int]:
    """Start a child; returns it and the read end of its ready pipe."""
    read_fd, write_fd = os.pipe()
    payload = pickle.dumps({"role": role, "kwargs": kwargs, "ready_fd": write_fd})
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom.runtime.launch"],
        stdin=subprocess.PIPE,
        pass_fds=(write_fd,),
        start_new_session=False,
    )
    os.close(write_fd)
    proc.stdin.write(payload)
    proc.stdin.close()
    return proc, read_fd


class ReadyPipe:
    """The child's end: send one pickled message to the parent."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, msg) -> None:
        with os.fdopen(self.fd, "wb") as f:
            f.write(pickle.dumps(msg))


def read_ready(fd: int):
    """Blocks until the child writes its message (or exits: then returns None)."""
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    return pickle.loads(data) if data else None


def main() -> None:
    payload = pickle.loads(sys.stdin.buffer.read())
    kwargs = payload["kwargs"]
    if payload["role"] == "scheduler":
        from loom.runtime.scheduler.process import run_scheduler_process

        run_scheduler_process(**kwargs, ready_conn=ReadyPipe(payload["ready_fd"]))
    elif payload["role"] == "detokenizer":
        from loom.runtime.tokenizer.detokenizer import run_detokenizer_process

        os.close(payload["ready_fd"])
        run_detokenizer_process(**kwargs)
    else:
        raise SystemExit(f"unknown role {payload['role']!r}")


if __name__ == "__main__":
    main()
