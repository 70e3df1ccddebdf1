"""Shared fixtures: a real server on a free port, on the real default model, reached over loopback.

The session server runs in float32 with dense weights (`--quantize none`) so that greedy answers are exactly
reproducible whether a request decodes alone or inside a batch (bf16 rounding, and the packed int4 kernel's
bf16 inputs, can flip a near-tie late in a long answer). The
subprocess tests (grpcurl, shutdown) run the default dtype the way `make run` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Iterator

import grpc
import pytest

# The test process, its server subprocesses and the servers' engines share 2 cores. OpenMP threads that spin
# while waiting then steal the cores from the thread that has work (a 135M decode step went from ~35 ms to
# ~570 ms under such contention); sleeping waiters keep the suite's timing sane. Set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from client.chat_client import AsyncChatClient, ChatClient  # noqa: E402
from service.config import Limits, ServerConfig
from service.engine.faults import Faults
from service.grpc.server import NOT_SERVING, create_server
from service.runtime import Runtime
from tests.support import TEST_DEVICE


class ServerThread:
    """A chat server with its own event loop on a background thread of the test process."""

    def __init__(self, config: ServerConfig, options: dict[str, int] | None = None, loaded=None,
                 faults: Faults | None = None):
        self.config = config
        self.options = options  # channel option overrides, e.g. short keepalive timers
        self.loaded = loaded  # a model another server already loaded, to skip loading it again
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.runtime = Runtime(config, faults=faults)  # faults: the engine's test seam, to inject failures

    def call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()

        async def boot():
            server, port = create_server(self.config, self.runtime, options=self.options)
            await self.runtime.set_health(NOT_SERVING)
            await server.start()
            await self.runtime.start_http()
            await self.runtime.start_health_port()
            return server, port

        self.server, self.port = self.call(boot())
        self.call(self.runtime.load(self.loaded))
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.runtime.engine

    def stop(self) -> None:
        self.call(self.runtime.drain(self.server))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# The session servers run on TEST_DEVICE (tests/support.py); server subprocesses read it as CHAT_DEVICE.
os.environ.setdefault("CHAT_DEVICE", TEST_DEVICE)


def make_config(server: dict | None = None, **limits) -> ServerConfig:
    """The tests' config: float32 on a free loopback port, on TEST_DEVICE; `server` sets top-level fields, the
    rest limits."""
    fields = {"host": "127.0.0.1", "port": 0, "http_port": 0, "dtype": "float32", "quantize": "none",
              "grace_seconds": 2.0, "device": TEST_DEVICE, **(server or {})}
    return ServerConfig(**fields, limits=dataclasses.replace(Limits(), **limits))


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    running = ServerThread(make_config(max_batch_size=16, max_queued_requests=64)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def start_server(server):
    """Start extra servers on the session server's already loaded model (no second load, ~18 s saved each);
    they are drained and stopped after the module. start(server={top-level fields}, options={channel
    option overrides}, faults=Faults() to inject engine failures, **limits)."""
    started: list[ServerThread] = []

    def start(server_fields: dict | None = None, options: dict[str, int] | None = None,
              faults: Faults | None = None, **limits) -> ServerThread:
        extra = ServerThread(make_config(server_fields, **limits), options, loaded=server.engine.loaded,
                             faults=faults).start()
        started.append(extra)
        return extra

    yield start
    for extra in started:
        extra.stop()


@pytest.fixture(scope="session")
def client(server) -> Iterator[ChatClient]:
    with ChatClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture
async def aclient(server):
    async with AsyncChatClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch
