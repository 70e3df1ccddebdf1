"""Small helpers shared by the service tests: waiting for a condition, raw gRPC over HTTP/2, busy streams."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable
from contextlib import asynccontextmanager

import aiohttp
import h2.config
import h2.connection
import h2.events


async def until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Wait for `predicate()` to hold; False if it still doesn't after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


@asynccontextmanager
async def busy(client, engine, count: int, *, waiting: int = 0):
    """`count` long greedy streams that fill the batch until the block ends (then they are cancelled)."""
    calls = [client.stream_chunks(f"Tell me a very long story about ship number {i}.", temperature=0.0,
                                  max_new_tokens=600, ignore_eos=True, timeout=120) for i in range(count)]
    try:
        assert await until(lambda: engine.stats.running >= count - waiting and engine.stats.waiting >= waiting), \
            (engine.stats, count, waiting)
        yield calls
    finally:
        for call in calls:
            call.cancel()


def raw_grpc_call(port: int, path: str, message: bytes, timeout: float = 10.0) -> list[h2.events.Event]:
    """One gRPC call made by hand over HTTP/2 (plaintext); the events of its stream, in order.

    This is how a test can see the frames themselves, e.g. that a refusal is Trailers-Only: a single
    HEADERS frame with END_STREAM that carries grpc-status, no response headers before it, no DATA.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        events: list[h2.events.Event] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return events
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return events
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


async def post_json(port: int, path: str, body, headers: dict | None = None, timeout: float = 120):
    """(status, JSON body or text, headers) of one POST to the HTTP listener; `body` is sent as is when bytes,
    else as JSON (json.dumps escapes lone surrogates as \\udXXX, which JSON allows)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}{path}", data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text), response.headers
        except ValueError:
            return response.status, text, response.headers
