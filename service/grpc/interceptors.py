"""Server interceptors: a guard that keeps bugs and garbage from surfacing as UNKNOWN, bearer-token auth, and
gRPC server metrics.

All work for every RPC shape (unary and streaming) by rewrapping the RpcMethodHandler that the next
interceptor or the server's handler lookup returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from service.core.auth import bearer_matches
from service.failures import Status, left_early

log = logging.getLogger(__name__)

_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

# The health service stays open without a token, so load balancers and orchestrators can probe it.
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


def _behaviour_name(handler: grpc.RpcMethodHandler) -> str:
    return _BEHAVIOURS[2 * handler.request_streaming + handler.response_streaming]


Around = Callable[[object, grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager]


def _wrap(handler: grpc.RpcMethodHandler, around: Around, *, async_only: bool = True) -> grpc.RpcMethodHandler:
    """The handler with its behaviour run inside `around(request, context)`, an async context manager that may
    refuse the call before it runs (by aborting) or see how it ends; for streaming responses and unary ones
    alike. With async_only, synchronous behaviours (which grpc.aio runs on a thread pool) are left as they are."""
    name = _behaviour_name(handler)
    behaviour = getattr(handler, name)
    is_async = inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)
    if behaviour is None or (async_only and not is_async):
        return handler
    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request, context):
            async with around(request, context):
                async for response in behaviour(request, context):
                    yield response

        return handler._replace(**{name: streamed})

    async def unary(request, context):
        async with around(request, context):
            return await behaviour(request, context)

    return handler._replace(**{name: unary})


class _Undecodable:
    """Stands in for a request message that did not parse, so the handler can refuse it cleanly."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as err:  # bytes that are not this message
            return _Undecodable(err)

    return deserialize


async def _refuse_undecodable(request, context) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message: {request.error}")


async def _internal(method: str, context, err: Exception) -> None:
    log.error("unexpected error in %s", method, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} ({type(err).__name__}); it is logged")


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Turns what would reach the client as UNKNOWN into a deliberate status.

    - A request whose bytes do not parse as the method's message: INVALID_ARGUMENT (gRPC alone says INTERNAL).
    - An unexpected exception escaping a handler (a bug): INTERNAL, logged with its traceback.
    `context.abort` (AbortError) and cancellation pass through untouched: those are deliberate outcomes.
    """

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method, streaming_requests = details.method, handler.request_streaming

        @contextlib.asynccontextmanager
        async def guarded(request, context):
            if not streaming_requests:
                await _refuse_undecodable(request, context)
            try:
                yield
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as err:
                await _internal(method, context, err)

        wrapped = _wrap(handler, guarded)
        if not handler.request_streaming:
            wrapped = wrapped._replace(request_deserializer=_lenient(handler.request_deserializer))
        return wrapped


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>` (the scheme in any case); otherwise UNAUTHENTICATED
    before the handler runs.

    The health service is exempt (see OPEN_METHODS_PREFIX). The comparison is constant-time.
    """

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._token = token

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_matches(value, self._token)
        return False

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS_PREFIX) or self._authorized(details):
            return handler
        message = "missing or invalid bearer token (metadata `authorization: Bearer <token>`)"

        @contextlib.asynccontextmanager
        async def refused(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises; the handler never runs

        return _wrap(handler, refused, async_only=False)


_RPC_TYPES = {"unary_unary": "unary", "unary_stream": "server_stream", "stream_unary": "client_stream",
              "stream_stream": "bidi_stream"}


def _code_name(code) -> str:
    """A StatusCode (or the int cygrpc sometimes keeps) as its name."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


def _outcome(context, err: BaseException | None) -> str:
    """The status an RPC ended with, from the handler's exception (if any) and its context."""
    if isinstance(err, asyncio.CancelledError):
        remaining = context.time_remaining()
        return left_early(remaining is not None and remaining <= 0).name
    code = context.code()
    if code is not None:
        return _code_name(code)
    return Status.OK.name if err is None else "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc_server_started_total, grpc_server_handled_total{grpc_code} and grpc_server_handling_seconds for every
    RPC, unary and streaming (py-grpc-prometheus has no aio support). Put it first, so it sees the status that
    the other interceptors set (UNAUTHENTICATED, INTERNAL)."""

    def __init__(self, metrics):  # a service.metrics.GrpcMetrics
        self._metrics = metrics
        self._started: dict[str, tuple] = {}  # method -> (labels, started child, handling child)
        self._handled: dict[tuple[str, str], object] = {}  # (method, code) -> handled child

    def _children(self, method: str, rpc_type: str) -> tuple:
        """Labelled children, looked up once per method (labels() costs more than the update itself)."""
        found = self._started.get(method)
        if found is None:
            service, _, name = method.lstrip("/").partition("/")
            labels = (rpc_type, service, name)
            found = self._started[method] = (labels, self._metrics.started.labels(*labels),
                                              self._metrics.handling.labels(*labels))
        return found

    def _handled_child(self, method: str, labels: tuple, code: str):
        child = self._handled.get((method, code))
        if child is None:
            child = self._handled[(method, code)] = self._metrics.handled.labels(*labels, code)
        return child

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        labels, started, handling = self._children(method, _RPC_TYPES[_behaviour_name(handler)])

        @contextlib.asynccontextmanager
        async def measured(request, context):
            began, failure = time.perf_counter(), None
            started.inc()
            try:
                yield
            except BaseException as err:
                failure = err
                raise
            finally:
                handling.observe(time.perf_counter() - began)
                self._handled_child(method, labels, _outcome(context, failure)).inc()

        return _wrap(handler, measured)
