"""IncrementalDetokenizer against the tokenizer's own full decode: whatever pieces the ids
arrive in, the streamed text concatenates to `tokenizer.decode(all_ids)` (stop strings and
stop tokens trimmed), and no piece carries half a character."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loom.runtime.messages import ReqOutput
from loom.runtime.tokenizer.detokenizer import IncrementalDetokenizer

CORPUS = [
    "héllo wörld 你好 🙂 the quick brown fox jumps over the lazy dog",
    "naïve café résumé 日本語のテキスト emoji 🎉🎉 and more text",
    "Hello, world. It's a test; isn't it? The END! STOP here.",
] * 20
# Characters the tokenizers never saw in training (🦀, 한, ß) split into byte tokens.
ALPHABET = list("abcdeENDSTOP!. ,\nhéöü你好日本🙂🦀한ß")
LENGTH = {"type": "length", "matched": None}


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 style: "▁" for spaces, byte-fallback tokens <0xNN> for unknown characters, and
    a decoder that strips the leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    )
    # The byte tokens are ordinary vocabulary entries (not special), as in Llama's.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


TOKENIZERS = {"bpe": byte_level_bpe(), "spm": sentencepiece_bpe()}
BPE = TOKENIZERS["bpe"]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decoded(tok, ids: list[int]) -> str:
    """The full decode a request's text must match (skip_special_tokens, as by default)."""
    return tok.decode(ids, skip_special_tokens=True)


def output(rid: str, ids, finished=None, **fields) -> ReqOutput:
    return ReqOutput(
        rid=rid,
        new_token_ids=list(ids),
        finished_reason=finished,
        prompt_tokens=0,
        completion_tokens=len(ids),
        cached_tokens=0,
        **fields,
    )


def split(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """ids cut into consecutive pieces of the given sizes (cycled; 0 = an empty message)."""
    sizes = sizes if any(sizes) else [1]
    chunks, i, k = [], 0, 0
    while i < len(ids) or not chunks:
        n = sizes[k % len(sizes)]
        chunks.append(ids[i : i + n])
        i, k = i + n, k + 1
    return chunks


def stream(detok, ids, sizes, finished, rid="r", **fields) -> list[str]:
    """The text pieces of a request whose ids arrive in pieces, the last one finishing it."""
    chunks = split(ids, sizes)
    pieces = []
    for i, chunk in enumerate(chunks):
        done = finished if i == len(chunks) - 1 else None
        pieces.append(detok.process(output(rid, chunk, done, **fields)).text)
    return pieces


SIZES = st.lists(st.integers(0, 5), min_size=1, max_size=8)
TEXTS = st.text(alphabet=ALPHABET, max_size=40)


# ---- pieces concatenate to the full decode -------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(BPE) - 1), max_size=30), SIZES)
def test_stream_of_any_ids_concatenates_to_the_full_decode(ids, sizes):
    # Any ids, invalid UTF-8 and EOS included: byte-level decoding is byte concatenation.
    detok = IncrementalDetokenizer(BPE)
    assert "".join(stream(detok, ids, sizes, LENGTH)) == decoded(BPE, ids)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=200, deadline=None)
@given(text=TEXTS, sizes=SIZES)
def test_stream_of_text_concatenates_without_replacement_chars(name, text, sizes):
    tok = TOKENIZERS[name]
    ids = encode(tok, text)
    full = decoded(tok, ids)
    assume("\ufffd" not in full)
    pieces = stream(IncrementalDetokenizer(tok), ids, sizes, LENGTH)
    assert "".join(pieces) == full
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    ids = encode(BPE, "a🦀")  # 🦀 was never seen in training: its 4 bytes are separate tokens
    assert len(ids) >= 3 and "\ufffd" in decoded(BPE, ids[:-1])
    detok = IncrementalDetokenizer(BPE)
    pieces = [detok.process(output("r", [i])).text for i in ids[:-1]]
    assert "".join(pieces) == "a"
    assert detok.process(output("r", ids[-1:], LENGTH)).text == "🦀"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_stream_cut_inside_a_character_ends_as_the_full_decode(name):
    # The request hits its length limit halfway through a character (after a space token):
    # the last piece renders the broken bytes as the full decode does, space included.
    tok = TOKENIZERS[name]
    ids = encode(tok, "text 🦀 more")
    for cut in range(1, len(ids) + 1):
        for first in range(cut + 1):  # every split into two messages, and one at a time
            for sizes in ([first, cut - first], [1]):
                got = "".join(stream(IncrementalDetokenizer(tok), ids[:cut], sizes, LENGTH))
                assert got == decoded(tok, ids[:cut]), (cut, sizes)


# ---- stop strings --------------------------------------------------------------------------


def ids_through_first(tok, text: str, stop: str) -> list[int]:
    """The ids of text up to the token that completes the first `stop` (where the scheduler
    would finish the request)."""
    ids = encode(tok, text)
    n = next(n for n in range(1, len(ids) + 1) if stop in decoded(tok, ids[:n]))
    return ids[:n]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(before=TEXTS, after=TEXTS, sizes=SIZES)
def test_stop_string_cuts_the_text_right_before_it(name, before, after, sizes):
    tok = TOKENIZERS[name]
    ids = ids_through_first(tok, before + "STOP" + after, "STOP")
    full = decoded(tok, ids)
    assume("\ufffd" not in full)
    finished = {"type": "stop", "matched": "STOP"}
    pieces = stream(IncrementalDetokenizer(tok), ids, sizes, finished, stop=["STOP"])
    assert "".join(pieces) == full[: full.index("STOP")]


