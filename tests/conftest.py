from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels' tests run in its interpreter; this must come before
# anything imports triton (transformers does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.http_helpers import server_tmpdir  # noqa: E402
from tests.tiny_models import build_tiny_model, with_context  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")

    def make(arch: str) -> str:
        return build_tiny_model(arch, os.path.join(root, arch))

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def long_llama(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama with room for 16384 tokens, for requests that must still be running
    when a test probes the server, even on a loaded machine (1000 tokens take ~4 s on CPU;
    a starved test process has seen them finish first)."""
    return with_context(tiny_llama, str(tmp_path_factory.mktemp("long-llama")), 16384)


@pytest.fixture(scope="module")
def tmpdir_env():
    """A fresh TMPDIR for the module's servers, where their ipc socket folders appear."""
    with server_tmpdir() as root:
        yield root


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, fetched and converted once per machine."""
    from loom.runtime.models.model_source import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="module")
def grammar_tokenizer():
    """tests/grammar_helpers.py's small byte-level BPE tokenizer."""
    from tests.grammar_helpers import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def xgrammar_backend(grammar_tokenizer):
    from loom.constrain.xgrammar_backend import XGrammarBackend
    from tests.grammar_helpers import model_vocab_size

    backend = XGrammarBackend(grammar_tokenizer, model_vocab_size(grammar_tokenizer), num_threads=2)
    yield backend
    backend.shutdown()
