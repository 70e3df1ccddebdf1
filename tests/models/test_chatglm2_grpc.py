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