@settings(max_examples=100, deadline=None)
@given(before=TEXTS, after=TEXTS, sizes=SIZES)
def test_no_stop_trim_keeps_the_stop_string(before, after, sizes):
    ids = ids_through_first(BPE, before + "STOP" + after, "STOP")
    finished = {"type": "stop", "matched": "STOP"}
    detok = IncrementalDetokenizer(BPE)
    pieces = stream(detok, ids, sizes, finished, stop=["STOP"], no_stop_trim=True)
    assert "".join(pieces) == decoded(BPE, ids)


def longest_stop_start(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is a proper beginning of some stop string."""
    return max(
        [n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])],
        default=0,
    )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abEND! ST", max_size=40),
    stops=st.lists(st.sampled_from(["END!", "STOP", "aab", "b!"]), min_size=1, max_size=3),
    sizes=SIZES,
)
def test_stream_holds_back_exactly_what_could_start_a_stop_string(text, stops, sizes):
    assume(not any(stop in text for stop in stops))  # no stop completes: finished by length
    ids = encode(BPE, text)  # ASCII: every prefix of ids decodes to a prefix of text
    detok = IncrementalDetokenizer(BPE)
    sent, chunks = "", split(ids, sizes)
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        sent += detok.process(output("r", chunk, LENGTH if last else None, stop=stops)).text
        so_far = decoded(BPE, [i for c in chunks[: k + 1] for i in c])
        if not last:
            assert sent == so_far[: len(so_far) - longest_stop_start(so_far, stops)]
    assert sent == text


def test_a_stop_string_start_is_held_until_disambiguated():
    detok = IncrementalDetokenizer(BPE)

    def send(text: str, finished=None) -> str:
        return detok.process(output("r", encode(BPE, text), finished, stop=["END!"])).text

    assert send("hello EN") == "hello "  # "EN" may begin "END!"
    assert send("D") == ""  # "END" still may
    assert send("?") == "END?"  # it did not: all of it comes out
    assert send(" the EN") == " the "
    assert send("", LENGTH) == "EN"  # finished without the stop: nothing is lost


def test_a_completed_stop_string_after_held_text_is_cut():
    detok = IncrementalDetokenizer(BPE)
    finished = {"type": "stop", "matched": "END!"}
    assert detok.process(output("r", encode(BPE, "so EN"), stop=["END!"])).text == "so "
    assert detok.process(output("r", encode(BPE, "D! x"), finished, stop=["END!"])).text == ""


# ---- stop tokens and EOS -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", ["Hello, world.", "the quick brown fox", "你好 🙂 ok!"])
def test_stop_token_text_is_not_included(name, text):
    tok = TOKENIZERS[name]
    ids = encode(tok, text)
    finished = {"type": "stop", "matched": ids[-1]}  # an ordinary token given as a stop id
    for seed in range(10):
        sizes = [random.Random(seed).randint(1, 4)] * 3
        pieces = stream(IncrementalDetokenizer(tok), ids, sizes, finished)
        assert "".join(pieces) == decoded(tok, ids[:-1])


def test_stop_token_text_is_kept_with_no_stop_trim():
    ids = encode(BPE, "Hello, world.")
    finished = {"type": "stop", "matched": ids[-1]}
    pieces = stream(IncrementalDetokenizer(BPE), ids, [2], finished, no_stop_trim=True)
    assert "".join(pieces) == "Hello, world."


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_eos_never_appears_in_the_text(name):
    tok = TOKENIZERS[name]
    ids = encode(tok, "the lazy dog 🙂") + [tok.eos_token_id]
    finished = {"type": "stop", "matched": tok.eos_token_id}
    for sizes in ([1], [2], [5], [len(ids)]):
        text = "".join(stream(IncrementalDetokenizer(tok), ids, sizes, finished))
        assert text == decoded(tok, ids[:-1]) == "the lazy dog 🙂"
        assert "<eos>" not in text


# ---- per-request state ---------------------------------------------------------------------


def test_interleaved_requests_decode_independently():
    texts = {"a": "héllo wörld 你好", "b": "the END! of 🦀", "c": "STOP or go"}
    ids = {rid: encode(BPE, t) for rid, t in texts.items()}
    detok = IncrementalDetokenizer(BPE)
    got = dict.fromkeys(texts, "")
    for step in range(max(len(v) for v in ids.values())):
        for rid, seq in ids.items():
            if step < len(seq):
                done = LENGTH if step == len(seq) - 1 else None
                got[rid] += detok.process(output(rid, seq[step : step + 1], done)).text
    assert got == {rid: decoded(BPE, seq) for rid, seq in ids.items()}


def test_state_is_dropped_when_a_request_finishes():
    detok = IncrementalDetokenizer(BPE)
    reasons = [LENGTH, {"type": "stop", "matched": "x"}, {"type": "abort", "matched": None}]
    for k, reason in enumerate(reasons):
        rid = f"r{k}"
        detok.process(output(rid, encode(BPE, "partial 🦀")[:-1], stop=["xyz"]))
        assert rid in detok.states
        detok.process(output(rid, [], reason, stop=["xyz"]))
        assert rid not in detok.states
    detok.process(output("once", encode(BPE, "all at once"), LENGTH))  # a non-stream request
    assert detok.states == {}
