"""ChatGLM2 checkpoints served through the real gRPC server, the path a user's `--model DIR` takes:
chatglm2-6b, chatglm2-6b-32k and chatglm2-6b-int4 (tests/data/chatglm2-*tiny).

The golden chat responses come from THUDM's original `model.chat(..., do_sample=False, max_new_tokens=16)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat.v1 import chat_pb2

from client.chat_client import ChatClient
from service.models.quant import kernels
from tests.conftest import ServerThread, make_config

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
FIXTURES = ("chatglm2-tiny", "chatglm2-32k-tiny", "chatglm2-int4-tiny")
CASES = {name: json.loads((DATA_ROOT / name / "expected.json").read_text(encoding="utf-8"))["cases"]
         for name in FIXTURES}
ALL_CASES = [pytest.param(name, case, id=f"{name}-{case['name']}") for name in FIXTURES for case in CASES[name]]


@pytest.fixture(scope="module")
def glm_client(request, tmp_path_factory) -> Iterator[ChatClient]:
    """A server on the fixture named by indirect parametrization (chatglm2-tiny by default); pytest groups the
    tests so that each fixture's server starts once. Its weight cache starts empty (the int4 fixture's repacked
    weights would be kept), its kernels are the ones built already."""
    server = ServerThread(make_config({"model": str(DATA_ROOT / getattr(request, "param", FIXTURES[0])),
                                       "cache_dir": str(tmp_path_factory.mktemp("cache")),
                                       "kernel_dir": str(kernels.default_dir())})).start()
    try:
        with ChatClient(server.address, timeout=60) as client:
            yield client
    finally:
        server.stop()


@pytest.mark.parametrize(("glm_client", "case"), ALL_CASES, indirect=["glm_client"])
def test_chat_and_stream_match_the_original(glm_client, case):
    history = [tuple(turn) for turn in case["history"]]
    response = glm_client.chat_response(case["query"], history, temperature=0.0, max_new_tokens=16)
    assert response.text == case["chat_response"]
    assert response.usage.prompt_tokens == len(case["input_ids"])
    assert response.usage.completion_tokens == len(case["greedy_ids"])
    chunks = list(glm_client.stream_chunks(case["query"], history, temperature=0.0, max_new_tokens=16))
    assert "".join(c.delta for c in chunks) == case["chat_response"]
    assert all(c.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert [(t.user, t.assistant) for t in chunks[-1].history] == history + [(case["query"], response.text)]


def test_model_info_reports_chatglm2(glm_client):
    info = glm_client.model_info()
    assert info.name.startswith("ChatGLM2")
    assert info.context_length == 256  # the checkpoint's seq_length
    assert info.default_params.max_length == 2048 and info.default_params.top_p == pytest.approx(0.7)


@pytest.mark.parametrize(("glm_client", "max_length"), [("chatglm2-32k-tiny", 256), ("chatglm2-int4-tiny", 2048)],
                         indirect=["glm_client"])
def test_model_info_of_the_siblings(glm_client, max_length):
    """32k: the original chat's max_length default (32768) cut to the context; int4: api.py's 2048."""
    info = glm_client.model_info()
    assert info.name.startswith("ChatGLM2 (chatglm2-") and info.context_length == 256
    assert info.default_params.max_length == max_length


def test_system_message_is_refused(glm_client):
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        glm_client.chat("hi", system="be brief")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("system:")


GLM_SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]},
                                               "age": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["mood", "age"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constraints_hold_with_chatglm2s_sentencepiece_tokenizer(glm_client, temperature):
    """The random tiny model under each constraint kind (its SentencePiece byte-fallback vocabulary as llguidance's
    token list): the answers match, and no id of the LM head's padding (1005..1023 of 1024) is ever chosen."""
    import re

    import jsonschema

    vocab = glm_client.model_info().vocab_size
    kinds = {"json": chat_pb2.Constraint(json_schema=json.dumps(GLM_SCHEMA)),
             "regex": chat_pb2.Constraint(regex="[a-z]{2,6}-[0-9]{2}"),
             "choice": chat_pb2.Constraint(choice=chat_pb2.Choices(values=["yes", "no", "maybe"]))}
    for kind, constraint in kinds.items():
        reply = glm_client.chat_response("你好", constraint=constraint, temperature=temperature, seed=5,
                                         max_new_tokens=80, return_token_ids=True)
        assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP, (kind, reply.text)
        assert all(t.id < 1005 for t in reply.tokens) and vocab == 1024
        if kind == "json":
            jsonschema.validate(json.loads(reply.text), GLM_SCHEMA)
        elif kind == "regex":
            assert re.fullmatch("[a-z]{2,6}-[0-9]{2}", reply.text), reply.text
        else:
            assert reply.text in ("yes", "no", "maybe")


@pytest.mark.parametrize("history", [[], [("你好", "你好！")], [("a", "b"), ("c", "d")]])
def test_count_tokens_is_chats_usage_with_chatglm2s_tokenizer(glm_client, history):
    counted = glm_client.count_tokens("今天天气怎么样", history, return_token_ids=True)
    reply = glm_client.chat_response("今天天气怎么样", history, temperature=0.0, max_new_tokens=2)
    assert counted.prompt_tokens == reply.usage.prompt_tokens == len(counted.token_ids)
    assert counted.context_length == 256
