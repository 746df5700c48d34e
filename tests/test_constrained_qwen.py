"""Constrained decoding end to end on Qwen2.5-Coder-0.5B (a Qwen2 BPE vocabulary of 152k
tokens, unlike SmolLM2's 49k): a few cases of test_constrained_engine, kept short because
a 0.5B model decodes at ~1-2 s per step on 2 CPU cores. The first run on a machine
downloads and converts the model (~500 MB, ~70 s); later runs load the cached folder.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom.runtime.engine import Engine
from loom.runtime.models.model_source import fetch_qwen25_coder_05b
from tests.test_constrained_engine import CHOICES, EBNFS, REGEXES, SCHEMAS, chat

JSON_CASES = [SCHEMAS[i] for i in (1, 2, 4, 5)]  # nested object, array, $ref, date format


@pytest.fixture(scope="module")
def outputs():
    with Engine(
        fetch_qwen25_coder_05b(), max_total_tokens=4096, enable_jump_forward=True
    ) as engine:
        cases = [(p, {"json_schema": json.dumps(s)}) for p, s in JSON_CASES]
        cases += [(REGEXES[2][0], {"regex": REGEXES[2][1]}), (EBNFS[1][0], {"ebnf": EBNFS[1][1]})]
        cases += [(CHOICES[2][0], CHOICES[2][1])]
        outs = engine.generate(
            input_ids=[chat(engine, p) for p, _ in cases],
            sampling_params=[{"temperature": 0, "max_new_tokens": 64, **c} for _, c in cases],
        )
        info = engine.get_server_info()
    assert all(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs), outs
    return [o["text"] for o in outs], info


def test_json_schema_outputs_validate(outputs):
    texts, _ = outputs
    for (_, schema), text in zip(JSON_CASES, texts):
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_regex_ebnf_and_choice_outputs_match(outputs):
    texts, _ = outputs
    phone, intro, planet = texts[len(JSON_CASES) :]
    assert re.fullmatch(REGEXES[2][1], phone)
    assert re.fullmatch(EBNFS[1][2], intro)
    assert planet in CHOICES[2][2]


def test_jump_forward_drafts_are_confirmed_on_this_vocabulary(outputs):
    _, info = outputs
    assert info.jump_forward_tokens_total > 0
