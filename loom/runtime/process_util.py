"""What every loom child process does at start: logging, and dying with its parent."""

from __future__ import annotations

import os
import signal
import threading
import time

from loom.runtime.logs import configure_logging


def configure_process(name: str, log_level: str, log_format: str = "text") -> None:
    configure_logging(name, log_level, log_format)
    # The parent handles Ctrl-C and shuts children down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent()


def watch_parent(interval: float = 1.0) -> None:
    """Exit when the parent process dies, so no orphan outlives the server or Engine."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
