"""The interpreter on a scripted backend: gens, defaults, typed values, fork / join,
run_batch, streaming, nested programs and error propagation. No model."""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

import pytest

import loom
from loom.backends.base import Capabilities
from loom.lang.errors import LoomError, ProgramError
from tests.lang_fakes import FakeBackend


@loom.function
def qa(s, question):
    s += "Q: " + question + "\nA:"
    s += loom.gen("answer", max_tokens=8, stop="\n")


def test_gen_appends_output_and_sets_variable_and_meta():
    backend = FakeBackend(reply=lambda req: " Paris")
    state = qa.run(question="capital of France?", backend=backend)
    assert state.text() == "Q: capital of France?\nA: Paris"
    assert state["answer"] == " Paris"
    meta = state.get_meta_info("answer")
    assert {"prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"} <= set(meta)
    assert backend.requests[0].prompt == "Q: capital of France?\nA:"


def test_gen_params_win_over_run_defaults_and_aliases_map():
    backend = FakeBackend(reply=lambda req: "x")
    qa.run(question="q", backend=backend, max_tokens=99, temperature=0.5, stop=["END"])
    params = backend.requests[0].sampling_params
    assert params == {"max_new_tokens": 8, "stop": ["\n"], "temperature": 0.5}


def test_typed_gens_parse_their_values():
    replies = iter(["42", "True", 'hi \\"there\\""', "2.5"])
    backend = FakeBackend(reply=lambda req: next(replies))

    @loom.function
    def typed(s):
        s += loom.gen_int("n") + loom.gen_bool("b") + loom.gen_string("t") + loom.gen_float("f")

    state = typed.run(backend=backend)
    assert (state["n"], state["b"], state["t"], state["f"]) == (42, True, 'hi "there"', 2.5)
    # gen_string's forced opening quote is sent as prompt text, not generated
    assert backend.requests[2].prompt.endswith('True"')
    assert not backend.requests[2].sampling_params["regex"].startswith('"')


def test_regex_literal_prefix_is_sent_as_prompt_text():
    backend = FakeBackend(reply=lambda req: " 42")

    @loom.function
    def prog(s):
        s += loom.gen("age", regex=r"Age: [0-9]+")

    state = prog.run(backend=backend)
    req = backend.requests[0]
    assert req.prompt == "Age:"  # the trailing space stays with the model's first token
    assert req.sampling_params["regex"] == " [0-9]+"
    assert state["age"] == "Age: 42"


def test_split_literals_false_sends_a_regex_whole():
    backend = FakeBackend(reply=lambda req: "Age: 42")

    @loom.function
    def prog(s):
        s += loom.gen("age", regex=r"Age: [0-9]+", split_literals=False)

    assert prog.run(backend=backend)["age"] == "Age: 42"
    (req,) = backend.requests
    assert req.prompt == "" and req.sampling_params["regex"] == "Age: [0-9]+"
    caps = Capabilities(grammar=False, chat_api=False, scoring=False, cache=False)
    with pytest.raises(LoomError, match="split_literals=False cannot honour"):
        prog.run(backend=FakeBackend(capabilities=caps))


def test_regex_is_honoured_by_literal_split_without_server_grammar():
    outputs = iter(["Ada Lovelace, Age: nope", "36 years\n"])
    caps = Capabilities(grammar=False, chat_api=False, scoring=False, cache=False)
    backend = FakeBackend(reply=lambda req: next(outputs), capabilities=caps)

    @loom.function
    def prog(s):
        s += loom.gen("who", regex=r"Name: [A-Z][a-z]+, Age: [0-9]+\n")

    state = prog.run(backend=backend)
    assert state["who"] == "Name: Ada, Age: 36\n"
    first, second = backend.requests
    assert first.prompt == "Name: " and first.sampling_params["stop"] == [", Age: "]
    assert second.prompt == "Name: Ada, Age: " and second.sampling_params["stop"] == ["\n"]
    assert "regex" not in first.sampling_params


def test_literal_split_fails_clearly_when_output_cannot_match():
    caps = Capabilities(grammar=False, chat_api=False, scoring=False, cache=False)
    backend = FakeBackend(reply=lambda req: "abc", capabilities=caps)

    @loom.function
    def prog(s):
        s += loom.gen("n", regex=r"[0-9]+")

    with pytest.raises(LoomError, match="cannot enforce regexes"):
        prog.run(backend=backend)


