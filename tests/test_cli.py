"""The `loom` command line: --version, no abbreviations (a typo gets a suggestion), flags
that can be turned off, greedy `loom generate`, clear errors rather than tracebacks, and
one log format for every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import loom
from loom.cli import _sampling_from, main, parse_args


def exit_of(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_version_prints_the_package_version(capsys):
    code, out, _ = exit_of(["--version"], capsys)
    assert code == 0 and out.strip() == f"loom {loom.__version__}"


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["generate", "hi", "--temp", "0"], "--temp: did you mean --temperature?"),
        (["serve", "--max-totl-tokens", "64"], "did you mean --max-total-tokens"),
        (["serve", "--port=1", "--hots", "x"], "--hots: did you mean --host?"),
    ],
)
def test_an_abbreviated_or_mistyped_option_is_refused_with_a_suggestion(argv, hint, capsys):
    code, _, err = exit_of(argv, capsys)
    assert code == 2
    assert "unrecognized arguments" in err and hint in err


def test_an_unknown_log_level_is_a_clear_error_not_a_traceback(capsys):
    code, _, err = exit_of(["run", "--log-level", "verbose", "prog.py"], capsys)
    assert code == 2
    assert "invalid choice: 'verbose'" in err and "Traceback" not in err


def test_boolean_flags_can_be_turned_off():
    ns = parse_args(["serve", "--no-disable-radix-cache", "--no-exit-with-parent"])
    assert ns.disable_radix_cache is False and ns.exit_with_parent is False
    ns = parse_args(
        ["generate", "hi", "--no-skip-special-tokens", "--no-spaces-between-special-tokens"]
    )
    sampling = _sampling_from(ns)
    assert sampling["skip_special_tokens"] is False
    assert sampling["spaces_between_special_tokens"] is False


def test_generate_decodes_greedily_unless_asked_otherwise():
    assert _sampling_from(parse_args(["generate", "hi"]))["temperature"] == 0.0
    ns = parse_args(["generate", "hi", "--temperature", "0.7"])
    assert _sampling_from(ns)["temperature"] == 0.7


def test_json_logs_come_from_every_process_in_one_shape(tiny_llama, tmpdir_env):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["generate", "t5 t6", "--model-path", tiny_llama, "--device", "cpu"]
    argv += ["--max-total-tokens", "1024", "--grammar-backend", "none", "--max-new-tokens", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", *argv, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    *log, summary = proc.stderr.strip().splitlines()
    assert summary.startswith("[2 tokens")  # `loom generate`'s own report, not a log line
    entries = [json.loads(line) for line in log]
    assert {e["process"] for e in entries} >= {"generate", "scheduler"}
    for entry in entries:
        assert {"time", "level", "process", "logger", "message"} <= set(entry)


def test_every_flipped_boolean_reaches_loom_serve_through_runtime_flags():
    """loom.Runtime starts `loom serve` with cli_flags(args): each bool, turned either way
    from its default, must come back the same."""
    import dataclasses

    from loom.backends.runtime import cli_flags
    from loom.runtime.args import ServerArgs

    flipped = {
        f.name: not f.default for f in dataclasses.fields(ServerArgs) if isinstance(f.default, bool)
    }
    args = ServerArgs(**flipped, log_interval=0.5, log_format="json")
    assert parse_args(["serve", *cli_flags(args)]).server_args == args
