"""Programs on the embedded default model (SmolLM2-135M-Instruct, CPU), through the in-process
Engine and through a `loom serve` (RuntimeEndpoint); then through the server's OpenAI API.
References: the tokenizer's chat template, `re` / `jsonschema` for constrained outputs, and
transformers for select's scores."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import loom
from loom.backends.base import BackendError
from loom.backends.runtime import Runtime
from loom.lang.backend_context import resolve_backend
from loom.lang.errors import LoomError
from loom.runtime.engine import Engine

SERVER = dict(device="cpu", max_total_tokens=16384, context_length=4096)
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with Engine(default_model_dir, **SERVER) as e:
        yield e


@pytest.fixture(scope="module")
def runtime(default_model_dir):
    with Runtime(default_model_dir, **SERVER) as rt:
        yield rt


@pytest.fixture(scope="module", params=["engine", "endpoint"])
def backend(request):
    if request.param == "engine":
        return resolve_backend(request.getfixturevalue("engine"))
    return resolve_backend(loom.RuntimeEndpoint(request.getfixturevalue("runtime").url))


# ---- programs --------------------------------------------------------------------------------


@loom.function
def few_shot(s, question):
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    s += "Q: What is the capital of Japan?\nA: Tokyo\n"
    s += "Q: " + question + "\nA:"
    s += loom.gen("answer", max_tokens=12, stop="\n")


def test_few_shot_qa_stops_at_the_stop_string(backend):
    state = few_shot.run(question="What is the capital of France?", backend=backend, **GREEDY)
    answer = state["answer"]
    assert answer.strip() == "Paris"
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] == "stop"
    assert meta["prompt_tokens"] > 0 and 0 < meta["completion_tokens"] <= 12
    assert "cached_tokens" in meta


@pytest.mark.parametrize(
    "method",
    [
        loom.token_length_normalized,
        loom.greedy_token_selection,
        loom.unconditional_likelihood_normalized,
    ],
)
def test_select_returns_one_of_its_choices_with_scores(backend, method):
    @loom.function
    def prog(s):
        s += "Q: Is Paris the capital of France? Answer yes or no.\nA:"
        s += loom.select("ans", [" yes", " no", " maybe not"], choices_method=method)

    state = prog.run(backend=backend)
    meta = state.get_meta_info("ans")
    assert state["ans"] in (" yes", " no", " maybe not")
    assert len(meta["scores"]) == 3 and meta["method"] == method.name
    assert state["ans"] == meta["choices"][max(range(3), key=lambda i: meta["scores"][i])] or (
        method is loom.greedy_token_selection
    )


def test_gen_int_parses_an_int(backend):
    @loom.function
    def prog(s):
        s += "Q: How many legs does a dog have?\nA: A dog has " + loom.gen_int("n", max_tokens=4)

    state = prog.run(backend=backend, return_logprob=True, **GREEDY)
    assert isinstance(state["n"], int)
    assert state.text().endswith(str(state["n"]))
    meta = state.get_meta_info("n")
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]


def test_regex_gen_fully_matches(backend):
    pattern = r"Date: [0-9]{4}-[0-9]{2}-[0-9]{2}"

    @loom.function
    def prog(s):
        s += "The first moon landing happened in 1969.\n"
        s += loom.gen("date", regex=pattern, max_tokens=16)

    state = prog.run(backend=backend, **GREEDY)
    assert re.fullmatch(pattern, state["date"])


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}


def test_json_schema_gen_validates(backend):
    @loom.function
    def prog(s):
        s += loom.user("Describe Ada Lovelace, who died at 36, as JSON with name and age.")
        s += loom.assistant(loom.gen("person", json_schema=PERSON, max_tokens=48))

    state = prog.run(backend=backend, **GREEDY)
    jsonschema.validate(json.loads(state["person"]), PERSON)


NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "born": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "country": {"type": "string", "maxLength": 24},
            },
            "required": ["city", "country"],
        },
        "alive": {"type": "boolean"},
    },
    "required": ["name", "born", "address", "alive"],
}


@loom.function
def describe_person(s, who):
    s += loom.user(f"Describe {who} as JSON: name, year born, address (city, country), alive.")
    s += loom.assistant(loom.gen("person", json_schema=NESTED, max_tokens=64))


def check_split_person(state, tokenizer) -> list[dict]:
    """The person validates, appears once, and its meta info adds up; returns the parts'."""
    value = state["person"]
    jsonschema.validate(json.loads(value), NESTED)
    assert state.text().count(value) == 1 and state.messages()[-1]["content"] == value
    meta = state.get_meta_info("person")
    parts = meta["parts"]  # name, born, city, country, alive; the rest is literal text
    assert len(parts) == 5 and all(p["finish_reason"]["type"] == "stop" for p in parts)
    assert meta["prompt_tokens"] == parts[0]["prompt_tokens"] > 0
    assert meta["completion_tokens"] == sum(p["completion_tokens"] for p in parts)
    # keys and braces are never generated: fewer tokens than the JSON text has
    assert len(parts) <= meta["completion_tokens"] < len(tokenizer(value).input_ids)
    return parts


