"""params.constraint on the real default model through gRPC: JSON schemas (validated with the jsonschema package),
JSON objects, regexes (full match), choices and Lark grammars, streaming and not, greedy and sampled; the answer
ends with STOP when the constraint allows only the end. Bad constraints are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import ast
import json
import re
import urllib.request

import grpc
import jsonschema
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc

SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "array with bounds": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 2, "maxItems": 4}},
        "required": ["colors"], "additionalProperties": False,
    },
    "enum and integer range": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "angry"]},
                       "age": {"type": "integer", "minimum": 18, "maximum": 99}},
        "required": ["mood", "age"], "additionalProperties": False,
    },
    "number range and optional field": {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                       "note": {"type": "string", "maxLength": 10}},
        "required": ["price"], "additionalProperties": False,
    },
    "string pattern and boolean": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "valid": {"type": "boolean"}},
        "required": ["code", "valid"], "additionalProperties": False,
    },
}

GRAMMAR = """start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: "+" | "-"
NUMBER: /[0-9]{1,3}/
"""


@pytest.fixture(scope="module")
def stub(channel):
    return chat_pb2_grpc.ChatServiceStub(channel)


def ask(stub, prompt: str, constraint: chat_pb2.Constraint, *, stream: bool = False, max_new_tokens: int = 120,
        **params) -> tuple[str, int]:
    """(text, finish reason) of a constrained request."""
    request = chat_pb2.ChatRequest(prompt=prompt, params=chat_pb2.SamplingParams(
        constraint=constraint, max_new_tokens=max_new_tokens, **params))
    if stream:
        chunks = list(stub.StreamChat(request, timeout=120))
        return "".join(c.delta for c in chunks), chunks[-1].finish_reason
    reply = stub.Chat(request, timeout=120)
    return reply.text, reply.finish_reason


SAMPLINGS = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.9, "top_p": 0.95, "seed": 7}}


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(stub, name, sampling, stream):
    schema = SCHEMAS[name]
    text, finish = ask(stub, f"Give me an example as JSON ({name}).",
                       chat_pb2.Constraint(json_schema=json.dumps(schema)), stream=stream, **SAMPLINGS[sampling])
    assert finish == chat_pb2.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_is_an_object(stub):
    text, finish = ask(stub, "Give a JSON object with a person's name and age.", chat_pb2.Constraint(json_object=True),
                       max_new_tokens=200, temperature=0.0, repetition_penalty=1.3)
    assert finish == chat_pb2.FINISH_REASON_STOP, text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_regex_answers_full_match(stub, sampling):
    pattern = r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"
    text, finish = ask(stub, "Write an email address.", chat_pb2.Constraint(regex=pattern), **SAMPLINGS[sampling])
    assert finish == chat_pb2.FINISH_REASON_STOP
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_choice_is_one_of_the_choices(stub, sampling, stream):
    choices = ["Paris", "London", "Berlin", "New York"]
    text, finish = ask(stub, "What is the capital of France?",
                       chat_pb2.Constraint(choice=chat_pb2.Choices(values=choices)), stream=stream,
                       **SAMPLINGS[sampling])
    assert finish == chat_pb2.FINISH_REASON_STOP
    assert text in choices


def is_sentence(text: str) -> bool:
    """Whether `text` is a sentence of GRAMMAR: integers of 1 to 3 digits joined by + and -, in parentheses."""
    if not re.fullmatch(r"[0-9+\-()]+", text) or re.search(r"[0-9]{4}|\)\(|[0-9]\(|\)[0-9]|[+-]{2}", text):
        return False
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return False
    allowed = (ast.BinOp, ast.Add, ast.Sub, ast.Constant)
    return all(isinstance(node, allowed) or isinstance(node, ast.operator) for node in ast.walk(tree))


def test_grammar_check_itself():
    assert is_sentence("1+(22-333)") and is_sentence("7")
    assert not is_sentence("1++2") and not is_sentence("-1") and not is_sentence("1234") and not is_sentence("(1)(2)")


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_grammar_answers_parse(stub, sampling):
    text, finish = ask(stub, "Write a sum of small numbers.", chat_pb2.Constraint(grammar=GRAMMAR), max_new_tokens=40,
                       **SAMPLINGS[sampling])
    if finish == chat_pb2.FINISH_REASON_LENGTH:  # a sum may go on; the prefix it wrote still parses as one
        text = text.rstrip("+-(")
    assert is_sentence(text), text


def test_n_answers_each_follow_the_constraint(stub):
    schema = SCHEMAS["enum and integer range"]
    request = chat_pb2.ChatRequest(prompt="A person as JSON.", params=chat_pb2.SamplingParams(
        constraint=chat_pb2.Constraint(json_schema=json.dumps(schema)), n=3, temperature=1.0, seed=3,
        max_new_tokens=60))
    reply = stub.Chat(request, timeout=120)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == chat_pb2.FINISH_REASON_STOP
        jsonschema.validate(json.loads(choice.text), schema)


BAD = {
    "not JSON": ({"json_schema": "{not json"}, "params.constraint.json_schema"),
    "not an object": ({"json_schema": "[1, 2]"}, "params.constraint.json_schema"),
    "not a schema": ({"json_schema": '{"type": "frob"}'}, "params.constraint.json_schema"),
    "unenforceable keyword": ({"json_schema": '{"type": "object", "dependentSchemas": {"a": {}}}'},
                              "params.constraint.json_schema"),
    "deeply nested schema": ({"json_schema": '{"items": ' * 5000 + "{}" + "}" * 5000},
                             "params.constraint.json_schema"),
    "oversized schema": ({"json_schema": json.dumps({"enum": ["x" * 100] * 700})}, "params.constraint.json_schema"),
    "invalid regex": ({"regex": "(unclosed"}, "params.constraint.regex"),
    "empty regex": ({"regex": ""}, "params.constraint.regex"),
    "empty choice list": ({"choice": chat_pb2.Choices()}, "params.constraint.choice"),
    "empty choice": ({"choice": chat_pb2.Choices(values=["a", ""])}, "params.constraint.choice[1]"),
    "grammar that does not parse": ({"grammar": "start: ((("}, "params.constraint.grammar"),
    "grammar with an unknown rule": ({"grammar": "start: missing"}, "params.constraint.grammar"),
    "empty grammar": ({"grammar": "  "}, "params.constraint.grammar"),
    "oversized grammar": ({"grammar": 'start: "' + "a" * 70000 + '"'}, "params.constraint.grammar"),
}


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_constraints_are_invalid_argument_naming_the_field(stub, rpc, name):
    kind, field = BAD[name]
    request = chat_pb2.ChatRequest(prompt="Hello", params=chat_pb2.SamplingParams(
        constraint=chat_pb2.Constraint(**kind), max_new_tokens=5))
    with pytest.raises(grpc.RpcError) as caught:
        reply = getattr(stub, rpc)(request, timeout=30)
        list(reply) if rpc == "StreamChat" else reply
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()


@pytest.mark.parametrize("params, field", [
    ({"stop": ["x"]}, "params.stop"), ({"ignore_eos": True}, "params.ignore_eos"),
    ({"min_new_tokens": 3}, "params.min_new_tokens")])
def test_a_constraint_refuses_the_fields_that_would_fight_it(stub, params, field):
    request = chat_pb2.ChatRequest(prompt="Hello", params=chat_pb2.SamplingParams(
        constraint=chat_pb2.Constraint(regex="[a-z]+"), max_new_tokens=5, **params))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Chat(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")


def test_a_regex_built_to_blow_up_is_followed_lazily(stub):
    """A regex whose DFA would have 2**40 states: llguidance builds only the states it visits, so it is answered
    (and the server serves on)."""
    pattern = "(a|b)*a(a|b){40}"
    request = chat_pb2.ChatRequest(prompt="Write a's and b's.", params=chat_pb2.SamplingParams(
        constraint=chat_pb2.Constraint(regex=pattern), max_new_tokens=50, temperature=0.0))
    reply = stub.Chat(request, timeout=60)
    assert re.fullmatch("[ab]*", reply.text), reply.text
    assert reply.finish_reason == chat_pb2.FINISH_REASON_LENGTH or re.fullmatch(pattern, reply.text)
    assert stub.Chat(chat_pb2.ChatRequest(prompt="Hi", params=chat_pb2.SamplingParams(max_new_tokens=3)),
                     timeout=60).text


def test_masked_rows_are_counted_and_exported(stub, server):
    before = server.engine.stats.masked_rows
    text, _ = ask(stub, "Yes or no?", chat_pb2.Constraint(choice=chat_pb2.Choices(values=["yes", "no"])))
    assert server.engine.stats.masked_rows >= before + 1 and server.engine.stats.mask_seconds > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.runtime.http.port}/metrics", timeout=10) as reply:
        exported = reply.read().decode()
    assert re.search(r"^chat_constraint_masked_rows_total\{[^}]*\} [1-9]", exported, re.M)
    assert re.search(r"^chat_constraint_mask_seconds_total\{[^}]*\} \d", exported, re.M)


def test_model_info_lists_the_constraint_kinds(stub):
    info = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=10)
    assert set(info.constraint_kinds) == {chat_pb2.CONSTRAINT_KIND_JSON_SCHEMA, chat_pb2.CONSTRAINT_KIND_JSON_OBJECT,
                                          chat_pb2.CONSTRAINT_KIND_REGEX, chat_pb2.CONSTRAINT_KIND_CHOICE,
                                          chat_pb2.CONSTRAINT_KIND_GRAMMAR}
