"""The official `openai` client against a live `loom serve` on the embedded SmolLM2-135M-Instruct
(it has a chat template): chat and completions, streamed and not, n, stop, logprobs,
constrained output, usage, and errors with their status codes."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from loom.backends.runtime import Runtime

CONTEXT = 2048
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def runtime(default_model_dir):
    with Runtime(
        default_model_dir, device="cpu", max_total_tokens=8192, context_length=CONTEXT
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(runtime) -> openai.OpenAI:
    return openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def test_models_lists_the_served_model(client, default_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [default_model_dir]


def test_models_retrieve_gives_the_served_model_and_404_for_another(client, model):
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, model):
    args = dict(model=model, messages=ASK, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**args)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options=options))
    counted = [c.usage for c in chunks if c.choices and c.usage is not None]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(counted) >= len(content) > 0
    assert {u.prompt_tokens for u in counted} == {whole.usage.prompt_tokens}
    so_far = [u.completion_tokens for u in counted]
    assert so_far == sorted(so_far) and so_far[-1] == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_answers_with_usage(client, model, tokenizer):
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    prompt = tokenizer.apply_chat_template(
        ASK, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert r.usage.prompt_tokens == len(prompt)
    end_of_turn = 1 if choice.finish_reason == "stop" else 0  # the stop token counts too
    answer = tokenizer(choice.message.content).input_ids
    assert r.usage.completion_tokens == len(answer) + end_of_turn <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_chat_stream_matches_the_non_stream_answer_and_reports_usage(client, model):
    args = dict(model=model, messages=ASK, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_completion_n2_gives_two_choices_and_counts_the_prompt_once(client, model):
    r = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=4, n=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # seeds 7 and 8
    assert r.usage.prompt_tokens == 4
    assert r.usage.completion_tokens == 8


def test_completion_stream_n2_gives_both_choices(client, model):
    stream = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=4, n=2, temperature=0, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == texts[1] != ""


def test_stop_string_ends_the_completion_before_it(client, model):
    args = dict(
        model=model, prompt="The days of the week are Monday,", max_tokens=10, temperature=0
    )
    full = client.completions.create(**args).choices[0].text
    stop = full.strip().split()[2]
    r = client.completions.create(**args, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_chat_logprobs_give_each_token_with_its_alternatives(client, model):
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs), abs=1e-5)


def test_completion_logprobs_line_up_with_the_text(client, model):
    r = client.completions.create(
        model=model, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_response_format_json_schema_output_validates(client, model):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        max_tokens=48,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema, "strict": True},
        },
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_extra_body_regex_constrains_the_answer(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
        max_tokens=4,
        temperature=0,
        extra_body={"regex": "(yes|no)", "top_k": 5, "min_p": 0.01},
    )
    assert r.choices[0].message.content in ("yes", "no")


def test_a_repeated_prompt_reports_cached_tokens(client, model):
    prompt = "A long shared preamble about the history of France. " * 4
    client.completions.create(model=model, prompt=prompt, max_tokens=1)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens - 1 <= cached <= again.usage.prompt_tokens


@pytest.mark.parametrize(
    "call, error, message",
    [
        (dict(model="no-such-model"), openai.NotFoundError, "does not exist"),
        (dict(temperature="hot"), openai.BadRequestError, "temperature"),
        (dict(max_tokens=CONTEXT + 1), openai.BadRequestError, "context length"),
        (dict(max_completion_tokens=10**7), openai.BadRequestError, "context length"),
        (dict(messages=[]), openai.BadRequestError, "messages"),
        (dict(extra_body={"frobnicate": 1}), openai.BadRequestError, "frobnicate"),
        (
            dict(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            openai.BadRequestError,
            "tool",
        ),
        (dict(response_format={"type": "xml"}), openai.BadRequestError, "response_format"),
        (dict(store=True), openai.BadRequestError, "store"),
        (dict(service_tier="flex"), openai.BadRequestError, "service_tier"),
    ],
)
def test_chat_errors_have_status_codes_and_say_what_to_fix(client, model, call, error, message):
    args = {"model": model, "messages": ASK, "max_tokens": 2, **call}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    assert message in info.value.body["message"]


def test_completion_errors_have_status_codes(client, model):
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model=model, prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=model, prompt="hi " * (CONTEXT + 10), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=model, prompt="hi", max_tokens=2, echo=True)


def test_malformed_json_body_is_a_400(runtime):
    r = httpx.post(
        runtime.url + "/v1/chat/completions",
        content=b"{nope",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


# Each of these once killed the scheduler (every later request got a 503): issue 17.
@pytest.mark.parametrize(
    "extra, status",
    [
        ({"seed": 2**63}, 200),  # what the openai client sends for seed=2**63
        ({"seed": 2**64 - 1, "temperature": 0.7}, 200),
        ({"top_k": 2**63, "temperature": 0.7}, 200),
        ({"min_tokens": 2, "stop_token_ids": [100000]}, 200),  # an id past the vocabulary
        ({"stop": ["\ud800"]}, 400),  # a lone surrogate: valid JSON, no valid text
        ({"temperature": float("nan")}, 400),
        ({"seed": 2**64}, 400),
    ],
)
def test_requests_that_once_killed_the_scheduler_complete_or_get_a_400(
    runtime, model, extra, status
):
    # json.dumps escapes the surrogate (\\ud800) and writes NaN as Python's JSON reader takes it
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4, **extra})
    r = httpx.post(
        runtime.url + "/v1/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    after = httpx.post(
        runtime.url + "/v1/completions",
        json={"model": model, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_a_body_nested_thousands_deep_gets_a_400(runtime, model, path):
    deep = "[" * 20000 + "]" * 20000  # once a 500 (RecursionError)
    body = f'{{"model": "{model}", "prompt": {deep}, "text": {deep}}}'
    r = httpx.post(
        runtime.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"], r.text
    ok = httpx.post(
        runtime.url + "/v1/completions",
        json={"model": model, "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200
