"""`python -m loom.serve [flags]`: the same as `loom serve [flags]`."""

from __future__ import annotations

import sys

from loom.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
