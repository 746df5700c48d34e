"""The grammar of tool calls (xgrammar structural tags printed as EBNF, compiled by loom's
xgrammar backend) and the checks of tools / tool_choice: forced calls always parse and
their arguments validate (jsonschema as the reference), auto allows text and constrains a
call once it starts, and bad tools are refused with the field and the keyword named."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from loom.constrain.tools.formats import HERMES, LLAMA3_JSON, MISTRAL
from loom.constrain.tools.grammar import check_parameters, tool_call_ebnf
from loom.constrain.tools.parser import parse_tool_calls
from loom.constrain.tools.spec import ToolError, parse_tool_choice, parse_tools
from tests.test_grammar_backend import _greedy

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = parse_tools(
    [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
        {"type": "function", "function": {"name": "add", "parameters": ADD}},
    ]
)
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
NAMES = frozenset(SCHEMAS)
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


def _matcher(backend, fmt, choice, parallel=True):
    ebnf = tool_call_ebnf(fmt, TOOLS, parse_tool_choice(choice, TOOLS, parallel))
    return backend.get_matcher("ebnf", ebnf).result(timeout=60)


def _accepts(backend, fmt, choice, text, parallel=True) -> bool:
    """The grammar takes `text` and may end there (the stop token is allowed)."""
    matcher = _matcher(backend, fmt, choice, parallel)
    return matcher.accept_string(text) and matcher.accept_token(backend.eos)


@pytest.fixture(scope="module")
def backend(xgrammar_backend, grammar_tokenizer):
    xgrammar_backend.eos = grammar_tokenizer.eos_token_id
    return xgrammar_backend


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL])
@pytest.mark.parametrize("choice", ["required", NAMED_ADD])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_forced_calls_parse_and_validate(backend, grammar_tokenizer, fmt, choice, seed):
    matcher = _matcher(backend, fmt, choice)
    text = _greedy(backend, matcher, grammar_tokenizer, seed, max_steps=400)
    parsed = parse_tool_calls(text, fmt, NAMES)
    assert parsed.errors == () and parsed.content is None and parsed.tool_calls, text
    for call in parsed.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    if choice == NAMED_ADD:
        assert [c.name for c in parsed.tool_calls] == ["add"]


def test_named_call_allows_no_text_and_no_other_tool(backend):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert _accepts(backend, HERMES, NAMED_ADD, call)
    assert not _accepts(backend, HERMES, NAMED_ADD, "Sure. " + call)
    other = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert not _accepts(backend, HERMES, NAMED_ADD, other)


def test_parallel_tool_calls_false_allows_one_call(backend):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert _accepts(backend, HERMES, "required", call + "\n" + call, parallel=True)
    assert not _accepts(backend, HERMES, "required", call + "\n" + call, parallel=False)
    assert _accepts(backend, HERMES, "required", call, parallel=False)


def test_auto_allows_text_and_constrains_the_call_once_it_starts(backend):
    good = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert _accepts(backend, HERMES, "auto", "Just text, no call.")
    assert _accepts(backend, HERMES, "auto", good)
    matcher = _matcher(backend, HERMES, "auto")
    assert not matcher.accept_string('<tool_call>\n{"name": "add", "arguments": {"a": "one"')
    bare = _matcher(backend, HERMES, "auto")  # small Qwen models' untagged call
    assert not bare.accept_string('{"name": "add", "arguments": {"a": 1, "b": 2, "c"')


def test_tool_choice_naming_an_unknown_tool_is_refused():
    with pytest.raises(ToolError, match=r"'mul'.*\['add', 'get_weather'\]") as e:
        parse_tool_choice({"type": "function", "function": {"name": "mul"}}, TOOLS)
    assert e.value.param == "tool_choice"


@pytest.mark.parametrize(
    "tools, message, param",
    [
        ({"type": "function"}, "must be a list", "tools"),
        ([{"type": "code_interpreter"}], "only function tools", "tools[0]"),
        ([{"type": "function", "function": {"name": "a b"}}], "letters, digits", "name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "schema of an object",
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f"}}] * 2,
            "more than once",
            "tools",
        ),
    ],
)
def test_bad_tools_are_refused_naming_the_field(tools, message, param):
    with pytest.raises(ToolError, match=message) as e:
        parse_tools(tools)
    assert param in e.value.param


def test_parameters_loom_cannot_compile_name_the_tool_and_the_keyword():
    open_keys = {"type": "object", "patternProperties": {"^x": {"type": "integer"}}}
    tools = parse_tools(
        [
            {"type": "function", "function": {"name": "ok", "parameters": ADD}},
            {"type": "function", "function": {"name": "bad", "parameters": open_keys}},
        ]
    )
    with pytest.raises(ToolError, match=r"tools\[1\] \('bad'\).*'patternProperties'") as e:
        check_parameters(tools)
    assert e.value.param == "tools[1].function.parameters"


def test_required_without_tools_is_refused():
    with pytest.raises(ToolError, match="needs tools"):
        parse_tool_choice("required", ())


def test_mistral_trigger_may_be_its_special_token():
    """Mistral's [TOOL_CALLS] is one special token: the grammar must let the model write it
    (the server then keeps special tokens in the text the parser reads)."""
    from loom.constrain.xgrammar_backend import XGrammarBackend
    from tests.grammar_helpers import make_tokenizer

    tokenizer = copy.deepcopy(make_tokenizer())  # the shared one stays as it is
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    trigger = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    backend = XGrammarBackend(tokenizer, len(tokenizer), num_threads=1)
    try:
        for choice in ("required", "auto"):
            ebnf = tool_call_ebnf(MISTRAL, TOOLS, parse_tool_choice(choice, TOOLS))
            assert backend.get_matcher("ebnf", ebnf).result(timeout=60).accept_token(trigger)
    finally:
        backend.shutdown()
