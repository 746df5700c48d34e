"""A program on a `loom serve` from another machine's point of view: a RuntimeEndpoint in
another process and working directory, with no access to the server's files (its model
folder, chat template included, is moved away once the server runs), runs a program with
roles and `select` exactly as the same program runs in-process on an Engine with the
server's flags. The server's tokenizer and --chat-template reach it over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import loom
from loom.backends.runtime import Runtime
from loom.runtime.engine import Engine

# The tiny model's words are t<i>; its tokenizer has no template of its own.
TEMPLATE = "{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
SERVER_ARGS = dict(device="cpu", max_total_tokens=4096, grammar_backend="none")

PROGRAM = textwrap.dedent(
    """
    import loom


    @loom.function
    def pick(s):
        with s.user():
            s += "t5 t6"
        with s.assistant():
            s += loom.select("answer", ["t7 t8", "t9", "t10 t11 t12"])
    """
)
CLIENT = PROGRAM + textwrap.dedent(
    """
    import json, sys

    state = pick.run(backend=loom.RuntimeEndpoint(sys.argv[1]))
    print(json.dumps({"answer": state["answer"], "text": state.text()}))
    """
)


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory, tmpdir_env):
    """The server on a copy of the tiny model with a template file inside it; the copy is
    moved away (and the reference Engine started) before any client runs."""
    root = tmp_path_factory.mktemp("remote")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    (model / "template.jinja").write_text(TEMPLATE)
    args = dict(SERVER_ARGS, chat_template=str(model / "template.jinja"))
    with Runtime(str(model), **args) as runtime, Engine(str(model), **args) as engine:
        os.rename(model, root / "elsewhere")
        yield runtime, engine, root


def test_a_remote_program_selects_with_the_servers_tokenizer_and_template(served):
    runtime, engine, root = served
    client_cwd = root / "client"
    client_cwd.mkdir()
    (client_cwd / "prog.py").write_text(CLIENT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "prog.py", runtime.url],
        cwd=client_cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "select is off" not in proc.stderr
    remote = json.loads(proc.stdout.splitlines()[-1])

    scope: dict = {}
    exec(PROGRAM, scope)
    state = scope["pick"].run(backend=engine)
    assert remote == {"answer": state["answer"], "text": state.text()}
    # The server's template: each message's words between t3 and t4.
    assert remote["text"] == f"t3 t5 t6 t4 {remote['answer']} t4 "


def test_the_tokenizer_files_hold_the_template_and_no_weights(served):
    runtime, _, _ = served
    names = [
        f["name"]
        for f in loom.RuntimeEndpoint(runtime.url)._call("GET", "/tokenizer/files")["files"]
    ]
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".gguf"))]
    tokenizer = loom.RuntimeEndpoint(runtime.url).get_tokenizer()
    assert tokenizer.chat_template == TEMPLATE