def test_json_schema_gen_sends_fixed_parts_as_prompt_text(backend):
    state = describe_person.run(who="Ada Lovelace", backend=backend, **GREEDY)
    parts = check_split_person(state, backend.tokenizer)
    # each part's prompt extends the one before, whose tokens the radix cache holds
    for before, part in zip(parts, parts[1:]):
        assert part["cached_tokens"] >= before["prompt_tokens"] - 1


def test_fork_branches_share_the_prefix_and_join_gathers(backend):
    @loom.function
    def prog(s):
        s += "Here is a list of three common fruits, one per line:\n"
        forks = s.fork(3)
        forks += lambda i: f"{i + 1}." + loom.gen("fruit", max_tokens=4, stop="\n")
        forks.join()

    state = prog.run(backend=backend, **GREEDY)
    assert len(state["fruit"]) == 3 and all(isinstance(f, str) for f in state["fruit"])
    prefix_tokens = len(backend.tokenizer("Here is a list of three common fruits").input_ids)
    for meta in state.get_meta_info("fruit"):
        assert meta["cached_tokens"] >= prefix_tokens


PREAMBLE = "You are a careful assistant. " + " ".join(
    f"Fact {i}: the number {i} squared is {i * i}." for i in range(20)
)


@loom.function
def with_preamble(s, question):
    s += loom.system(PREAMBLE)
    s += loom.user(question)
    s += loom.assistant(loom.gen("answer", max_tokens=2))


def test_run_batch_members_hit_the_warmed_preamble(backend):
    batch = [{"question": f"What is {i} squared?"} for i in range(16)]
    states = with_preamble.run_batch(batch, backend=backend, **GREEDY)
    preamble = with_preamble.cache(backend=backend)  # the same constant prefix, rendered
    preamble_tokens = len(backend.tokenizer(preamble).input_ids)
    assert preamble_tokens > 200
    for state in states:
        assert state.error() is None
        # every member finds the whole preamble cached (at most its last token re-split)
        assert state.get_meta_info("answer")["cached_tokens"] >= preamble_tokens - 1


def test_stream_pieces_concatenate_to_the_final_text(backend):
    state = few_shot.run(question="What is 2+2?", backend=backend, stream=True, **GREEDY)
    pieces = list(state.text_iter())
    answer_pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == state.text()
    assert "".join(answer_pieces) == state["answer"]


@loom.function
def multi_turn(s, first, second):
    s += loom.system("You are a friendly assistant.")
    s += loom.user(first)
    s += loom.assistant(loom.gen("a1", max_tokens=10))
    s += loom.user(second)
    s += loom.assistant(loom.gen("a2", max_tokens=10))


def test_multi_turn_messages_match_the_chat_template(backend):
    state = multi_turn.run(first="Hi!", second="What is your name?", backend=backend, **GREEDY)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == state["a1"] and messages[4]["content"] == state["a2"]
    assert state.text() == backend.tokenizer.apply_chat_template(messages, tokenize=False)
    assert state.get_meta_info("a2")["cached_tokens"] > 0  # the history was cached


