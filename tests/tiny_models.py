"""Tiny random-weight models built with transformers, saved as HF folders for loom to load."""

from __future__ import annotations

import json
import os
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 320
EOS = VOCAB - 1
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=1024,
    eos_token_id=EOS,
    bos_token_id=1,
)


def tiny_config(arch: str):
    if arch == "llama":
        # Llama 3.1-style rope scaling, so the scaled-rope path is what gets compared.
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
            "rope_theta": 500000.0,
        }
        return LlamaConfig(**COMMON, rope_parameters=rope)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**COMMON, head_dim=32)
    if arch == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    raise ValueError(arch)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word 't<i>' (specials: 0 <pad>, 1 <s>, EOS </s>), so ordinary ids
    round-trip through text."""
    specials = {0: "<pad>", 1: "<s>", EOS: "</s>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="<pad>"
    )


def build_tiny_model(arch: str, folder: str, seed: int = 0) -> str:
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():  # larger than default init so logits are not all near-equal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def load_reference(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens through EOS (as loom's ignore_eos), with its KV cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(
            torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
        )
    return tokens


def with_context(folder: str, dest: str, positions: int) -> str:
    """A copy of a model folder whose config allows `positions` tokens."""
    if not os.path.exists(os.path.join(dest, "config.json")):
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        path = os.path.join(dest, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["max_position_embeddings"] = positions
        with open(path, "w") as f:
            json.dump(config, f)
    return dest
