"""The chat page, Streamlit: ChatGLM2's web_demo2.py rebuilt as a chat.v1 client.

It talks to the server only through ChatClient; it never loads a model. `chat-web` starts it and passes the
server's address (and token, TLS files) in CHAT_WEB_* / CHAT_TOKEN environment variables.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import grpc
import streamlit as st
from chat.v1 import chat_pb2

from client.chat_client import ChatClient
from client.web.conversation import Exchange, history_of
from client.web.messages import explain, unreachable

LOADING_WAIT_SECONDS = 900  # how long the loading spinner waits for SERVING before it gives up
# Reconnect quickly once a server that was down comes up (gRPC's default backoff grows to 2 minutes).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 2000))


@dataclass
class Streaming:
    """The answer this browser session is streaming: its gRPC call, and set once the exchange is saved."""

    call: grpc.Call
    saved: threading.Event = field(default_factory=threading.Event)


def target() -> str:
    return os.environ.get("CHAT_WEB_TARGET", "localhost:50051")


@st.cache_resource(show_spinner=False)
def connect(address: str, token: str, tls: bool, tls_ca: str, server_name: str) -> ChatClient:
    """One client (one gRPC channel) per server, shared by every browser session. Without client-side health
    checking: the page asks health itself, to tell a server that is loading from one that is down."""
    return ChatClient(address, timeout=600, token=token or None, tls=tls, root_certificates=tls_ca or None,
                      server_name=server_name or None, health_check=False, options=CHANNEL_OPTIONS)


def client() -> ChatClient:
    env = os.environ
    return connect(target(), env.get("CHAT_TOKEN", ""), env.get("CHAT_WEB_TLS", "") == "1",
                   env.get("CHAT_WEB_TLS_CA", ""), env.get("CHAT_WEB_TLS_SERVER_NAME", ""))


def give_up(message: str) -> None:
    """Show `message` with a Retry button and end this run."""
    st.error(message)
    st.button("Retry")
    st.stop()


def probe(chat: ChatClient) -> str:
    """"serving", "loading" (health says NOT_SERVING: loading or draining) or "down" (unreachable)."""
    try:
        return "serving" if chat.serving() else "loading"
    except grpc.RpcError:
        return "down"


def wait_until_serving(chat: ChatClient) -> None:
    """Return once the server's health says SERVING. Meanwhile a spinner, and a line saying what it waits for:
    a model still loading (up to LOADING_WAIT_SECONDS), or a server it can't reach yet (up to
    CHAT_WEB_CONNECT_WAIT seconds, 60 by default: `make web` opens the page while the server starts). Then a
    message and a Retry button."""
    if probe(chat) == "serving":
        return
    connect_wait = float(os.environ.get("CHAT_WEB_CONNECT_WAIT", "60"))
    status = st.empty()
    started = time.monotonic()
    with st.spinner("Waiting for the server…"):
        while True:
            state = probe(chat)
            if state == "serving":
                status.empty()
                return
            waited = time.monotonic() - started
            if waited >= (connect_wait if state == "down" else LOADING_WAIT_SECONDS):
                break
            # Updating the line is also where Streamlit can stop this run (a click, a closed tab).
            if state == "down":
                status.warning(f"{unreachable(target(), retrying=True)} ({waited:.0f} s)")
            else:
                status.info(f"The server at `{target()}` is loading its model; this page opens as soon as it is "
                            f"ready ({waited:.0f} s)")
            time.sleep(1.0)
    status.empty()
    if state == "down":
        give_up(unreachable(target()))
    give_up(f"The server at `{target()}` is still not ready after {LOADING_WAIT_SECONDS} s.")


def model_info(chat: ChatClient) -> chat_pb2.GetModelInfoResponse:
    if "model_info" not in st.session_state:
        try:
            st.session_state.model_info = chat.model_info()
        except grpc.RpcError as err:
            give_up(explain(err, target()))
    return st.session_state.model_info


def new_conversation() -> None:
    st.session_state.exchanges = []


def sidebar(info: chat_pb2.GetModelInfoResponse) -> dict:
    """The model line, the original's three sliders, the advanced section and New conversation; returns the
    request parameters. Every default is the server's (GetModelInfo)."""
    d = info.default_params
    context = min(info.context_length, info.kv_cache_tokens or info.context_length)
    bar = st.sidebar
    bar.markdown(f"**Model** `{info.name}`  \n**Device** `{info.device}` · **dtype** `{info.dtype}`")
    params = {
        "max_length": bar.slider("max_length", 2, context, min(d.max_length, context), step=1),
        "top_p": bar.slider("top_p", 0.01, 1.0, round(d.top_p, 2), step=0.01),
        "temperature": bar.slider("temperature", 0.0, max(1.0, round(d.temperature, 2)),
                                  round(d.temperature, 2), step=0.01),
    }
    with bar.expander("Advanced"):
        params["max_new_tokens"] = st.number_input("max_new_tokens", 1, context - 1,
                                                   min(d.max_new_tokens, context - 1))
        params["top_k"] = st.number_input("top_k (0: no limit)", 0, None, d.top_k)
        params["repetition_penalty"] = st.number_input("repetition_penalty", 0.01, 10.0,
                                                       round(d.repetition_penalty, 2), step=0.05)
        params["seed"] = st.number_input("seed (empty: random)", 0, 2**53 - 1, None, step=1)
        system = st.text_area("system message (empty: the model's own)")
        params["system"] = system if system.strip() else None
    bar.button("New conversation", on_click=new_conversation, use_container_width=True)
    params["temperature"] = round(params["temperature"], 2)
    params["top_p"] = round(params["top_p"], 2)
    return params


