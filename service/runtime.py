"""What the server serves, and its life: the request path (frontend, metrics) with the gRPC servicer and health,
the HTTP listener, the model loaded off the event loop and warmed up, the engine watched, and the drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health

from service.config import ServerConfig, cache_root, read_auth_token
from service.core.frontend import Frontend
from service.core.types import GenerationRequest, SamplingParams
from service.engine.engine import Engine
from service.engine.faults import Faults
from service.engine.step_graphs import step_modes
from service.failures import Failure, RequestFailed
from service.grpc.server import (
    HEALTH_NAMES,
    LIVENESS,
    NOT_SERVING,
    READINESS,
    SERVING,
    create_health_server,
    create_server,
)
from service.grpc.servicer import ChatServicer
from service.http.api import api_routes
from service.http.guard import Guard
from service.http.health import health_routes
from service.http.listener import HttpListener, server_ssl_context
from service.http.metrics import metrics_routes
from service.http.openai import openai_routes
from service.metrics import Metrics
from service.models.base import LoadedModel
from service.models.loader import load_model, resolve_device, resolve_precision
from service.models.quant import kernels

log = logging.getLogger(__name__)


class Runtime:
    """What the server serves: the request path (frontend, metrics) with its gRPC servicer, health, and the
    engine once the model is loaded."""

    def __init__(self, config: ServerConfig, tracing=None, faults: Faults | None = None):
        """`tracing`: a service.grpc.tracing.Tracing; by default one exporting to --otlp-endpoint if that is set.
        `faults`: the tests' seam for injecting engine failures (service/engine/faults.py)."""
        self.config = config
        self.faults = faults
        self.metrics = Metrics() if config.metrics else None
        self.tracing = tracing if tracing is not None else make_tracing(config)
        self.frontend = Frontend(config, self.metrics, self.tracing)
        self.servicer = ChatServicer(config, self.frontend)
        self.health = health.aio.HealthServicer()
        self._status: dict[str, int] = {}  # what we last told `health`, per service name
        self.http = build_http(config, self)
        self.health_server: grpc.aio.Server | None = None  # --health-port: grpc.health.v1 alone, plaintext
        self._watcher: asyncio.Task | None = None

    @property
    def engine(self) -> Engine | None:
        return self.frontend.engine

    async def start_http(self) -> None:
        """Bind the HTTP listener (unless --no-http); it logs `http listening on HOST:PORT`."""
        if self.http is not None:
            await self.http.start()

    async def start_health_port(self) -> None:
        """Serve grpc.health.v1 alone on --health-port (if set): plaintext and without a token, for orchestrators
        whose probes cannot speak TLS. It shares the main port's health statuses."""
        if self.config.health_port:
            self.health_server = create_health_server(self.config, self)
            await self.health_server.start()
            log.info("health listening on %s:%d (plaintext, grpc.health.v1 only)", self.config.host,
                     self.config.health_port)

    async def ready(self) -> bool:
        """Whether health says SERVING for chat.v1.ChatService (readiness); GET /health reports it."""
        return self._status.get(READINESS) == SERVING

    async def set_health(self, status) -> None:
        for name in HEALTH_NAMES:
            await self._set(name, status)

    async def set_liveness(self, status) -> None:
        await self._set(LIVENESS, status)

    async def _set(self, name: str, status) -> None:
        self._status[name] = status
        await self.health.set(name, status)

    async def load(self, loaded: LoadedModel | None = None) -> None:
        """Load the model on the engine's single-worker executor, start the engine on that same thread, answer
        one warm-up request, then SERVING. An already loaded model may be passed instead (the tests run several
        servers on one model)."""
        config = self.config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-worker")
        kernels.configure(config)
        if loaded is None:
            device = resolve_device(config.device)
            step_modes(config.compile, device)  # refuses --compile graphs off CUDA before anything is loaded
            precision = resolve_precision(config.model, config.dtype, config.quantize, device)
            log.info("loading as %s, quantize %s: %s", str(precision.dtype).removeprefix("torch."),
                     precision.quantize.value, precision.reason)
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(worker, load_model, config.model, device, precision.dtype,
                                                precision.quantize, cache_root(config))
        device, dtype = loaded.model.device, loaded.model.dtype
        step_mode, step_fallback = step_modes(config.compile, device)
        engine = Engine(loaded, config.limits, step_mode=step_mode, step_fallback=step_fallback, faults=self.faults)
        engine.start(worker)
        await warm_up(engine)
        self.frontend.set_engine(engine)
        self._watcher = asyncio.create_task(self.watch(engine))
        limits = config.limits
        log.info("serving %s (context %d tokens, %d per request) on %s as %s; max batch %d, max queued %d, KV cache "
                 "%d tokens in blocks of %d, torch threads %d", loaded.name, loaded.context_length, engine.max_context,
                 device, dtype, limits.max_batch_size, limits.max_queued_requests, engine.stats.kv_capacity_tokens,
                 engine.block_size, torch.get_num_threads())
        await self.set_health(SERVING)

    async def watch(self, engine: Engine, interval: float = 0.1) -> None:
        """If the engine's worker dies (a fault it cannot recover from), go NOT_SERVING and end every
        admitted request with UNAVAILABLE at once, so no caller waits for an answer that will never come.
        Later calls get UNAVAILABLE from `Engine.submit`."""
        while engine.alive:
            await asyncio.sleep(interval)
        log.error("the engine stopped (%r); NOT_SERVING, failing %d requests with UNAVAILABLE", engine.failed,
                  len(self.frontend.active))
        await self.set_health(NOT_SERVING)
        self.frontend.fail_all(RequestFailed(Failure.ENGINE_UNAVAILABLE,
                                             "the engine stopped after a fault; retry elsewhere"))

    async def drain(self, server: grpc.aio.Server) -> None:
        """Readiness NOT_SERVING first; after --drain-delay-seconds (still taking calls, so load balancers and
        endpoints can catch up) refuse new calls (UNAVAILABLE); let in-flight requests finish for up to the grace
        period; end the ones still running just before it runs out with UNAVAILABLE; stop the server (which
        cancels what is left, such as health watches) and join the engine's worker thread. Liveness stays SERVING
        until the server stops."""
        frontend = self.frontend
        grace, delay = self.config.grace_seconds, self.config.drain_delay_seconds
        await self._set(READINESS, NOT_SERVING)
        if delay > 0:
            log.info("draining: readiness NOT_SERVING; taking calls for %.1f s more (--drain-delay-seconds)", delay)
            await asyncio.sleep(delay)
        log.info("draining: %d requests in flight, grace %.1f s", frontend.admission.active, grace)
        frontend.admission.drain()
        if self._watcher is not None:
            self._watcher.cancel()
        margin = min(1.0, grace / 4)  # time for the unfinished ones to get their status out
        if not await frontend.wait_idle(grace - margin):
            count = frontend.fail_all(RequestFailed(Failure.ENGINE_UNAVAILABLE, "the server shut down before this "
                                                    f"request finished (grace {grace:g} s); retry"))
            log.warning("%d requests did not finish within the grace period; ending them with UNAVAILABLE", count)
            await frontend.wait_idle(margin)
        self._status.clear()  # everything NOT_SERVING from here on
        await self.health.enter_graceful_shutdown()  # everything NOT_SERVING; watches end
        await server.stop(margin)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.http is not None:
            await self.http.stop()
        frontend.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        engine = self.engine
        if engine is not None:
            stats = engine.stats
            log.info("engine at stop: created=%d released=%d running=%d waiting=%d kv_tokens=%d prefilled=%d "
                     "cancelled_in_queue=%d expired_in_queue=%d dropped_running=%d failed_steps=%d preempted=%d "
                     "kv_blocks_pool=%d kv_blocks_free=%d kv_blocks_cached=%d",
                     stats.created, stats.released, stats.running, stats.waiting, stats.kv_tokens, stats.prefilled,
                     stats.cancelled_in_queue, stats.expired_in_queue, stats.dropped_running, stats.failed_steps,
                     stats.preempted, stats.kv_blocks_pool, stats.kv_blocks_free, stats.kv_blocks_cached)
            await asyncio.to_thread(engine.stop)
            if engine.worker_alive:
                log.error("the engine worker thread did not stop")
        log.info("stopped")


