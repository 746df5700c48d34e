"""Roles rendered with the model's chat template; role misuse errors. The reference for the
rendering is the tokenizer's own `apply_chat_template`."""

from __future__ import annotations

import jinja2
import pytest

import loom
from loom.backends.base import ChatTemplate
from loom.backends.hf_tokenizer import chat_template_of
from loom.lang.chat_template import PLAIN, derive, role_template
from loom.lang.errors import LoomError, RoleError
from tests.lang_fakes import FakeBackend

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Like Qwen3: the final assistant turn is written with an empty think block, earlier ones not.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Mistral: no system role, [INST] markers, no generation prompt.
INST = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)
BROKEN = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops the contents


def jinja_template(source: str, bos: str = "", implicit: str = "") -> ChatTemplate:
    env = jinja2.Environment()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    template = env.from_string(source)

    def render(messages, add_generation_prompt):
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            raise_exception=raise_exception,
        )

    return ChatTemplate(render, implicit_prefix=implicit, name="test")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@loom.function
def chat(s):
    s += loom.system("Be brief.")
    s += loom.user("Hi!")
    s += loom.assistant(loom.gen("a"))
    s += loom.user("Again?")
    with s.assistant():
        s += loom.gen("b")


def test_program_text_equals_the_tokenizers_chat_template(tokenizer):
    backend = FakeBackend(lambda req: "Hello.", template=chat_template_of(tokenizer))
    state = chat.run(backend=backend)
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert state.text() == tokenizer.apply_chat_template(messages, tokenize=False)
    # each gen's prompt is the template's generation prompt for the conversation so far
    assert backend.requests[1].prompt == tokenizer.apply_chat_template(
        messages[:4], tokenize=False, add_generation_prompt=True
    )


def test_conversation_without_system_gets_the_templates_default(tokenizer):
    @loom.function
    def prog(s):
        s += loom.user("Hi!") + loom.assistant(loom.gen("a"))

    backend = FakeBackend(lambda req: "Yo.", template=chat_template_of(tokenizer))
    state = prog.run(backend=backend)
    assert state.text() == tokenizer.apply_chat_template(state.messages(), tokenize=False)


def test_implicit_bos_is_not_written_twice():
    roles = derive(jinja_template(LLAMA3, bos="<|begin_of_text|>", implicit="<|begin_of_text|>"))
    assert roles.prefix("system", first=True) == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert roles.suffix("user") == "<|eot_id|>"
    assert roles.prefix("assistant", first=False).endswith("assistant<|end_header_id|>\n\n")


def test_assistant_prefix_comes_from_the_generation_prompt():
    roles = derive(jinja_template(THINKING))
    assert roles.prefix("assistant", first=False) == "<|im_start|>assistant\n"
    assert roles.suffix("assistant") == "<|im_end|>\n"


def test_template_without_system_role_keeps_its_user_and_assistant_roles():
    roles = derive(jinja_template(INST, bos="<s>", implicit="<s>"))
    assert roles.prefix("user", first=True) == roles.prefix("user", first=False) == "[INST] "
    assert roles.suffix("user") == " [/INST]"
    assert roles.prefix("assistant", first=False) == "" and roles.suffix("assistant") == "</s>"
    assert roles.prefix("system", first=True) == PLAIN.prefix("system", first=True)


def test_template_that_drops_contents_falls_back_to_plain(caplog):
    assert role_template(jinja_template(BROKEN)) is PLAIN
    assert "using 'plain'" in caplog.text


def test_model_without_template_uses_plain():
    state = chat.run(backend=FakeBackend(lambda req: "ok"))
    assert state.text().startswith("System: Be brief.\n\nUser: Hi!\nAssistant: ok\n")


def test_named_template_overrides_the_models(tokenizer):
    backend = FakeBackend(lambda req: "ok", template=chat_template_of(tokenizer))
    state = chat.run(backend=backend, chat_template="llama-3")
    assert state.text().startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    with pytest.raises(LoomError, match="unknown chat template"):
        chat.run(backend=backend, chat_template="nope")


def test_nested_roles_raise_at_the_programs_line_before_running():
    backend = FakeBackend()

    @loom.function
    def prog(s):
        s += loom.user_begin()
        s += loom.assistant("nested")

    with pytest.raises(RoleError, match="cannot open role 'assistant' inside role 'user'"):
        prog.run(backend=backend)
    assert backend.requests == []


def test_nested_role_inside_a_role_expression():
    @loom.function
    def prog(s):
        s += loom.user(loom.system("x"))

    with pytest.raises(RoleError, match="roles do not nest"):
        prog.run(backend=FakeBackend())


def test_closing_a_role_that_is_not_open():
    @loom.function
    def prog(s):
        s += loom.user_end()

    with pytest.raises(RoleError, match="cannot close role 'user': no role is open"):
        prog.run(backend=FakeBackend())


def test_unknown_role_name():
    from loom.lang.api import role

    with pytest.raises(LoomError, match="unknown role"):
        role("narrator", "x")
