"""Child processes (scheduler, detokenizer) started as `python -m loom.runtime.launch`.

A fresh interpreter, not multiprocessing's spawn: spawn re-imports the caller's __main__,
which breaks scripts and notebooks that create an Engine at top level. The payload (role,
arguments) arrives pickled on stdin; the child reports readiness on an inherited pipe
(the parent's watchdog starts watching it only then: start-up may take long).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import BinaryIO


def spawn_child(role: str, kwargs: dict) -> tuple[subprocess.Popen, BinaryIO]:
    """Start a child; returns it and the read end of its ready pipe (see read_ready)."""
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
    return proc, os.fdopen(read_fd, "rb")


class ReadyPipe:
    """The child's end: send one pickled message to the parent."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, msg) -> None:
        with os.fdopen(self.fd, "wb") as f:
            f.write(pickle.dumps(msg))


def read_ready(pipe: BinaryIO):
    """Blocks until the child writes its message (or exits: then returns None)."""
    data = pipe.read()
    return pickle.loads(data) if data else None


def main() -> None:
    payload = pickle.loads(sys.stdin.buffer.read())
    kwargs = payload["kwargs"]
    ready_conn = ReadyPipe(payload["ready_fd"])
    if payload["role"] == "scheduler":
        from loom.runtime.scheduler.process import run_scheduler_process

        run_scheduler_process(**kwargs, ready_conn=ready_conn)
    elif payload["role"] == "detokenizer":
        from loom.runtime.tokenizer.detokenizer import run_detokenizer_process

        run_detokenizer_process(**kwargs, ready_conn=ready_conn)
    else:
        raise SystemExit(f"unknown role {payload['role']!r}")


if __name__ == "__main__":
    main()
