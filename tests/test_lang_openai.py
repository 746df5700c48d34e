"""The OpenAI backend against a fake `openai` client: request fields, chat messages, select
scoring from echoed prompt logprobs. No server (the live-server tests are in
test_lang_model.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest

import loom
from loom.backends.base import BackendError, GenRequest
from loom.backends.openai_backend import OpenAI

USAGE = NS(prompt_tokens=5, completion_tokens=2, prompt_tokens_details=None)


class FakeClient:
    def __init__(
        self,
        echo: dict[str, list[tuple[str, float | None]]] | None = None,
        chat_reply=None,
    ):
        self.calls: list[tuple[str, dict]] = []
        self.echo = echo or {}
        self.chat_reply = chat_reply or (lambda kw: "hi there")
        self.completions = NS(create=self._completion)
        self.chat = NS(completions=NS(create=self._chat))

    def _completion(self, **kw):
        self.calls.append(("completions", kw))
        if kw.get("echo"):
            return NS(choices=[self._echoed(i, p) for i, p in enumerate(kw["prompt"])])
        return NS(choices=[NS(text=" done", finish_reason="stop", index=0)], usage=USAGE)

    def _echoed(self, index: int, text: str):
        tokens = self.echo[text]
        offsets = [sum(len(t) for t, _ in tokens[:i]) for i in range(len(tokens))]
        logprobs = NS(
            tokens=[t for t, _ in tokens],
            token_logprobs=[lp for _, lp in tokens],
            text_offset=offsets,
        )
        return NS(index=index, logprobs=logprobs, text=text)

    def _chat(self, **kw):
        self.calls.append(("chat", kw))
        message = NS(content=self.chat_reply(kw))
        return NS(choices=[NS(message=message, finish_reason="stop", index=0)], usage=USAGE)


def test_sampling_params_map_to_openai_fields_and_extra_body():
    client = FakeClient()
    backend = OpenAI("m", client=client, is_chat_model=False)
    params = {
        "max_new_tokens": 7,
        "temperature": 0,
        "stop": ["\n"],
        "top_k": 5,
        "min_new_tokens": 0,
        "json_schema": json.dumps({"type": "object"}),
    }
    result = backend.generate(GenRequest("prompt", params))
    kw = client.calls[0][1]
    assert kw["max_tokens"] == 7 and kw["temperature"] == 0 and kw["stop"] == ["\n"]
    # neutral values are not sent; the completions API takes response_format in the body
    assert set(kw["extra_body"]) == {"top_k", "response_format"} and "response_format" not in kw
    assert kw["extra_body"]["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert result.text == " done" and result.meta_info["prompt_tokens"] == 5
    OpenAI("m", client=client).generate(GenRequest("", params, ({"role": "user", "content": "?"},)))
    assert client.calls[-1][1]["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_chat_model_gets_the_conversation_and_refuses_a_begun_answer():
    client = FakeClient()
    backend = OpenAI("m", client=client)

    @loom.function
    def prog(s):
        s += loom.system("sys") + loom.user("hello") + loom.assistant(loom.gen("a"))
        s += loom.user("again") + loom.assistant("Sure: " + loom.gen("b"))

    with pytest.raises(BackendError, match="continue_final_message"):
        prog.run(backend=backend)
    assert client.calls[0][1]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hello"},
    ]
    continuing = OpenAI("m", client=client, continue_final_message=True)
    state = prog.run(backend=continuing)
    last = client.calls[-1][1]
    assert last["messages"][-1] == {"role": "assistant", "content": "Sure: "}
    assert last["extra_body"]["continue_final_message"] is True
    assert state["b"] == "hi there"


def test_select_scores_from_echoed_logprobs_from_the_shared_boundary():
    # "Q:" + " yes" tokenizes as ["Q", ": yes"]: the choice merges with the prompt's ":"
    echo = {
        "Q: yes": [("Q", None), (": yes", -0.2)],
        "Q: no": [("Q", None), (":", -0.1), (" no", -3.0)],
    }
    backend = OpenAI("m", client=FakeClient(echo), is_chat_model=False)

    @loom.function
    def prog(s):
        s += "Q:" + loom.select("ans", [" yes", " no"])

    state = prog.run(backend=backend)
    meta = state.get_meta_info("ans")
    assert meta["input_token_logprobs"] == [[-0.2], [-0.1, -3.0]]
    assert state["ans"] == " yes"


def test_chat_model_select_is_refused_clearly():
    @loom.function
    def prog(s):
        s += loom.user("?") + loom.assistant(loom.select("x", ["a", "b"]))

    with pytest.raises(loom.LoomError, match="cannot score choices"):
        prog.run(backend=OpenAI("m", client=FakeClient()))


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array"}},
    "required": ["name", "tags"],
}


@loom.function
def describe(s):
    s += loom.user("Describe Ada.") + loom.assistant(loom.gen("person", json_schema=PERSON))


def test_chat_json_schema_is_split_when_the_server_continues_messages():
    def reply(kw):  # the name cut at its stop; the tags held to their schema
        return "Ada" if "stop" in kw else '["math"]'

    client = FakeClient(chat_reply=reply)
    state = describe.run(backend=OpenAI("m", client=client, continue_final_message=True))
    assert json.loads(state["person"]) == {"name": "Ada", "tags": ["math"]}
    name, tags = (kw for _, kw in client.calls)
    assert name["messages"][-1] == {"role": "assistant", "content": '{"name": "'}
    assert name["stop"] == ['",'] and "response_format" not in name
    assert tags["messages"][-1] == {"role": "assistant", "content": '{"name": "Ada", "tags":'}
    assert tags["response_format"]["json_schema"]["schema"] == {"type": "array"}


def test_chat_json_schema_goes_whole_when_the_server_cannot_continue():
    client = FakeClient(chat_reply=lambda kw: '{"name": "Ada", "tags": []}')
    state = describe.run(backend=OpenAI("m", client=client))
    ((_, kw),) = client.calls
    assert kw["response_format"]["json_schema"]["schema"] == PERSON
    assert state["person"] == '{"name": "Ada", "tags": []}'
