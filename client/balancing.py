"""Replicas from the client's side: the gRPC target for what the caller names, and the channel's service config
(gRFC A6 retries, round_robin, client-side health checking) that spreads calls across every replica.

    channel_target("dns:///chat.default.svc.cluster.local:50051")  # unchanged: every A/AAAA record, round_robin
    channel_target("10.0.0.1:50051,10.0.0.2:50051")               # -> "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    channel_target("[::1]:50051,[::1]:50052")                     # -> "ipv6:[::1]:50051,[::1]:50052"
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

SERVICE = "chat.v1.ChatService"  # the methods the retry policy covers, and the health name a replica reports


@dataclass(frozen=True)
class RetryPolicy:
    """gRFC A6 retries: a failed attempt whose status is in `codes` is tried again, on whichever replica
    round_robin picks next, after a random wait of up to min(initial_backoff * multiplier^(n-1), max_backoff)
    seconds (or the server's `grpc-retry-pushback-ms`). gRPC caps `max_attempts` at 5; 1 turns retries off.
    A call is retried only until it has received response headers: a stream that has sent text never is."""

    max_attempts: int = 5
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 2.0  # seconds
    backoff_multiplier: float = 2.0
    codes: tuple[grpc.StatusCode, ...] = field(
        default=(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED))

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.max_attempts <= 5, f"max_attempts must be in [1, 5], got {self.max_attempts}"),
            (self.initial_backoff > 0, f"initial_backoff must be > 0 seconds, got {self.initial_backoff}"),
            (self.max_backoff >= self.initial_backoff,
             f"max_backoff must be >= initial_backoff, got {self.max_backoff}"),
            (self.backoff_multiplier > 0, f"backoff_multiplier must be > 0, got {self.backoff_multiplier}"),
            (bool(self.codes) and all(isinstance(c, grpc.StatusCode) and c != grpc.StatusCode.OK
                                      for c in self.codes), f"codes must be non-OK grpc.StatusCodes, got {self.codes}"),
        ]
        problem = next((message for ok, message in checks if not ok), None)
        if problem:
            raise ValueError(problem)

    def to_json(self) -> dict:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff),
            "maxBackoff": _duration(self.max_backoff),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": [code.name for code in self.codes],
        }


DEFAULT_RETRY = RetryPolicy()


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form: "0.1s", "2s"."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy | None = DEFAULT_RETRY, *, wait_for_ready: bool = False,
                   health_check: bool = True) -> dict:
    """The channel's default service config: round_robin over every resolved address; `retry` for every
    chat.v1.ChatService method (None: no retries); `wait_for_ready` makes calls wait for a ready replica
    instead of failing at once when none is; `health_check` watches each replica's grpc.health.v1 status for
    chat.v1.ChatService and sends nothing to one that is not SERVING (loading, draining)."""
    method: dict = {"name": [{"service": SERVICE}]}
    if retry is not None and retry.max_attempts > 1:
        method["retryPolicy"] = retry.to_json()
    if wait_for_ready:
        method["waitForReady"] = True
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return config


def balancing_options(retry: RetryPolicy | None = DEFAULT_RETRY, *, wait_for_ready: bool = False,
                      health_check: bool = True) -> list[tuple[str, object]]:
    """Channel options that install `service_config(...)` and keep a DNS TXT record from replacing it."""
    config = service_config(retry, wait_for_ready=wait_for_ready, health_check=health_check)
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if retry is not None and retry.max_attempts > 1 else 0),
    ]


def _split_address(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """"10.0.0.1:50051" or "[::1]:50051" -> (address, port); ValueError naming the entry otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address list entry {address!r} needs a port: HOST:PORT or [IPV6]:PORT")
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        raise ValueError(f"address list entry {address!r} is not an IP address; a comma-separated list takes "
                         f"IP:PORT entries only (use dns:///NAME:PORT for a name with several addresses)") from None
    if ip.version == 6 and not host.startswith("["):
        raise ValueError(f"address list entry {address!r}: write IPv6 addresses as [ADDRESS]:PORT")
    return ip, int(port)


def address_list_target(addresses: Sequence[str]) -> str:
    """An `ipv4:` or `ipv6:` target for a list of IP:PORT entries (gRPC's naming: one family per target)."""
    parsed = [_split_address(a.strip()) for a in addresses]
    versions = {ip.version for ip, _ in parsed}
    if len(versions) > 1:
        raise ValueError("an address list must be all IPv4 or all IPv6 (gRPC's ipv4: / ipv6: targets); "
                         f"got {', '.join(addresses)}")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in parsed)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in parsed)


def channel_target(target: str) -> str:
    """What the channel dials for `target`: a comma-separated list of IP:PORT becomes an ipv4:/ipv6: target;
    anything else (HOST:PORT, dns:///NAME:PORT, ipv4:..., unix:...) is passed to gRPC as it is."""
    target = target.strip()
    if not target:
        raise ValueError("target is empty")
    if "," in target and ":/" not in target and not target.startswith(("ipv4:", "ipv6:", "unix:")):
        entries = [entry for entry in target.split(",") if entry.strip()]
        if not entries:
            raise ValueError(f"target {target!r} lists no addresses")
        return address_list_target(entries)
    return target