def test_select_appends_the_best_choice_with_scores():
    backend = FakeBackend(scores={"yes": [-0.5], "no": [-2.0]})

    @loom.function
    def prog(s):
        s += "Sky blue? " + loom.select("ans", ["no", "yes"])

    state = prog.run(backend=backend)
    assert state["ans"] == "yes" and state.text() == "Sky blue? yes"
    assert state.get_meta_info("ans")["scores"] == [-2.0, -0.5]
    assert backend.scored == [("Sky blue? ", ["no", "yes"])]


def test_chat_api_backend_requires_gens_in_assistant_turns():
    caps = Capabilities(grammar=False, chat_api=True, scoring=False, cache=False)
    backend = FakeBackend(reply=lambda req: "hello", capabilities=caps)

    @loom.function
    def bad(s):
        s += loom.user("hi") + loom.gen("x")

    @loom.function
    def good(s):
        s += loom.system("be brief") + loom.user("hi") + loom.assistant(loom.gen("x"))

    with pytest.raises(LoomError, match="assistant turn"):
        bad.run(backend=backend)
    state = good.run(backend=backend)
    assert state["x"] == "hello"
    assert [m["role"] for m in backend.requests[-1].messages] == ["system", "user"]
    assert state.messages()[-1] == {"role": "assistant", "content": "hello"}


def test_select_on_backend_without_logprobs_is_a_clear_error():
    caps = Capabilities(grammar=False, chat_api=False, scoring=False, cache=False)

    @loom.function
    def prog(s):
        s += loom.select("x", ["a", "b"])

    with pytest.raises(LoomError, match="cannot score choices"):
        prog.run(backend=FakeBackend(capabilities=caps))


# ---- nested programs, bind ---------------------------------------------------------------


def test_program_called_inside_another_runs_on_the_same_state():
    @loom.function
    def inner(s, word):
        s += "<" + word + ">"

    @loom.function
    def outer(s):
        s += "a"
        inner(s, "b")
        s += "c"

    assert outer.run(backend=FakeBackend()).text() == "a<b>c"


def test_bind_fixes_arguments():
    bound = qa.bind(question="fixed?")
    backend = FakeBackend(reply=lambda req: "!")
    assert bound.run(backend=backend).text() == "Q: fixed?\nA:!"
    with pytest.raises(LoomError, match="unexpected keyword"):
        qa.bind(nope=1)


# ---- fork / join -------------------------------------------------------------------------


def test_fork_branches_run_concurrently_and_join_gathers_variables():
    barrier = threading.Barrier(3, timeout=10)

    def reply(req):
        barrier.wait()  # all three branches must be in flight at once
        return req.prompt[-1]

    backend = FakeBackend(reply=reply)

    @loom.function
    def prog(s):
        s += "Options:"
        forks = s.fork(3)
        forks += lambda i: f" {i}" + loom.gen("pick")
        forks.join()

    state = prog.run(backend=backend)
    assert state["pick"] == ["0", "1", "2"]
    assert backend.cached == ["Options:"]  # the shared prefix went to the cache once
    assert state.text() == "Options:"


def test_join_concat_appends_branch_text_in_order():
    @loom.function
    def prog(s):
        s += "x"
        forks = s.fork(2)
        forks[0] += "A"
        forks[1] += "B"
        forks.join(mode="concat")
        s += "!"

    assert prog.run(backend=FakeBackend()).text() == "xAB!"


def test_error_in_a_branch_names_the_program_line():
    def reply(req):
        raise ValueError("backend exploded")

    @loom.function
    def prog(s):
        forks = s.fork(2)
        forks += lambda i: loom.gen("x")
        forks.join()

    with pytest.raises(ProgramError, match="backend exploded") as info:
        prog.run(backend=FakeBackend(reply=reply))
    assert "test_lang_program.py" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


# ---- run_batch ---------------------------------------------------------------------------


def test_run_batch_returns_states_in_input_order():
    def reply(req):
        time.sleep(0.001 * (hash(req.prompt) % 7))
        return req.prompt.split("Q: ")[1].split("\n")[0].upper()

    states = qa.run_batch([{"question": f"q{i}"} for i in range(20)], backend=FakeBackend(reply))
    assert [s["answer"] for s in states] == [f"Q{i}" for i in range(20)]