def show(exchange: Exchange) -> None:
    with st.chat_message("user"):
        st.markdown(exchange.user)
    with st.chat_message("assistant"):
        if exchange.answer:
            st.markdown(exchange.answer)
        if exchange.error:
            st.error(exchange.error)
        st.caption(exchange.figures())


def stream(chat: ChatClient, exchange: Exchange, params: dict, placeholder) -> None:
    """Draw the answer into `placeholder` as it streams. Any click on the page (Stop among them) ends this run:
    Streamlit raises out of the next placeholder update, or the next run cancels the call (see
    `settle_previous_answer`). The `finally` then cancels the gRPC stream (the server frees the row) and keeps
    the partial answer, marked stopped."""
    exchanges: list[Exchange] = st.session_state.exchanges
    call = chat.stream_chunks(exchange.user, history_of(exchanges), **params)
    streaming = st.session_state.streaming = Streaming(call)
    try:
        placeholder.markdown("…")
        for chunk in call:
            exchange.add(chunk)
            placeholder.markdown(exchange.answer + " ▌")
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            exchange.stop()
        else:
            exchange.fail(explain(err, target()))
    finally:
        if not exchange.done:
            call.cancel()
            exchange.stop()
        exchanges.append(exchange)
        streaming.saved.set()


def settle_previous_answer() -> None:
    """A click while an answer streams may start this run on a new thread while the old run is still unwinding
    (Streamlit stops it at its next update). Cancel that answer's call and wait until its exchange is saved, so
    the transcript drawn below has it."""
    streaming: Streaming | None = st.session_state.get("streaming")
    if streaming is not None and not streaming.saved.is_set():
        streaming.call.cancel()
        streaming.saved.wait(10)


def main() -> None:
    st.set_page_config(page_title="Chat", page_icon=":robot_face:", layout="wide")
    st.session_state.setdefault("exchanges", [])
    settle_previous_answer()
    chat = client()
    wait_until_serving(chat)
    info = model_info(chat)
    st.title(info.name)
    params = sidebar(info)
    for exchange in st.session_state.exchanges:
        show(exchange)
    prompt = st.chat_input("Ask something")
    if prompt and prompt.strip():
        exchange = Exchange(user=prompt)
        with st.chat_message("user"):
            st.markdown(prompt)
        with st.chat_message("assistant"):
            placeholder = st.empty()
            st.button("Stop", key="stop", help="Stop this answer; what has arrived is kept")
            stream(chat, exchange, params, placeholder)
        st.rerun()


main()
