"""The chat page (client/web/app.py) run by Streamlit's AppTest against a real server: defaults from the
server, turns and history, the friendly messages for a server that is down, loading, busy or refusing."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from client.chat_client import ChatClient
from service.config import SamplingDefaults
from service.grpc.server import NOT_SERVING, create_server
from tests.conftest import ServerThread, make_config

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "client/web/app.py"
# Not the server's built-in defaults, so the test sees that the page reads them from GetModelInfo.
DEFAULTS = SamplingDefaults(max_length=1536, max_new_tokens=40, temperature=0.0, top_p=0.9, top_k=5)


@pytest.fixture(scope="module")
def page_server(start_server):
    return start_server({"defaults": DEFAULTS})


def open_page(monkeypatch, target: str) -> AppTest:
    monkeypatch.setenv("CHAT_WEB_TARGET", target)
    page = AppTest.from_file(str(APP), default_timeout=120)
    page.run()
    assert not page.exception, page.exception
    return page


def send(page: AppTest, text: str) -> AppTest:
    page.chat_input[0].set_value(text).run()
    assert not page.exception, page.exception
    return page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sliders_and_model_line_come_from_the_server(page_server, monkeypatch):
    page = open_page(monkeypatch, page_server.address)
    sliders = {s.label: s.value for s in page.sidebar.slider}
    assert sliders == {"max_length": 1536, "top_p": 0.9, "temperature": 0.0}
    numbers = {n.label: n.value for n in page.sidebar.number_input}
    assert numbers["max_new_tokens"] == 40 and numbers["top_k (0: no limit)"] == 5
    assert numbers["seed (empty: random)"] is None
    info = ChatClient(page_server.address).model_info()
    model_line = page.sidebar.markdown[0].value
    assert info.name in model_line and "cpu" in model_line and "float32" in model_line
    assert page.title[0].value == info.name


def test_a_turn_streams_an_answer_and_the_next_turn_sends_the_history(page_server, monkeypatch):
    page = send(open_page(monkeypatch, page_server.address), "What is the capital of France?")
    first = page.session_state.exchanges[0]
    assert "Paris" in first.answer and first.finish == "stop" and not first.stopped
    assistant = [m for m in page.chat_message if m.name == "assistant"]
    assert len(assistant) == 1 and "Paris" in assistant[0].markdown[0].value
    figures = assistant[0].caption[0].value
    assert f"{first.prompt_tokens} prompt + {first.completion_tokens} answer tokens" in figures
    assert "first token" in figures and "tokens/s" in figures and "finish: stop" in figures

    send(page, "And of Germany?")
    second = page.session_state.exchanges[1]
    assert "Berlin" in second.answer
    # The history went with it: the second prompt holds the whole first exchange.
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    assert [m.name for m in page.chat_message] == ["user", "assistant", "user", "assistant"]

    page.sidebar.button[0].click().run()  # New conversation
    assert page.session_state.exchanges == [] and not page.chat_message


def test_refused_input_is_a_message_not_a_traceback(page_server, monkeypatch):
    page = open_page(monkeypatch, page_server.address)
    page.sidebar.slider[0].set_value(2).run()  # max_length 2: no prompt fits
    send(page, "Hello there")
    assert "refused this input" in page.error[0].value and "max_length" in page.error[0].value
    exchange = page.session_state.exchanges[0]
    assert exchange.error and not exchange.in_history


def test_a_busy_server_is_a_message(start_server, monkeypatch):
    small = start_server(max_batch_size=1, max_queued_requests=1)
    with ChatClient(small.address, retry=None) as other:
        call = other.stream_chunks("Tell me a very long story about a ship.", temperature=0.0, max_new_tokens=400,
                                   ignore_eos=True)
        try:
            next(call)  # admitted and running: the server is now full
            page = send(open_page(monkeypatch, small.address), "Hello")
            assert "busy" in page.error[0].value and "limit of 1 requests" in page.error[0].value
        finally:
            call.cancel()


def test_a_server_that_is_down_is_a_message(monkeypatch):
    monkeypatch.setenv("CHAT_WEB_CONNECT_WAIT", "2")  # how long the page keeps trying before it offers Retry
    started = time.monotonic()
    page = open_page(monkeypatch, f"127.0.0.1:{free_port()}")
    assert 2 <= time.monotonic() - started < 30
    assert "Can't reach the chat server" in page.error[0].value
    assert page.button[0].label == "Retry" and not page.chat_input


def test_the_page_waits_with_a_spinner_while_the_model_loads(server, monkeypatch):
    """A server that listens but has not loaded its model: the page waits (spinner) until health says SERVING,
    then opens."""
    loading = ServerThread(make_config())
    loading._thread.start()  # its event loop, without loading a model

    async def boot():
        grpc_server, port = create_server(loading.config, loading.runtime)
        await loading.runtime.set_health(NOT_SERVING)
        await grpc_server.start()
        return grpc_server, port

    loading.server, loading.port = loading.call(boot())
    monkeypatch.setenv("CHAT_WEB_TARGET", loading.address)
    page = AppTest.from_file(str(APP), default_timeout=120)
    opened = threading.Thread(target=page.run)
    started = time.monotonic()
    opened.start()
    try:
        time.sleep(3)
        assert opened.is_alive()  # still waiting for SERVING
        loading.call(loading.runtime.load(server.engine.loaded))
        opened.join(60)
        assert not opened.is_alive() and time.monotonic() - started >= 3
        assert not page.exception and not page.error
        assert page.title[0].value == server.engine.loaded.name and page.chat_input
    finally:
        loading.stop()
