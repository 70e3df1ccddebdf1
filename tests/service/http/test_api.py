"""POST / (the original api.py contract) and GET /health on the server's HTTP listener: the seed's own call,
the 400/401/408/413/429/503 mapping, hostile bodies (never a 500, the server keeps serving), the token (its
scheme in any case, on gRPC too) and the same greedy text as gRPC."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
import time

import aiohttp
import grpc
import pytest

from client.chat_client import AsyncChatClient, ChatClient
from service.config import SamplingDefaults
from service.grpc.server import NOT_SERVING, create_server
from tests.conftest import ServerThread, make_config
from tests.support import busy, until

pytestmark = pytest.mark.slow

SHORT = SamplingDefaults(max_new_tokens=48)  # the api.py defaults otherwise; short answers keep the tests quick
TOKEN = "s3cret-token"


def url(server, path: str = "") -> str:
    return f"http://127.0.0.1:{server.runtime.http.port}{path or '/'}"


async def post(server, body, path: str = "", headers: dict | None = None, timeout: float = 120):
    """(status, JSON body, headers) of one POST; `body` is sent as is when bytes, else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            url(server, path), data=data, headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        return response.status, await response.json(content_type=None), response.headers


@pytest.fixture(scope="module")
def api(start_server):
    return start_server({"defaults": SHORT, "http_body_timeout_seconds": 1.0}, max_batch_size=2,
                        max_queued_requests=2)


async def settled(server) -> None:
    frontend, stats = server.runtime.frontend, server.engine.stats
    assert await until(lambda: not frontend.active and frontend.admission.active == 0 and stats.running == 0
                       and stats.waiting == 0, timeout=15), stats


