"""The grpc.aio server: bind the port (TLS, mTLS), the interceptor chain, chat.v1, health, reflection, and the
optional plaintext health port. Connection management is fixed here (see channel_options)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig, read_auth_token
from service.grpc.interceptors import GuardInterceptor, MetricsInterceptor, TokenAuthInterceptor
from service.metrics import GrpcMetrics

if TYPE_CHECKING:  # the runtime holds what the server serves: its servicer, health, metrics and tracing
    from service.runtime import Runtime

log = logging.getLogger(__name__)

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
LIVENESS = ""  # the whole server: SERVING while the process runs and its engine is alive (liveness probes)
READINESS = SERVICE_NAME  # SERVING once warmed up, until drain or an engine fault (readiness, startup probes)
HEALTH_NAMES = (LIVENESS, READINESS)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(config: ServerConfig, overrides: Mapping[str, int] | None = None) -> list[tuple[str, int]]:
    """Message size limits and connection management (docs/configuration.md, Fixed settings). `overrides`
    replaces or adds options by name; the tests use it to shrink the keepalive and connection-age timers."""
    size = config.limits.max_message_bytes
    options = [
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
    if overrides:
        options = [(name, value) for name, value in options if name not in overrides] + list(overrides.items())
    return options


def create_health_server(config: ServerConfig, runtime: Runtime) -> grpc.aio.Server:
    """grpc.health.v1 alone on config.health_port, in plaintext, with no token and no other service."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(runtime.health, server)
    address = f"{config.host}:{config.health_port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"could not bind the health port {address}")
    return server


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (mTLS when a client CA is given), or None for plaintext."""
    if not config.tls_cert:
        return None
    client_ca = _read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(_read(config.tls_key), _read(config.tls_cert))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_server(config: ServerConfig, runtime: Runtime, *,
                  options: Mapping[str, int] | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with chat, health and (unless turned off) reflection, bound to config.host:config.port
    (0 picks a port); TLS and a bearer token as configured. `options` overrides channel options (tests)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if runtime.tracing is not None:  # outermost: the span covers the whole call
        interceptors.append(runtime.tracing.interceptor())
    if runtime.metrics is not None:  # before the others: it sees the status every other interceptor sets
        interceptors.append(MetricsInterceptor(GrpcMetrics(runtime.metrics.registry)))
    interceptors.append(GuardInterceptor())
    token = read_auth_token(config)
    if token:
        interceptors.append(TokenAuthInterceptor(token))
    server = grpc.aio.server(options=channel_options(config, options), interceptors=interceptors)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(runtime.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(runtime.health, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    if not _is_loopback(config.host):
        if credentials is None:
            log.warning("serving PLAINTEXT on %s, which is not a loopback address; use --tls-cert/--tls-key or "
                        "a TLS-terminating proxy (docs/security.md: Running it safely)", config.host)
        if not token:
            log.warning("no --auth-token: any client that reaches %s can call the model", config.host)
    log.info("security: %s, %s, reflection %s",
             "plaintext" if credentials is None else ("mTLS" if config.tls_client_ca else "TLS"),
             "bearer token required" if token else "no token", "on" if config.reflection else "off")
    return server, port
