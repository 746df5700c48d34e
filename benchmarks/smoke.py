"""--smoke: a benchmark's run on CPU at tiny sizes, so that CI runs every script end to end
(tests/test_benchmarks.py) and none of them rots between GPU sessions. It checks that the
script works, not its numbers."""

from __future__ import annotations

import argparse


def parse_args(
    parser: argparse.ArgumentParser, smoke: dict, argv: list[str] | None = None
) -> argparse.Namespace:
    """The parsed command line; with --smoke, `smoke` replaces the parser's defaults (flags
    given on the command line still win)."""
    shown = " ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in smoke.items())
    parser.add_argument(
        "--smoke", action="store_true", help=f"CI run, on CPU at tiny sizes: {shown}"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
