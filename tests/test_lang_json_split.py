"""JSON-schema gens split into literal text and free parts: the splitter on its own, then the
gen on a scripted backend (with and without server-side grammars). No model; the model runs
are in test_lang_model.py. References: `json` / `jsonschema` for the assembled values, `re`
for the regex parts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import loom
from loom.backends.base import Capabilities, GenRequest
from loom.constrain.regex import check_regex
from loom.lang.errors import LoomError
from loom.lang.schema_split import Free, Literal, split_schema
from tests.lang_fakes import FakeBackend

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
    },
    "required": ["name", "age"],
}
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "alive": {"type": "boolean"},
    },
    "required": ["name", "address", "alive"],
}


def literals(segments) -> list[str]:
    return [s.text for s in segments if isinstance(s, Literal)]


def frees(segments) -> list[Free]:
    return [s for s in segments if isinstance(s, Free)]


def assemble(segments, pieces: list[str]) -> str:
    """The text a gen writes when its free parts generate `pieces`; each piece must be
    what its part allows."""
    out, it = "", iter(pieces)
    for seg in segments:
        if isinstance(seg, Literal):
            out += seg.text
            continue
        piece = next(it)
        if seg.regex is not None:
            assert re.fullmatch(check_regex(seg.regex), piece), (seg.regex, piece)
        else:
            jsonschema.validate(json.loads(piece), seg.schema)
        out += piece
    return out


# ---- the splitter ------------------------------------------------------------------------


def test_flat_object_unrolls_its_keys_and_generates_the_values():
    segments = split_schema(PERSON)
    assert literals(segments) == ['{"name":', ' "age":']
    assert [f.schema for f in frees(segments)] == [
        {"type": "string", "maxLength": 16},
        {"type": "integer"},
    ]
    text = assemble(segments, [' "Ada Lovelace",', " 36}"])
    assert text == json.dumps({"name": "Ada Lovelace", "age": 36})  # json.dumps's spelling


def test_nested_object_unrolls_recursively():
    segments = split_schema(NESTED)
    assert literals(segments) == ['{"name":', ' "address": {"city":', ' "zip":', ', "alive":']
    value = {"name": "Ada", "address": {"city": "London", "zip": "W1"}, "alive": False}
    text = assemble(segments, [' "Ada",', ' "London",', ' "W1"}', " false}"])
    assert json.loads(text) == value
    jsonschema.validate(value, NESTED)


def test_const_single_enum_and_null_are_literal_text():
    schema = {
        "type": "object",
        "properties": {
            "kind": {"const": "person"},
            "version": {"enum": [2]},
            "meta": {"const": {"a": [1, "é"]}},
            "nothing": {"type": "null"},
        },
        "required": ["kind", "version", "meta", "nothing"],
    }
    segments = split_schema(schema)
    assert segments == (
        Literal('{"kind": "person", "version": 2, "meta": {"a": [1, "é"]}, "nothing": null}'),
    )


def test_enum_and_boolean_values_are_regex_parts_with_the_character_after():
    schema = {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "dark red", "a|b"]},
            "size": {"enum": [1, 10, None]},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "size", "ok"],
    }
    segments = split_schema(schema)
    color, size, ok = (re.compile(check_regex(f.regex)) for f in frees(segments))
    assert color.fullmatch(' "a|b",') and color.fullmatch(' "dark red",')
    assert not color.fullmatch(' "blue",') and not color.fullmatch(' "red"')
    assert size.fullmatch(" 10,") and size.fullmatch(" null,") and not size.fullmatch(" 100,")
    assert ok.fullmatch(" true}") and not ok.fullmatch(" yes}")


def test_without_enforced_regexes_values_that_end_by_themselves_are_sub_schema_parts():
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "blue"]},
            "n": {"enum": [1, 10]},  # "1" could run on into "10"
            "name": {"type": "string"},
        },
        "required": ["ok", "color", "n", "name"],
    }
    segments = split_schema(schema, regex_enforced=False)
    assert literals(segments) == ['{"ok":', ', "color":', ', "n":', ' "name":']
    ok, color, n, name = frees(segments)
    assert (ok.regex, color.regex) == (None, None)
    assert (ok.schema, color.schema) == ({"type": "boolean"}, {"enum": ["red", "blue"]})
    assert n.regex is not None and name.regex is not None


def test_string_regex_counts_escapes_as_one_character():
    schema = {
        **PERSON,
        "properties": {
            **PERSON["properties"],
            "name": {"type": "string", "minLength": 2, "maxLength": 3},
        },
    }
    name = re.compile(check_regex(frees(split_schema(schema))[0].regex))
    assert name.fullmatch(' "a\\"b",') and name.fullmatch(' "\\u00e9x",')
    assert not name.fullmatch(' "a",') and not name.fullmatch(' "abcd",')
    assert not name.fullmatch(' "a"b",')  # a raw quote ends the string


def test_object_with_an_optional_property_is_one_free_part():
    optional = {**PERSON, "required": ["name"]}
    assert split_schema(optional) == (Free(optional),)
    outer = {"type": "object", "properties": {"p": optional}, "required": ["p"]}
    assert split_schema(outer) == (Literal('{"p":'), Free(optional), Literal("}"))


@pytest.mark.parametrize(
    "value_schema",
    [
        {"type": "array", "items": {"type": "integer"}},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {"anyOf": [{"type": "object"}, {"type": "null"}]},
    ],
)
def test_values_of_open_shape_are_free_sub_schema_parts(value_schema):
    schema = {"type": "object", "properties": {"v": value_schema}, "required": ["v"]}
    # a sub-schema's grammar cannot start with whitespace: the literal ends at the colon
    assert split_schema(schema) == (Literal('{"v":'), Free(value_schema), Literal("}"))


@pytest.mark.parametrize(
    "value_schema",
    [
        {"type": "integer", "minimum": 0},  # the model must end "36" itself: digits win
        {"type": "string", "pattern": "^[a-z]+$"},
        {"type": "string", "format": "email"},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"type": ["integer", "null"]},
        {},
    ],
)
def test_values_that_could_run_on_keep_their_object_free(value_schema):
    inner = {"type": "object", "properties": {"v": value_schema}, "required": ["v"]}
    assert split_schema(inner) == (Free(inner),)
    outer = {
        "type": "object",
        "properties": {"a": {"const": 1}, "in": inner},
        "required": ["a", "in"],
    }
    assert split_schema(outer) == (Literal('{"a": 1, "in":'), Free(inner), Literal("}"))


def test_refs_into_defs_are_unrolled_and_carried_with_free_parts():
    schema = {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Address"}, "tags": {"$ref": "#/$defs/Tags"}},
        "required": ["home", "tags"],
        "$defs": {
            "Address": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
            "Tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
            "Tag": {"type": "string", "maxLength": 8},
        },
    }
    segments = split_schema(schema)
    assert literals(segments) == ['{"home": {"city":', ', "tags":', "}"]
    tags = frees(segments)[1].schema
    assert tags == {**schema["$defs"]["Tags"], "$defs": schema["$defs"]}
    jsonschema.validate(["a", "b"], tags)
    text = assemble(segments, [' "Paris"}', '["a", "b"]'])
    jsonschema.validate(json.loads(text), schema)


def test_recursive_ref_stays_free():
    schema = {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "next": {"$ref": "#/$defs/Node"}},
                "required": ["name", "next"],
            }
        },
    }
    segments = split_schema(schema)
    assert literals(segments) == ['{"name":', ' "next":', "}"]
    assert frees(segments)[1].schema["$defs"] == schema["$defs"]


@pytest.mark.parametrize("ref", ["#/properties/b", "#", "other.json#/$defs/A", "#/$defs/Missing"])
def test_a_ref_outside_the_definitions_means_no_split(ref):
    schema = {
        "type": "object",
        "properties": {"a": {"$ref": ref}, "b": {"type": "string"}},
        "required": ["a", "b"],
        "$defs": {"A": {"type": "string"}},
    }
    assert split_schema(schema) == (Free(schema),)


def test_invalid_schema_is_not_split():
    schema = {"type": "object", "properties": {"a": {"type": "strnig"}}, "required": ["a"]}
    assert split_schema(schema) == (Free(schema),)


@pytest.mark.parametrize("schema", [PERSON, NESTED, {"type": "string"}])
def test_no_literal_ends_in_whitespace(schema):
    # a prompt ending in a lone space makes the model expect a number
    assert all(text == text.rstrip() for text in literals(split_schema(schema)))


# ---- the gen on a scripted backend -----------------------------------------------------


def person_parts(req: GenRequest) -> str:
    """Answers each free part of PERSON as a grammar backend would."""
    regex = req.sampling_params.get("regex", "")
    return 'Ada Lovelace",' if regex.endswith('",') else " 36}"


@loom.function
def describe(s, schema=PERSON, split=None):
    s += "Describe Ada as JSON: "
    s += loom.gen("person", json_schema=schema, split_literals=split)
    s += "\nDone."


def test_literal_parts_are_prompt_text_and_free_parts_constrained_requests():
    backend = FakeBackend(reply=person_parts)
    state = describe.run(backend=backend, max_tokens=40)
    value = state["person"]
    assert value == '{"name": "Ada Lovelace", "age": 36}'
    jsonschema.validate(json.loads(value), PERSON)
    assert state.text() == f"Describe Ada as JSON: {value}\nDone."
    first, second = backend.requests
    # the opening quote is sent as text; the space before a number is left to the model
    assert first.prompt == 'Describe Ada as JSON: {"name": "'
    assert re.fullmatch(first.sampling_params["regex"], 'Ada Lovelace",')
    assert second.prompt == 'Describe Ada as JSON: {"name": "Ada Lovelace", "age":'
    assert re.fullmatch(second.sampling_params["regex"], " 36}")
    assert "json_schema" not in first.sampling_params | second.sampling_params


def test_meta_info_combines_the_parts():
    backend = FakeBackend(reply=person_parts)
    meta = describe.run(backend=backend).get_meta_info("person")
    parts = meta["parts"]
    assert len(parts) == 2
    assert meta["prompt_tokens"] == parts[0]["prompt_tokens"]
    assert meta["cached_tokens"] == parts[0]["cached_tokens"]
    assert meta["completion_tokens"] == sum(p["completion_tokens"] for p in parts)
    assert meta["finish_reason"] == {"type": "stop"}


def test_free_parts_share_max_tokens():
    backend = FakeBackend(reply=person_parts)
    describe.run(backend=backend, max_tokens=40)
    first, second = backend.requests
    used = len(person_parts(first))  # the fake counts a character as a token
    assert first.sampling_params["max_new_tokens"] == 40
    assert second.sampling_params["max_new_tokens"] == 40 - used


class Truncating(FakeBackend):
    """Every completion is cut off by max_tokens."""

    def generate(self, req):
        result = super().generate(req)
        result.meta_info["finish_reason"] = {"type": "length"}
        return result


@pytest.mark.parametrize("grammar", [True, False])
def test_a_part_cut_off_by_max_tokens_ends_the_gen_with_length(grammar):
    caps = Capabilities(grammar=grammar, chat_api=False, scoring=False, cache=False)
    backend = Truncating(reply=lambda req: "Ada Lovelace, Countess of Lovel", capabilities=caps)
    state = describe.run(backend=backend)
    assert state["person"] == '{"name": "Ada Lovelace, Countess of Lovel'
    assert state.text().endswith("Lovel\nDone.")  # no literal after the cut
    reason = state.get_meta_info("person")["finish_reason"]
    assert reason["type"] == "length"
    assert "part 1 of 2" in reason["message"] and "max_tokens" in reason["message"]


def test_a_whole_schema_goes_in_one_request_when_nothing_is_fixed():
    optional = {**PERSON, "required": ["name"]}
    backend = FakeBackend(reply=lambda req: '{"name": "Ada"}')
    state = describe.run(schema=optional, backend=backend)
    (req,) = backend.requests
    assert req.sampling_params["json_schema"] == json.dumps(optional)
    assert req.prompt == "Describe Ada as JSON: "
    assert state["person"] == '{"name": "Ada"}'
    assert "parts" not in state.get_meta_info("person")


def test_split_literals_false_sends_the_schema_whole():
    backend = FakeBackend(reply=lambda req: '{"name": "Ada", "age": 36}')
    describe.run(split=False, backend=backend)  # the gen's own argument
    describe.run(backend=backend, split_literals=False)  # a run default
    assert [json.loads(r.sampling_params["json_schema"]) for r in backend.requests] == [PERSON] * 2


def test_an_assembled_value_that_breaks_the_schema_is_an_error():
    def too_long(req: GenRequest) -> str:  # a grammar backend that does not enforce maxLength
        return person_parts(req).replace("Ada Lovelace", "Ada Lovelace, Countess of Lovelace")

    with pytest.raises(LoomError, match="is not valid: .* is too long"):
        describe.run(backend=FakeBackend(reply=too_long))


def test_stream_pieces_of_a_split_gen_make_its_value():
    state = describe.run(backend=FakeBackend(reply=person_parts), stream=True)
    assert "".join(state.text_iter("person")) == state["person"]
    assert state["person"] == '{"name": "Ada Lovelace", "age": 36}'


def test_the_request_graph_shows_one_gen_node():
    graph = describe.trace()
    assert graph.kinds() == ["text", "gen", "text"]


# ---- backends without server-side grammars (OpenAI APIs) ------------------------------


NO_GRAMMAR = Capabilities(grammar=False, chat_api=False, scoring=False, cache=False)


def test_without_server_grammar_regex_parts_use_the_literal_split_and_schemas_the_server():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array"},
            "age": {"type": "integer"},
        },
        "required": ["name", "tags", "age"],
    }

    def reply(req: GenRequest) -> str:  # the model writes on; the server cuts at a stop
        if "json_schema" in req.sampling_params:
            return '["a", "b"], "age": 36}'  # a server that ignores response_format
        text = 'Ada", "tags": ["a"]' if req.prompt.endswith('"') else "36}\n"
        return text.split(req.sampling_params["stop"][0])[0]

    backend = FakeBackend(reply=reply, capabilities=NO_GRAMMAR)
    state = describe.run(schema=schema, backend=backend)
    assert json.loads(state["person"]) == {"name": "Ada", "tags": ["a", "b"], "age": 36}
    name, tags, age = backend.requests
    assert name.prompt.endswith('{"name": "') and name.sampling_params["stop"] == ['",']
    assert "regex" not in name.sampling_params
    assert json.loads(tags.sampling_params["json_schema"]) == {"type": "array"}
    assert age.prompt.endswith('"tags":["a", "b"], "age": ')
    assert age.sampling_params["stop"] == ["}"]


def test_without_server_grammar_an_output_that_does_not_fit_fails_clearly():
    backend = FakeBackend(reply=lambda req: "Ada Lovelace, who wrote", capabilities=NO_GRAMMAR)
    with pytest.raises(LoomError, match="cannot enforce regexes"):
        describe.run(backend=backend)


def test_a_chat_backend_that_cannot_continue_a_message_gets_the_schema_whole():
    caps = Capabilities(
        grammar=False, chat_api=True, scoring=False, cache=False, continue_text=False
    )
    backend = FakeBackend(reply=lambda req: '{"name": "Ada", "age": 36}', capabilities=caps)

    @loom.function
    def chat(s):
        s += loom.user("Describe Ada.") + loom.assistant(loom.gen("person", json_schema=PERSON))

    state = chat.run(backend=backend)
    (req,) = backend.requests
    assert json.loads(req.sampling_params["json_schema"]) == PERSON
    assert state["person"] == '{"name": "Ada", "age": 36}'