async def test_the_seeds_curl_call_works_verbatim(api):
    """curl -sX POST "http://127.0.0.1:8000" -H 'Content-Type: application/json' \
           -d '{"prompt": "你好", "history": []}'"""
    before = datetime.datetime.now().replace(microsecond=0)
    status, body, headers = await post(api, '{"prompt": "你好", "history": []}'.encode())
    after = datetime.datetime.now()
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert set(body) == {"response", "history", "status", "time"} and body["status"] == 200
    assert body["response"].strip() and body["history"] == [["你好", body["response"]]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert before <= datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S") <= after

    status, second, _ = await post(api, {"prompt": "And in English?", "history": body["history"]})
    assert status == 200 and len(second["history"]) == 2 and second["history"][0] == body["history"][0]
    assert second["history"][1] == ["And in English?", second["response"]]


async def test_null_fields_take_the_server_defaults(api):
    status, body, _ = await post(api, {"prompt": "Say hi.", "history": None, "max_length": None, "top_p": None,
                                       "temperature": None})
    assert status == 200 and body["response"]


async def test_a_greedy_answer_is_the_same_over_http_and_grpc(api):
    prompt = "What is the capital of France?"
    status, body, _ = await post(api, {"prompt": prompt, "temperature": 0})
    async with AsyncChatClient(api.address) as grpc_client:
        text, history = await grpc_client.chat(prompt, temperature=0.0)
    assert status == 200 and body["response"] == text and "Paris" in text
    assert body["history"] == [list(turn) for turn in history]


BAD_BODIES = [
    (b"{bad", "body: not valid JSON"),
    (b"[1, 2]", "body: must be a JSON object, got array"),
    (b'"hello"', "body: must be a JSON object, got string"),
    (b'{"prompt": NaN}', "body: not valid JSON"),
    (b"\xff\xfe\x00", "body: not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "body: JSON nested too deeply"),
    ({"history": []}, "prompt: required"),
    ({"prompt": 5}, "prompt: must be a string, got integer"),
    ({"prompt": "   "}, "prompt: must not be empty"),
    ({"prompt": "hi", "top_p": "0.5"}, "top_p: must be a number, got string"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p: must be in (0, 1], got 1.5"),
    ({"prompt": "hi", "history": {}}, "history: must be a list of [query, answer] pairs, got object"),
    ({"prompt": "hi", "history": [["only a question"]]}, "history[0]: must be a [query, answer] pair"),
    ({"prompt": "hi", "history": [["q", 1]]}, "history[0]: must be a [query, answer] pair"),
    ({"prompt": "hi", "history": [["q", " "]]}, "history[0].assistant: must not be empty"),
    ({"prompt": "hi", "max_length": True}, "max_length: must be an integer, got boolean"),
    ({"prompt": "hi", "max_length": 2.5}, "max_length: must be an integer, got number"),
    ({"prompt": "hi", "max_length": 1}, "max_length: must be in [2, "),
    ({"prompt": "hi", "max_length": 10**30}, "max_length: must be in [2, "),
    ({"prompt": "hi", "temperature": -1}, "temperature: must be 0 (greedy) or in [0.01, 100.0], got -1.0"),
    ({"prompt": "hi", "temperature": [0.5]}, "temperature: must be a number, got array"),
    (b'{"prompt": "hi", "top_p": 1' + b"0" * 400 + b"}", "top_p: must be a number in range, got one too large"),
    ({"prompt": "hi", "temperature": -(10**400)},
     "temperature: must be a number in range, got one too large (-1e+400)"),
    ({"prompt": "hi \udc80"}, "prompt: not valid Unicode (a lone surrogate at character 3)"),
    ({"prompt": "hi", "history": [["\ud83d", "x"]]}, "history[0].user: not valid Unicode"),
    ({"prompt": "hi", "max_length": 10**400}, "max_length: must be in [2, "),
]


@pytest.mark.parametrize("body, error", BAD_BODIES, ids=[e.split(":")[0] + str(i) for i, (_, e) in
                                                         enumerate(BAD_BODIES)])
async def test_bad_input_is_a_400_naming_the_field(api, body, error):
    status, answer, _ = await post(api, body)
    assert status == 400 and answer["status"] == 400 and answer["error"].startswith(error), answer


async def test_http_errors_carry_the_grpc_validation_messages(api):
    _, answer, _ = await post(api, {"prompt": "hi", "max_length": 1})
    with pytest.raises(grpc.RpcError) as refused:
        ChatClient(api.address, retry=None).chat("hi", max_length=1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params." + answer["error"] == refused.value.details()


async def test_a_full_queue_is_429_for_http_and_grpc_alike(api):
    async with AsyncChatClient(api.address, timeout=60, retry=None) as grpc_client:
        async with busy(grpc_client, api.engine, 2):
            status, answer, headers = await post(api, {"prompt": "Hello"})
            assert status == 429 and answer == {"status": 429, "error": "server is at its limit of 2 requests; "
                                                                       "retry later"}
            assert headers["Retry-After"] == "1"
    await settled(api)
    # An HTTP request in flight counts against the same limit as a gRPC one.
    http = [asyncio.create_task(post(api, {"prompt": f"Count from 1 to {500 + i}, one number a line.",
                                           "max_length": 2048, "temperature": 0})) for i in range(2)]
    assert await until(lambda: api.runtime.frontend.admission.active == 2)
    async with AsyncChatClient(api.address, timeout=60, retry=None) as grpc_client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await grpc_client.chat("Hello")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [(await task)[0] for task in http] == [200, 200]


def total(metrics_text: str, sample: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text) for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_http_requests_count_in_the_same_metrics_as_grpc(api):
    _, before = await get_status(api, "/metrics")
    assert (await post(api, {"prompt": "Say hi.", "max_length": 64}))[0] == 200
    assert (await post(api, {"prompt": "Say hi.", "top_p": 2}))[0] == 400
    _, after = await get_status(api, "/metrics")
    assert total(after, "chat_request_success_total") == total(before, "chat_request_success_total") + 1
    invalid = {"code": "INVALID_ARGUMENT"}
    assert total(after, "chat_request_failure_total", **invalid) == \
        total(before, "chat_request_failure_total", **invalid) + 1


async def test_a_caller_who_hangs_up_frees_the_row(api):
    stats = api.engine.stats
    dropped = stats.dropped_running
    call = asyncio.create_task(post(api, {"prompt": "Count from 1 to 1000, one number a line.", "temperature": 0}))
    assert await until(lambda: stats.running == 1)
    call.cancel()  # the connection closes mid-answer
    assert await until(lambda: stats.dropped_running == dropped + 1, timeout=5)
    await settled(api)


async def test_draining_is_503(api):
    api.runtime.frontend.admission.drain()
    try:
        status, answer, headers = await post(api, {"prompt": "Hello"})
    finally:
        api.runtime.frontend.admission.reopen()
    assert status == 503 and answer["error"] == "the server is shutting down; retry elsewhere"
    assert headers["Retry-After"] == "1"


def test_loading_is_503_and_health_follows_readiness(server):
    loading = ServerThread(make_config())
    loading._thread.start()

    async def boot():
        grpc_server, port = create_server(loading.config, loading.runtime)
        await loading.runtime.set_health(NOT_SERVING)
        await grpc_server.start()
        await loading.runtime.start_http()
        return grpc_server, port

    loading.server, loading.port = loading.call(boot())
    try:
        assert loading.call(get_status(loading, "/health")) == (503, {"status": "NOT_SERVING"})
        status, answer, _ = loading.call(post(loading, {"prompt": "Hello"}))
        assert status == 503 and answer == {"status": 503, "error": "the model is still loading; retry shortly"}
        loading.call(loading.runtime.load(server.engine.loaded))
        assert loading.call(get_status(loading, "/health")) == (200, {"status": "SERVING"})
    finally:
        loading.stop()


async def get_status(server, path: str, headers: dict | None = None):
    async with aiohttp.ClientSession() as session, session.get(url(server, path), headers=headers) as response:
        body = await response.text()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body


async def test_an_oversize_body_is_413(api):
    limit = api.config.limits.max_message_bytes
    body = b'{"prompt": "' + b"a" * (limit + 1) + b'"}'
    status, answer, _ = await post(api, body)
    assert status == 413 and answer == {"status": 413, "error": f"body: larger than the limit of {limit} bytes"}


def raw_http(port: int, head: bytes, body: bytes, *, wait: float = 5.0) -> tuple[bytes, float | None]:
    """Send a request's head and (part of) its body by hand; the JSON response that comes back within `wait`
    seconds, and after how many seconds it was complete."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if received.endswith(b"}"):
                    return received, time.monotonic() - started
        except TimeoutError:
            pass
        return received, None


async def test_a_slow_or_half_sent_body_times_out(api):
    port = api.runtime.http.port
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            b"Connection: close\r\n\r\n")
    answer, took = await asyncio.to_thread(raw_http, port, head, b'{"prompt": ')  # 11 of 100 bytes, then silence
    assert answer.startswith(b"HTTP/1.1 408") and b'"body: not received within 1 s"' in answer, answer
    assert 0.9 <= took < 3  # answered once the 1 s limit passed
    # A client that sends half and hangs up leaves nothing behind, and the server keeps serving.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + b'{"prompt"')
    status, body, _ = await post(api, {"prompt": "Say hi."})
    assert status == 200 and body["response"]
    await settled(api)


HOSTILE_VALUES = [None, {}, [], "x", "", True, -1, 0, 1.5, 10**40, -(10**400), 1e308, "\ud800", [["a", "\udfff"]],
                  [["a", "b"]], {"prompt": "hi"}, [[[[[]]]]] * 1000]


@pytest.mark.parametrize("field", ["prompt", "history", "max_length", "top_p", "temperature"])
async def test_any_value_of_any_field_is_an_answer_or_a_400_never_a_500(api, field):
    for value in HOSTILE_VALUES:
        body = {"prompt": "Say hi.", field: value}
        status, answer, _ = await post(api, {**body, "max_length": 64} if field != "max_length" else body)
        assert status in (200, 400), (value, status, answer)
        if status == 400:
            assert answer["error"].split(":")[0].split("[")[0] in (field, "body"), (value, answer)
    status, _, _ = await post(api, {"prompt": "Say hi."})
    assert status == 200


async def test_wrong_method_and_path_are_4xx(api):
    assert (await get_status(api, "/"))[0] == 405
    assert (await get_status(api, "/nowhere"))[0] == 404


# ---- the bearer token ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server({"defaults": SHORT, "auth_token": TOKEN})


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"])
async def test_the_http_api_needs_the_token(guarded, header):
    status, answer, headers = await post(guarded, {"prompt": "Hi"}, headers={"Authorization": header} if header
                                         else None)
    assert status == 401 and answer["error"].startswith("authorization: missing or invalid bearer token")
    assert headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive_on_http_and_grpc(guarded, scheme):
    status, answer, _ = await post(guarded, {"prompt": "Hi", "max_length": 64},
                                   headers={"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200 and answer["response"]
    with ChatClient(guarded.address, metadata=(("authorization", f"{scheme} {TOKEN}"),)) as grpc_client:
        text, _ = grpc_client.chat("Hi", max_new_tokens=4)
    assert text


async def test_health_and_metrics_stay_open_without_the_token(guarded):
    assert await get_status(guarded, "/health") == (200, {"status": "SERVING"})
    status, text = await get_status(guarded, "/metrics")
    assert status == 200 and "chat_requests" in text