async def warm_up(engine: Engine) -> None:
    """One short greedy answer through the whole path, so the first caller doesn't pay for it."""
    tokenizer = engine.loaded.tokenizer
    params = SamplingParams(max_new_tokens=2, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    request = GenerationRequest("warm-up", tokenizer.encode_chat("Hello", (), None), params)
    async for _ in engine.submit(request).stream():
        pass


def make_tracing(config: ServerConfig):
    """OpenTelemetry tracing to --otlp-endpoint, or None (and OpenTelemetry is not even imported)."""
    if not config.otlp_endpoint:
        return None
    try:
        from service.grpc.tracing import Tracing
    except ImportError as err:
        raise ValueError(f"--otlp-endpoint needs the otel extra (pip install '.[otel]'): {err}") from err
    log.info("tracing: OTLP spans to %s", config.otlp_endpoint)
    return Tracing(config.otlp_endpoint)


def build_http(config: ServerConfig, runtime: Runtime) -> HttpListener | None:
    """The HTTP listener with every HTTP route of this server (GET /metrics and /health, POST / and the OpenAI
    API), or None with --no-http. It serves TLS with the gRPC server's certificate when one is configured."""
    if not config.http:
        return None
    tls = server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    listener = HttpListener(config.host, config.http_port, ssl_context=tls,
                            client_max_size=config.limits.max_message_bytes)
    if runtime.metrics is not None:
        listener.add_routes(metrics_routes(runtime.metrics))
    listener.add_routes(health_routes(runtime.ready))
    guard = Guard(read_auth_token(config), config.http_body_timeout_seconds, config.limits.max_message_bytes)
    listener.add_routes(api_routes(runtime.frontend, guard))  # POST /, the original api.py
    listener.add_routes(openai_routes(runtime.frontend, guard))  # /v1/chat/completions, /v1/models, /tokenize
    return listener


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    runtime = Runtime(config)
    server, port = create_server(config, runtime)
    await runtime.set_health(NOT_SERVING)
    await runtime.set_liveness(SERVING)  # alive while loading; ready only after warm-up
    await server.start()
    log.info("listening on %s:%d; loading the model", config.host, port)
    await runtime.start_http()
    await runtime.start_health_port()
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
