"""The `chat-server` process as `make run` starts it: reflection for grpcurl, health, and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest
from chat.v1 import chat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server_process import ServerProcess
from client.chat_client import ChatClient

pytestmark = pytest.mark.slow

GRACE = 8.0  # seconds in-flight requests get after SIGTERM
ROOT = Path(__file__).resolve().parents[2]
GRPCURL = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")


@pytest.fixture(scope="module")
def process() -> Iterator[ServerProcess]:
    server = ServerProcess("--grace-seconds", str(GRACE))  # default model and dtype: what `make run` serves
    try:
        server.wait_serving()
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def grpcurl(*args: str, data: dict | None = None) -> str:
    command = [GRPCURL, "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    done = subprocess.run(command + list(args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_and_describes_through_reflection(process):
    listed = grpcurl(process.address, "list").split()
    assert "chat.v1.ChatService" in listed and "grpc.health.v1.Health" in listed
    described = grpcurl(process.address, "describe", "chat.v1.ChatService")
    assert "rpc StreamChat ( .chat.v1.ChatRequest ) returns ( stream .chat.v1.ChatChunk )" in described
    assert "optional float temperature" in grpcurl(process.address, "describe", "chat.v1.SamplingParams")


def test_grpcurl_chat_with_json(process):
    request = {"prompt": "What is the capital of France?", "params": {"temperature": 0, "max_new_tokens": 32}}
    reply = json.loads(grpcurl(process.address, "chat.v1.ChatService/Chat", data=request))
    assert "Paris" in reply["text"]
    assert reply["finish_reason"] == "FINISH_REASON_STOP"
    assert reply["history"][0]["user"] == request["prompt"]


def test_grpcurl_stream_chat(process):
    request = {"prompt": "Say hello.", "params": {"temperature": 0, "max_new_tokens": 8}}
    out = grpcurl(process.address, "chat.v1.ChatService/StreamChat", data=request)
    chunks = [json.loads(part) for part in re.split(r"(?<=})\n(?={)", out.strip())]
    assert len(chunks) >= 2
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def readme_block(language: str, marker: str) -> str:
    """The README's code block in `language` that contains `marker`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return next(block for block in blocks if marker in block)


def test_the_readmes_json_schema_examples_answer_valid_json(process):
    """The README's grpcurl and openai examples of a JSON-schema answer, run as written against `make run`'s
    server (its ports swapped in)."""
    block = readme_block("sh", "json_schema")
    request = json.loads(re.search(r"-d '(.*?)' \\\n", block, re.S).group(1))
    reply = json.loads(grpcurl(process.address, "chat.v1.ChatService/Chat", data=request))
    schema = json.loads(request["params"]["constraint"]["json_schema"])
    jsonschema.validate(json.loads(reply["text"]), schema)
    assert reply["finish_reason"] == "FINISH_REASON_STOP"
    code = readme_block("python", "response_format").replace("127.0.0.1:8080", f"127.0.0.1:{process.http_port}")
    scope: dict = {}
    exec(compile(code.replace("print(", "_ = ("), "README.md", "exec"), scope)  # noqa: S102 (our own README)
    jsonschema.validate(json.loads(scope["reply"].choices[0].message.content), scope["schema"])


def test_default_model_runs_packed_int4_with_float32_activations(process):
    """What `make run` serves: the GGUF file's 4-bit layers packed as they are stored, activations in float32,
    and the choice with its reason in the start-up log."""
    info = ChatClient(process.address).model_info()
    assert info.dtype == "float32" and info.name == "SmolLM2-135M-Instruct"
    assert info.weight_format == chat_pb2.WEIGHT_FORMAT_INT4
    assert "loading as float32, quantize int4: the file's own 4-bit weights, packed" in process.log


def test_sigterm_drains_then_exits(process):
    """Runs last in this module. SIGTERM with 16 streams in flight: health flips to NOT_SERVING, new calls get
    UNAVAILABLE, the 14 streams that can finish within the grace period do, the 2 that can't end with
    UNAVAILABLE and a message saying why just before it runs out, and the process exits 0 with no thread left."""
    channel = grpc.insecure_channel(process.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="chat.v1.ChatService"),
                                                      timeout=120)  # readiness
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    client = ChatClient(channel=channel, timeout=120)
    short, long = 14, 2
    streams = [client.stream_chunks(f"Tell me a story about the number {i}.", temperature=0.0, ignore_eos=True,
                                    max_new_tokens=24 if i < short else 2000) for i in range(short + long)]
    firsts = [next(stream) for stream in streams]  # every stream is under way

    def rest(stream):
        try:
            return list(stream)
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(len(streams)) as pool:
        readers = [pool.submit(rest, stream) for stream in streams]
        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            ChatClient(process.address, timeout=10).chat_response("Hello", max_new_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        results = [reader.result(timeout=GRACE + 30) for reader in readers]
    for first, result in zip(firsts[:short], results[:short], strict=True):
        assert not isinstance(result, grpc.RpcError), result
        assert result[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert first.token_count + sum(c.token_count for c in result) == 24
    for result in results[short:]:
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAVAILABLE, result
        assert "shut down before this request finished" in result.details()
    assert process.proc.wait(30) == 0
    assert time.monotonic() - signalled < GRACE + 10
    log = "".join(process.lines)
    assert "draining: 16 requests in flight" in log and "stopped" in log, log
    assert "2 requests did not finish within the grace period" in log
    assert "threads still running" not in log and "did not stop" not in log, log
    assert "Tell me a story" not in log  # prompts stay out of the logs by default
