"""The `loom` command. `loom generate "PROMPT"` runs one generation on a model (by default
the embedded SmolLM2-135M-Instruct) and streams the text to stdout; `loom serve` runs the
HTTP server (native /generate and the OpenAI-compatible API)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing

import loom
from loom.runtime.args import ServerArgs, scalar_type
from loom.runtime.logs import LOG_LEVELS, configure_logging
from loom.runtime.sampling.params import SamplingParams

GENERATE_TEMPERATURE = 0.0  # `loom generate` decodes greedily unless --temperature is given
_SAMPLING_FLAGS = [
    f for f in dataclasses.fields(SamplingParams) if f.name not in ("n", "json_schema_lenient")
]


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(SamplingParams)
    group = parser.add_argument_group("sampling")
    for f in _SAMPLING_FLAGS:
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:  # --flag / --no-flag: defaults that are True can be turned off
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0]
            group.add_argument(flag, type=item, action="append", default=None)
        else:
            group.add_argument(flag, type=scalar_type(hint), default=None)


def _sampling_from(ns: argparse.Namespace) -> dict:
    return {f.name: getattr(ns, f.name) for f in _SAMPLING_FLAGS if getattr(ns, f.name) is not None}


def _generate(ns: argparse.Namespace) -> int:
    from loom.runtime.engine import Engine
    from loom.runtime.sampling.params import InvalidRequestError

    args = ns.server_args
    sampling = _sampling_from(ns)
    try:
        engine = Engine(**dataclasses.asdict(args))
    except Exception as e:  # noqa: BLE001 - a start-up failure is reported, not a traceback
        print(f"loom generate cannot start: {e}", file=sys.stderr)
        return 1
    with engine:
        input_ids = None
        prompt = ns.prompt
        template = getattr(engine.tokenizer, "chat_template", None)
        if template and not ns.raw:
            messages = [{"role": "user", "content": ns.prompt}]
            input_ids = list(
                engine.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            prompt = None
        try:
            chunks = engine.generate(prompt, sampling, input_ids=input_ids, stream=True)
            last = None
            for chunk in chunks:
                sys.stdout.write(chunk["text"])
                sys.stdout.flush()
                last = chunk
        except InvalidRequestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sys.stdout.write("\n")
        meta = last["meta_info"] if last else {}
        print(
            f"[{meta.get('completion_tokens', 0)} tokens, finish: "
            f"{(meta.get('finish_reason') or {}).get('type')}, "
            f"{meta.get('e2e_latency', 0):.2f}s]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--temp` is a typo to point out (main), not --temperature.
    parser = argparse.ArgumentParser(prog="loom", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"loom {loom.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate a completion for one prompt", allow_abbrev=False
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "--raw",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="send the prompt without the chat template",
    )
    ServerArgs.add_cli_args(gen)
    _add_sampling_args(gen)
    # One answer per prompt unless asked otherwise: a small model sampled at temperature 1
    # mostly answers nonsense.
    gen.set_defaults(temperature=GENERATE_TEMPERATURE)
    serve = sub.add_parser(
        "serve", help="serve the native and OpenAI-compatible HTTP APIs", allow_abbrev=False
    )
    ServerArgs.add_cli_args(serve)
    serve.add_argument(
        "--exit-with-parent",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="shut down when the process that started the server exits (loom.Runtime sets it)",
    )
    run = sub.add_parser(
        "run", help="run a Python program (e.g. examples/react_agent.py)", allow_abbrev=False
    )
    run.add_argument("script", help="the .py file to run as __main__")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, with a "did you mean" for options no subcommand knows."""
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    command = _subparsers(parser).choices[ns.command]
    if extras:
        # Not command.error: its usage block runs to 40 lines and buries the hint.
        command.exit(2, f"{command.prog}: error: {_unrecognized(extras, command)}\n")
    if ns.command in ("generate", "serve"):
        try:
            ns.server_args = ServerArgs.from_cli(ns)
        except ValueError as e:  # a value the flag's type took but the server cannot
            command.exit(2, f"{command.prog}: error: {e}\n")
    return ns


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _unrecognized(extras: list[str], command: argparse.ArgumentParser) -> str:
    options = [o for action in command._actions for o in action.option_strings]
    message = f"unrecognized arguments: {' '.join(extras)}"
    for arg in extras:
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        close = [o for o in options if o.startswith(name)]  # an abbreviation
        close = close or difflib.get_close_matches(name, options, n=3, cutoff=0.7)
        if close:
            message += f"; {name}: did you mean {' or '.join(close[:3])}?"
    return message + f" (see `{command.prog} --help`)"


def _run_script(ns: argparse.Namespace) -> int:
    import os
    import runpy

    sys.argv = [ns.script, *ns.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
    runpy.run_path(ns.script, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    process = "server" if ns.command == "serve" else ns.command
    configure_logging(process, ns.log_level, getattr(ns, "log_format", "text"))
    if ns.command == "generate":
        return _generate(ns)
    if ns.command == "run":
        return _run_script(ns)
    if ns.command == "serve":
        from loom.runtime.http.launch import run_server

        return run_server(ns.server_args, exit_with_parent=ns.exit_with_parent)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
