"""ChatClient and the chat-client CLI against the session server."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from client.chat_client import AsyncChatClient, build_request


def test_stream_chat_yields_text_pieces(client):
    pieces = list(client.stream_chat("What is the capital of France?", temperature=0.0, max_new_tokens=16))
    assert len(pieces) > 1
    assert "Paris" in "".join(pieces)


async def test_async_client_matches_sync(client, server):
    sync_answer, _ = client.chat("Name a planet.", temperature=0.0, max_new_tokens=12)
    async with AsyncChatClient(server.address) as aclient:
        async_answer, history = await aclient.chat("Name a planet.", temperature=0.0, max_new_tokens=12)
        streamed = "".join([p async for p in aclient.stream_chat("Name a planet.", temperature=0.0,
                                                                 max_new_tokens=12)])
    assert async_answer == sync_answer == streamed
    assert history == [("Name a planet.", async_answer)]


def test_client_deadline(client):
    with pytest.raises(grpc.RpcError) as err:
        client.chat("Write a long essay.", temperature=0.0, max_new_tokens=500, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unknown_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="tempreature"):
        build_request("hi", tempreature=0.5)


def test_priority_is_a_request_field():
    assert build_request("hi", priority=-4, temperature=0.0).priority == -4
    assert build_request("hi").priority == 0


def test_cli_streams_an_answer(server):
    done = subprocess.run([sys.executable, "-m", "client.cli", "--target", server.address, "--temperature", "0",
                           "--max-new-tokens", "16", "What is the capital of France?"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_cli_holds_a_conversation(server):
    script = "My name is Ada. Please remember it.\nWhat is my name?\n/quit\n"
    done = subprocess.run([sys.executable, "-m", "client.cli", "--target", server.address, "-i",
                           "--temperature", "0", "--max-new-tokens", "24"],
                          input=script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.split("assistant> ")
    assert len(answers) == 3 and "Ada" in answers[2]


def test_cli_reports_errors(server):
    done = subprocess.run([sys.executable, "-m", "client.cli", "--target", server.address, "--temperature",
                           "-1", "hi"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "params.temperature" in done.stderr
