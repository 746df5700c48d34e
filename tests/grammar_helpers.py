"""A small real Hugging Face tokenizer for the grammar tests, built offline.

A byte-level BPE (the GPT-2 / Llama-3 family of tokenizers) trained in memory on English
and JSON text, so tokens merge across quotes, spaces and digits the way real vocabularies
do. The model vocabulary is padded past len(tokenizer) to exercise masking of padding ids.
"""

from __future__ import annotations

import functools
import json
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|eos|>"
PAD_TOKENS = 64  # model logits width = len(tokenizer) + PAD_TOKENS

_WORDS = (
    "the quick brown fox jumps over a lazy dog name age city email address phone "
    "true false null number string array object value key items properties answer "
    "hello world yes no maybe John Alice Bob London Paris Tokyo report summary id type"
).split()


def _corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]))
        obj = {
            w: rng.choice([rng.randint(-999, 9999), w, True, None, [1, 2], 3.25])
            for w in rng.sample(_WORDS, k=rng.randint(1, 4))
        }
        lines.append(json.dumps(obj))
        lines.append(json.dumps(obj, indent=2))
    return lines


@functools.cache
def make_tokenizer(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with an eos token; cached (building takes ~1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def model_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    return len(tokenizer) + PAD_TOKENS


# A flat object every value of which is short, so even a random-weight model completes it.
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"enum": ["John", "Alice", "Bob"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "admin": {"type": "boolean"},
        "city": {"type": "string", "maxLength": 6},
    },
    "required": ["name", "age", "admin", "city"],
}


def build_bpe_llama(
    folder, hidden: int = 64, heads: int = 4, context: int = 512
) -> PreTrainedTokenizerFast:
    """A random-weight 2-layer Llama over make_tokenizer() saved in `folder` (grammars
    need real tokens); returns the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        vocab_size=model_vocab_size(tok),
        max_position_embeddings=context,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


@functools.cache
def _structure_bias(tokenizer: PreTrainedTokenizerFast, vocab: int) -> torch.Tensor:
    """Extra logit for tokens that close JSON values, so random walks end in a few dozen
    steps instead of writing long strings."""
    closers = {'"', "}", "]", ",", '":', '",', "0", "1", "true", "null"}
    bias = torch.zeros(vocab)
    for token_id in range(len(tokenizer)):
        if tokenizer.decode([token_id]).strip() in closers:
            bias[token_id] = 3.0
    bias[tokenizer.eos_token_id] = 6.0
    return bias


def random_walk(backend, matcher, tokenizer, seed: int, max_steps: int = 200) -> str | None:
    """Sample a masked random walk through a grammar until it terminates; the text it
    wrote, or None if it ran out of steps. Any output a grammar allows is a fair sample of
    what a model could be made to write under it."""
    gen = torch.Generator().manual_seed(seed)
    bias = _structure_bias(tokenizer, backend.vocab_size)
    bitmask = backend.allocate_bitmask(1)
    ids: list[int] = []
    for _ in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.rand(1, backend.vocab_size, generator=gen) * 4 + bias
        backend.apply_bitmask(logits, bitmask)
        token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
        assert matcher.accept_token(token), "the mask allowed a token the matcher refused"
        if matcher.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    return None
