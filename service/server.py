"""The grpc.aio server's lifecycle: bind, load the model off the event loop, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import torch
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig
from service.engine.engine import Engine
from service.models.loader import load_model, resolve_device, resolve_dtype
from service.servicer import ChatServicer
from service.types import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
HEALTH_NAMES = ("", SERVICE_NAME)  # "" is the whole server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Message size limits and connection management (see the README's table)."""
    size = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),  # ping an idle connection every 30 s
        ("grpc.keepalive_timeout_ms", 10_000),  # and drop it if the ping goes unanswered for 10 s
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
        ("grpc.max_connection_idle_ms", 300_000),  # close connections with no RPC for 5 min
        ("grpc.max_connection_age_ms", 1_800_000),  # recycle connections after 30 min...
        ("grpc.max_connection_age_grace_ms", 600_000),  # ...giving open streams 10 more min
    ]


class Runtime:
    """What the server serves: the servicer, health, and the engine once the model is loaded."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.servicer = ChatServicer(config)
        self.health = health.aio.HealthServicer()

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    async def set_health(self, status) -> None:
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    async def load(self) -> None:
        """Load the model on a worker thread, start the engine, answer one warm-up request, then SERVING."""
        config = self.config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        loaded = await asyncio.to_thread(load_model, config.model, device, dtype)
        engine = Engine(loaded, config.limits)
        engine.start()
        await warm_up(engine)
        self.servicer.engine = engine
        limits = config.limits
        log.info("serving %s (context %d tokens) on %s as %s; max batch %d, max queued %d, KV cache %d tokens, "
                 "torch threads %d", loaded.name, loaded.context_length, device, dtype, limits.max_batch_size,
                 limits.max_queued_requests, limits.kv_cache_tokens, torch.get_num_threads())
        await self.set_health(SERVING)

    async def drain(self, server: grpc.aio.Server) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones the grace period, then stop the engine."""
        log.info("draining: %d requests in flight, grace %.1f s", self.servicer.admission.active,
                 self.config.grace_seconds)
        self.servicer.admission.draining = True
        await self.health.enter_graceful_shutdown()
        await server.stop(self.config.grace_seconds)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        log.info("stopped")


async def warm_up(engine: Engine) -> None:
    """One short greedy answer through the whole path, so the first caller doesn't pay for it."""
    tokenizer = engine.loaded.tokenizer
    params = SamplingParams(max_new_tokens=2, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    request = GenerationRequest("warm-up", tokenizer.encode_chat("Hello", (), None), params)
    async for _ in engine.submit(request).stream():
        pass


def create_server(config: ServerConfig, runtime: Runtime) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with chat, health and reflection, bound to config.host:config.port (0 picks a port)."""
    server = grpc.aio.server(options=channel_options(config))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(runtime.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(runtime.health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    return server, port


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    runtime = Runtime(config)
    server, port = create_server(config, runtime)
    await runtime.set_health(NOT_SERVING)
    await server.start()
    log.info("listening on %s:%d; loading the model", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(runtime.load())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        await server.stop(0)
        raise loading.exception()
    if not stopped.done():
        await stopped
    loading.cancel()
    await runtime.drain(server)