def test_run_batch_accepts_tuples_and_validates_items():
    states = qa.run_batch([("a",), ("b",)], backend=FakeBackend(lambda r: "!"))
    assert [s.text() for s in states] == ["Q: a\nA:!", "Q: b\nA:!"]
    with pytest.raises(LoomError, match="item 1 must be a dict"):
        qa.run_batch([{"question": "a"}, "b"], backend=FakeBackend())
    with pytest.raises(LoomError, match="item 0.*question"):
        qa.run_batch([{}], backend=FakeBackend())
    with pytest.raises(LoomError, match="unknown options"):
        qa.run_batch([{"question": "a"}], backend=FakeBackend(), bogus=1)


def test_run_batch_warms_the_shared_constant_prefix_once():
    @loom.function
    def prog(s, preamble, question):
        s += loom.system("Be terse.")
        s += preamble
        s += loom.user(question)
        s += loom.assistant(loom.gen("a", max_tokens=4))

    backend = FakeBackend(lambda r: "ok")
    batch = [{"preamble": "Shared facts.", "question": f"q{i}"} for i in range(4)]
    prog.run_batch(batch, backend=backend)
    # the same-valued argument is part of the constant prefix; the per-item one is not
    assert backend.cached == ["System: Be terse.\n\nShared facts.User: "]
    assert all(r.prompt.startswith(backend.cached[0]) for r in backend.requests)


def test_run_batch_keeps_going_when_one_program_fails():
    @loom.function
    def prog(s, i):
        if i == 1:
            raise KeyError("bad item")
        s += str(i)

    states = prog.run_batch([{"i": i} for i in range(3)], backend=FakeBackend())
    assert isinstance(states[1].error(), KeyError)
    assert states[0].error() is None and states[2].text() == "2"


# ---- errors and streaming ------------------------------------------------------------------


def test_exception_in_program_surfaces_from_run_with_its_traceback():
    @loom.function
    def prog(s):
        s += "x"
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError, match="tool failed") as info:
        prog.run(backend=FakeBackend())
    names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "prog" in names


def test_stream_error_reaches_readers_without_hanging():
    @loom.function
    def prog(s):
        s += "start "
        s += loom.gen("x")
        raise RuntimeError("late failure")

    state = prog.run(backend=FakeBackend(lambda r: "abcdef"), stream=True)
    pieces = []
    with pytest.raises(RuntimeError, match="late failure"):
        for piece in state.text_iter():
            pieces.append(piece)
    assert "".join(pieces) == "start abcdef"
    assert isinstance(state.error(), RuntimeError)
    with pytest.raises(RuntimeError):
        state["never_set"]


def test_stream_pieces_concatenate_to_the_text_and_filter_by_variable():
    state = qa.run(question="q", backend=FakeBackend(lambda r: "streamed answer"), stream=True)
    assert "".join(state.text_iter()) == state.text() == "Q: q\nA:streamed answer"
    assert "".join(state.text_iter("answer")) == "streamed answer"


def test_async_text_iterator():
    state = qa.run(question="q", backend=FakeBackend(lambda r: "async!"), stream=True)

    async def collect():
        return [p async for p in state.text_async_iter()]

    assert "".join(asyncio.run(collect())) == "Q: q\nA:async!"


def test_reading_an_unknown_variable_is_an_error_not_a_hang():
    state = qa.run(question="q", backend=FakeBackend(lambda r: "a"))
    with pytest.raises(LoomError, match="no variable 'nope'"):
        state["nope"]


def test_var_scope_captures_text():
    @loom.function
    def prog(s):
        with s.var_scope("block"):
            s += "inside " + loom.gen(max_tokens=2)
        s += " outside"

    state = prog.run(backend=FakeBackend(lambda r: "gen"))
    assert state["block"] == "inside gen"


def test_gen_validates_arguments_when_called():
    with pytest.raises(LoomError, match="one constraint"):
        loom.gen("x", regex="a", json_schema={})
    with pytest.raises(LoomError, match="look-ahead"):
        loom.gen("x", regex="(?=a)a")
    with pytest.raises(LoomError, match="back-reference"):
        loom.gen("x", regex=r"(a)\1")
    with pytest.raises(LoomError, match="distinct"):
        loom.select("x", ["a", "a"])
    with pytest.raises(LoomError, match="not valid JSON"):
        loom.gen("x", json_schema="{nope")


def test_json_schema_accepts_a_pydantic_model():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    g = loom.gen("p", json_schema=Person)
    assert '"age"' in g.params.json_schema


def test_no_backend_is_a_clear_error():
    loom.set_default_backend(None)
    with pytest.raises(LoomError, match="set_default_backend"):
        qa.run(question="q")