def test_tool_call_evaluated_in_python_between_gens(backend):
    calls = []

    def calculator(expression: str) -> str:
        calls.append(expression)
        return str(eval(expression, {"__builtins__": {}}))  # digits and + only

    @loom.function
    def agent(s, expression):
        s += loom.user(f"What is {expression}? Pick a tool first.")
        s += loom.assistant("Tool: " + loom.select("tool", ["calculator", "web search"]))
        observation = calculator(expression) if s["tool"] == "calculator" else "no result"
        s += loom.user(f"The tool says: {observation}. State the answer.")
        s += loom.assistant(loom.gen("answer", max_tokens=8))

    state = agent.run(expression="17+25", backend=backend, **GREEDY)
    if state["tool"] == "calculator":
        assert calls == ["17+25"] and "42" in state.messages()[2]["content"]
    assert state["answer"] == state.messages()[-1]["content"]


def test_engine_and_runtime_objects_are_accepted_as_backends(engine, runtime):
    loom.set_default_backend(engine)
    try:
        state = few_shot.run(question="What is the capital of Spain?", **GREEDY)
        assert state["answer"].strip() == "Madrid"
    finally:
        loom.set_default_backend(None)
    assert resolve_backend(runtime).engine.url == runtime.url


# ---- engine only: select's scores against transformers --------------------------------------


def test_select_scores_match_transformers(engine, default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt, choices = "The capital of France is", [" Paris", " Lyon", "Paris!"]

    @loom.function
    def prog(s):
        s += prompt + loom.select("city", choices)

    meta = prog.run(backend=engine).get_meta_info("city")
    tok = engine.tokenizer
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, torch_dtype=torch.float32)
    prompt_ids = tok(prompt).input_ids
    fulls = [tok(prompt + c).input_ids for c in choices]
    start = min(
        next((i for i, (a, b) in enumerate(zip(prompt_ids, f)) if a != b), len(prompt_ids))
        for f in fulls
    )
    for full, got in zip(fulls, meta["input_token_logprobs"]):
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        want = [logprobs[i - 1, full[i]].item() for i in range(start, len(full))]
        assert got == pytest.approx(want, abs=2e-3)


# ---- the OpenAI API of loom serve ------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_chat(runtime):
    return loom.OpenAI(base_url=runtime.url + "/v1", continue_final_message=True, max_retries=0)


def test_openai_chat_program_with_gens_in_assistant_turns(openai_chat):
    state = multi_turn.run(first="Hi!", second="Name a color.", backend=openai_chat, **GREEDY)
    messages = state.messages()
    assert [m["role"] for m in messages][-1] == "assistant"
    assert messages[2]["content"] == state["a1"] and state["a2"]
    meta = state.get_meta_info("a2")
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0


def test_openai_regex_gen_is_honoured_by_the_literal_split(runtime, openai_chat):
    pattern = r"Answer: [0-9]+\."
    completion = loom.OpenAI(base_url=runtime.url + "/v1", is_chat_model=False, max_retries=0)

    @loom.function
    def raw(s):
        s += "Q: What is 3+4?\n" + loom.gen("a", regex=pattern, max_tokens=6)

    @loom.function
    def chat(s):
        s += loom.user("What is 3+4? Reply as 'Answer: N.'")
        s += loom.assistant(loom.gen("a", regex=pattern, max_tokens=6))

    for prog, b in ((raw, completion), (chat, openai_chat)):
        assert re.fullmatch(pattern, prog.run(backend=b, **GREEDY)["a"])


def test_openai_json_schema_gen_is_split_and_validates(runtime, openai_chat, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    grammar = loom.OpenAI(
        base_url=runtime.url + "/v1",
        continue_final_message=True,
        server_grammar=True,
        max_retries=0,
    )
    for b in (grammar, openai_chat):  # regex parts enforced by loom / by the literal split
        state = describe_person.run(who="Ada Lovelace", backend=b, **GREEDY)
        check_split_person(state, tokenizer)


def test_openai_select_without_prompt_logprobs_is_a_clear_error(runtime, openai_chat):
    @loom.function
    def chat(s):
        s += loom.user("Yes or no?") + loom.assistant(loom.select("x", ["yes", "no"]))

    @loom.function
    def raw(s):
        s += "Yes or no? " + loom.select("x", ["yes", "no"])

    with pytest.raises(LoomError, match="cannot score choices"):
        chat.run(backend=openai_chat)
    completion = loom.OpenAI(base_url=runtime.url + "/v1", is_chat_model=False, max_retries=0)
    with pytest.raises(BackendError, match="prompt logprobs"):  # loom serve does not echo
        raw.run(backend=completion)
