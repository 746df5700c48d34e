"""Verified jump-forward: with it on, every output is token for token what decoding one
step at a time gives, while grammar-forced text costs fewer forward steps.

Reference: the same engine configuration with jump-forward off, on the real default model
(SmolLM2-135M), for greedy and seeded sampling, penalties, logprobs, stop strings and
token limits that fall inside forced text.
"""

from __future__ import annotations

import json

import pytest

from loom.constrain.jump_forward import forced_tokens
from loom.constrain.xgrammar_backend import XGrammarBackend
from loom.runtime.engine import Engine
from tests.grammar_helpers import make_tokenizer, model_vocab_size
from tests.test_constrained_engine import SCHEMAS, chat

PERSON = SCHEMAS[0][1]  # name, age in [0, 120], email
PANGRAM = {  # after the first token of either value, the rest is forced
    "type": "object",
    "properties": {
        "sentence": {
            "enum": [
                "The quick brown fox jumps over the lazy dog",
                "Pack my box with five dozen liquor jugs",
            ]
        },
        "release": {"const": "version 1.2.3 (stable)"},
    },
    "required": ["sentence", "release"],
}
INTRO = 'root ::= "Name: " [A-Z] [a-z]{1,10} "\\nJob: " ("engineer" | "teacher" | "doctor") "\\n"'
PHONE = r"\(\d{3}\) \d{3}-\d{4}"

# (prompt, sampling params): greedy and seeded rows, with penalties, min_new_tokens,
# stop strings and token limits that cut through forced text.
CASES = [
    ("Describe a fictional person.", {"json_schema": json.dumps(PERSON)}),
    ("Write a pangram.", {"json_schema": json.dumps(PANGRAM)}),
    ("Introduce yourself.", {"ebnf": INTRO}),
    ("Give a US phone number.", {"regex": PHONE}),
    ("Describe a fictional person.", {"json_schema": json.dumps(PERSON), "temperature": 0.9}),
    ("Write a pangram.", {"json_schema": json.dumps(PANGRAM), "temperature": 1.0, "top_p": 0.9}),
    ("Introduce yourself.", {"ebnf": INTRO, "temperature": 0.8, "top_k": 20, "min_p": 0.05}),
    ("Give a US phone number.", {"regex": PHONE, "temperature": 1.2, "repetition_penalty": 1.3}),
    (
        "Describe a fictional person.",
        {"json_schema": json.dumps(PERSON), "frequency_penalty": 0.5, "presence_penalty": 0.5},
    ),
    ("Write a pangram.", {"json_schema": json.dumps(PANGRAM), "max_new_tokens": 12}),
    ("Introduce yourself.", {"ebnf": INTRO, "stop": ["Job"], "temperature": 0.7}),
    ("Write a pangram.", {"json_schema": json.dumps(PANGRAM), "stop": ["dog", "jugs"]}),
    ("Give a US phone number.", {"regex": PHONE, "min_new_tokens": 4, "temperature": 0.5}),
]
LOGPROB_ROWS = {1, 5, 9}  # these also return logprobs (top 3)


def _params(i: int, extra: dict) -> dict:
    return {"max_new_tokens": 40, "temperature": 0, "seed": 1000 + i, **extra}


def _run(engine: Engine, stream_row: int | None = None) -> dict:
    prompts = [chat(engine, p) for p, _ in CASES]
    before = engine.get_server_info()
    outs = engine.generate(
        input_ids=prompts,
        sampling_params=[_params(i, extra) for i, (_, extra) in enumerate(CASES)],
        return_logprob=[i in LOGPROB_ROWS for i in range(len(CASES))],
        top_logprobs_num=3,
    )
    after = engine.get_server_info()
    return {"prompts": prompts, "outs": outs, "before": before, "after": after}


# name -> engine arguments. "tight": a KV pool so small, admitted so eagerly, that
# requests (drafts and all) get retracted and recomputed.
ENGINES = {
    "off": dict(max_total_tokens=8192, enable_jump_forward=False),
    "on": dict(max_total_tokens=8192, enable_jump_forward=True),
    "tight": dict(max_total_tokens=160, schedule_conservativeness=0.05, enable_jump_forward=True),
}


@pytest.fixture(scope="module")
def runs(default_model_dir):
    """The CASES batch on each engine of ENGINES; on "on", one row again, streamed."""
    result = {}
    for name, engine_args in ENGINES.items():
        with Engine(**engine_args) as engine:
            result[name] = _run(engine)
            if name == "on":
                i = 2
                chunks = engine.generate(
                    input_ids=result[name]["prompts"][i],
                    sampling_params=_params(i, CASES[i][1]),
                    stream=True,
                )
                result["stream"] = [c["output_ids"] for c in chunks]
            info = engine.get_server_info()
            result[name]["leaked"] = (
                info.max_total_tokens - info.available_tokens - info.cache_tokens
            )
    return result


def _delta(run: dict, field: str) -> int:
    return getattr(run["after"], field) - getattr(run["before"], field)


def test_greedy_outputs_are_identical(runs):
    for i, (_, extra) in enumerate(CASES):
        if extra.get("temperature", 0) == 0:
            off, on = runs["off"]["outs"][i], runs["on"]["outs"][i]
            assert on["output_ids"] == off["output_ids"], f"case {i}: {off['text']!r}"


def test_seeded_sampling_outputs_are_identical(runs):
    for i, (_, extra) in enumerate(CASES):
        if extra.get("temperature", 0) > 0:
            off, on = runs["off"]["outs"][i], runs["on"]["outs"][i]
            assert on["output_ids"] == off["output_ids"], f"case {i}: {off['text']!r}"


def test_finish_reasons_are_identical(runs):
    off = [o["meta_info"]["finish_reason"] for o in runs["off"]["outs"]]
    on = [o["meta_info"]["finish_reason"] for o in runs["on"]["outs"]]
    assert on == off
    assert {"stop", "length"} <= {r["type"] for r in off}  # both kinds are exercised


def test_logprobs_are_those_of_sequential_decoding(runs):
    for i in LOGPROB_ROWS:
        off, on = runs["off"]["outs"][i]["meta_info"], runs["on"]["outs"][i]["meta_info"]
        assert [t for _, t, _ in on["output_token_logprobs"]] == [
            t for _, t, _ in off["output_token_logprobs"]
        ]
        for (a, _, _), (b, _, _) in zip(on["output_token_logprobs"], off["output_token_logprobs"]):
            assert a == pytest.approx(b, abs=1e-3)
        on_top = [[t for _, t, _ in row] for row in on["output_top_logprobs"]]
        off_top = [[t for _, t, _ in row] for row in off["output_top_logprobs"]]
        assert on_top == off_top


def test_confirmed_drafts_save_forward_steps(runs):
    on, off = runs["on"], runs["off"]
    confirmed = _delta(on, "jump_forward_tokens_total")
    drafted = _delta(on, "jump_forward_draft_tokens_total")
    print(
        f"\njump-forward: {drafted} draft tokens run, {confirmed} confirmed; forward steps "
        f"{_delta(off, 'forward_steps_total')} -> {_delta(on, 'forward_steps_total')}"
    )
    assert confirmed > 0 and drafted > confirmed  # drafts were both confirmed and refused
    assert _delta(off, "jump_forward_draft_tokens_total") == 0
    assert _delta(on, "forward_steps_total") < _delta(off, "forward_steps_total")
    assert _delta(on, "generation_tokens_total") == _delta(off, "generation_tokens_total")


def test_streaming_sends_only_verified_tokens(runs):
    # Streamed deltas cannot be taken back: a draft token sent early would show up here.
    streamed = [t for chunk in runs["stream"] for t in chunk]
    assert streamed == runs["off"]["outs"][2]["output_ids"]
    assert len(runs["stream"]) > 1


def test_outputs_are_identical_under_retraction_with_jump_forward(runs):
    assert _delta(runs["tight"], "retractions_total") > 0
    assert _delta(runs["tight"], "jump_forward_tokens_total") > 0
    for i, (off, tight) in enumerate(zip(runs["off"]["outs"], runs["tight"]["outs"])):
        assert tight["output_ids"] == off["output_ids"], f"case {i}: {off['text']!r}"


def test_rejected_drafts_free_their_kv(runs):
    assert [runs[name]["leaked"] for name in ENGINES] == [0] * len(ENGINES)


# -- drafts: the tokens of the forced text ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize(
    "output, forced",
    [('{"', 'name": "'), ('{"name": "John", "', 'age": '), ("hello", " world"), ("", '{"name')],
)
def test_draft_spells_the_forced_text(tokenizer, output, forced):
    ids = tokenizer.encode(output)
    draft = forced_tokens(tokenizer, ids, forced)
    assert draft == tokenizer.encode(forced)
    assert tokenizer.decode(ids + draft) == output + forced


def test_no_draft_after_a_partial_character(tokenizer):
    ids = tokenizer.encode("ab 💩")
    assert len(ids) > 3  # the emoji spans several byte tokens
    assert forced_tokens(tokenizer, ids[:-1], "x") == []
    assert forced_tokens(tokenizer, ids, "x") != []


def test_no_draft_for_empty_forced_text(tokenizer):
    assert forced_tokens(tokenizer, tokenizer.encode("{"), "") == []


def test_draft_of_a_forced_key_is_accepted_by_the_matcher(tokenizer):
    backend = XGrammarBackend(tokenizer, model_vocab_size(tokenizer), num_threads=1)
    try:
        matcher = backend.get_matcher("json_schema", json.dumps(PERSON)).result(timeout=10)
        output = tokenizer.encode('{"')
        assert all(matcher.accept_token(t) for t in output)
        forced = matcher.find_jump_forward_string()
        assert forced.startswith('name"')
        draft = forced_tokens(tokenizer, output, forced)
        assert all(matcher.accept_token(t) for t in draft)
    finally:
        backend.shutdown()
