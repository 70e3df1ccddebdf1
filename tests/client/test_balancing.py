"""Targets and service config for several replicas: unit checks, then ChatClient against small fake replicas
(no model) that answer with their own name, refuse, or report NOT_SERVING."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client.balancing import RetryPolicy, balancing_options, channel_target, service_config
from client.chat_client import AsyncChatClient, ChatClient


@pytest.mark.parametrize(("target", "expected"), [
    ("localhost:50051", "localhost:50051"),
    ("dns:///chat.default.svc.cluster.local:50051", "dns:///chat.default.svc.cluster.local:50051"),
    ("dns://10.0.0.10/chat:50051", "dns://10.0.0.10/chat:50051"),
    ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
    ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
    (" 10.0.0.1:1 , 10.0.0.2:2 ,", "ipv4:10.0.0.1:1,10.0.0.2:2"),
    ("[::1]:50051,[fe80::1]:50052", "ipv6:[::1]:50051,[fe80::1]:50052"),
    ("[::1]:50051,", "ipv6:[::1]:50051"),
])
def test_channel_target(target, expected):
    assert channel_target(target) == expected


@pytest.mark.parametrize(("target", "message"), [
    ("", "target is empty"),
    ("10.0.0.1,10.0.0.2:1", "'10.0.0.1' needs a port"),
    ("10.0.0.1:1,10.0.0.2:99999", "'10.0.0.2:99999' needs a port"),
    ("10.0.0.1:1,chat.internal:1", "'chat.internal:1' is not an IP address.*dns:///"),
    ("10.0.0.1:1,[::1]:2", "all IPv4 or all IPv6"),
    ("::1:5,::2:5", "as \\[ADDRESS\\]:PORT"),
    (",", "lists no addresses"),
])
def test_bad_address_lists_name_the_entry(target, message):
    with pytest.raises(ValueError, match=message):
        channel_target(target)


def test_service_config_round_robin_retries_and_health():
    config = service_config(RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=1.5,
                                        backoff_multiplier=3))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "chat.v1.ChatService"}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "chat.v1.ChatService"}]
    assert method["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1.5s",
                                     "backoffMultiplier": 3, "retryableStatusCodes": ["UNAVAILABLE",
                                                                                      "RESOURCE_EXHAUSTED"]}
    assert "waitForReady" not in method


def test_service_config_without_retries_with_wait_for_ready():
    for retry in (None, RetryPolicy(max_attempts=1)):
        config = service_config(retry, wait_for_ready=True, health_check=False)
        assert config["methodConfig"] == [{"name": [{"service": "chat.v1.ChatService"}], "waitForReady": True}]
        assert "healthCheckConfig" not in config
        assert dict(balancing_options(retry))["grpc.enable_retries"] == 0


def test_channel_options_carry_the_service_config_as_json():
    options = dict(balancing_options())
    assert json.loads(options["grpc.service_config"]) == service_config()
    assert options["grpc.enable_retries"] == 1 and options["grpc.service_config_disable_resolution"] == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_attempts": 0}, "max_attempts must be in \\[1, 5\\]"),
    ({"max_attempts": 6}, "max_attempts must be in \\[1, 5\\]"),
    ({"initial_backoff": 0}, "initial_backoff must be > 0"),
    ({"initial_backoff": 2.0, "max_backoff": 1.0}, "max_backoff must be >= initial_backoff"),
    ({"backoff_multiplier": -1}, "backoff_multiplier must be > 0"),
    ({"codes": ()}, "codes must be"),
    ({"codes": (grpc.StatusCode.OK,)}, "codes must be"),
])
def test_bad_retry_policies_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**fields)


def test_cli_names_a_bad_retry_flag_and_a_bad_target():
    for args, message in ((["--retry-max-attempts", "9"], "--retry-max-attempts must be in [1, 5]"),
                          (["--target", "10.0.0.1:1,chat:2"], "--target: address list entry 'chat:2'")):
        done = subprocess.run([sys.executable, "-m", "client.cli", *args, "hi"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr


class FakeReplica(chat_pb2_grpc.ChatServiceServicer):
    """Answers Chat with its own name, or refuses the first `refusals` calls with `code`."""

    def __init__(self, name: str, code: grpc.StatusCode | None = None, refusals: int = 0, pushback: str = ""):
        self.name, self.code, self.refusals, self.pushback = name, code, refusals, pushback
        self.calls = 0

    def Chat(self, request, context):
        self.calls += 1
        if self.code is not None and self.calls <= self.refusals:
            if self.pushback:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback),))
            context.abort(self.code, f"{self.name} refuses")
        return chat_pb2.ChatResponse(text=self.name)


@pytest.fixture
def replicas() -> Iterator:
    """start(FakeReplica, health status) -> its address; every server is stopped after the test."""
    servers = []

    def start(replica: FakeReplica, status=health_pb2.HealthCheckResponse.SERVING) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        chat_pb2_grpc.add_ChatServiceServicer_to_server(replica, server)
        checker = health.HealthServicer()
        checker.set("chat.v1.ChatService", status)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def answers(client: ChatClient, count: int) -> collections.Counter:
    return collections.Counter(client.chat_response("hi").text for _ in range(count))


def until_each_answers(client: ChatClient, names: set[str], timeout: float = 10.0) -> set[str]:
    """Call until every replica in `names` has answered once (round_robin picks only connected ones, and a
    first connection attempt that fails on a loaded machine is retried after a 1 s backoff); who answered."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while seen != names and time.monotonic() < deadline:
        seen.add(client.chat_response("hi").text)
        time.sleep(0.01)
    return seen


def test_address_list_round_robins_across_replicas(replicas):
    target = ",".join(replicas(FakeReplica(name)) for name in "abc")
    with ChatClient(target, timeout=10, wait_for_ready=True) as client:
        assert until_each_answers(client, set("abc")) == set("abc")
        seen = answers(client, 30)
    assert set(seen) == set("abc") and sum(seen.values()) == 30 and max(seen.values()) <= 12, seen


def test_dns_target_round_robins_over_every_resolved_address():
    """dns:///localhost:PORT resolves to 127.0.0.1 and ::1: a replica on each, same port, both get calls."""
    servers, names = [], {"127.0.0.1": "v4", "[::1]": "v6"}
    try:
        port = 0
        for host, name in names.items():
            server = grpc.server(futures.ThreadPoolExecutor(4))
            chat_pb2_grpc.add_ChatServiceServicer_to_server(FakeReplica(name), server)
            try:
                bound = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError:
                bound = 0
            if not bound:
                pytest.skip(f"cannot listen on {host}:{port} here (no IPv6 loopback?)")
            port = bound
            server.start()
            servers.append(server)
        with ChatClient(f"dns:///localhost:{port}", timeout=10, wait_for_ready=True) as client:
            assert until_each_answers(client, {"v4", "v6"}) == {"v4", "v6"}
            seen = answers(client, 20)
        assert set(seen) == {"v4", "v6"} and min(seen.values()) >= 8, seen
    finally:
        for server in servers:
            server.stop(0)


async def test_async_client_balances_and_retries_too(replicas):
    busy = FakeReplica("busy", grpc.StatusCode.UNAVAILABLE)  # answers until told to refuse
    target = ",".join([replicas(FakeReplica("a")), replicas(FakeReplica("b")), replicas(busy)])
    async with AsyncChatClient(target, timeout=10, wait_for_ready=True,
                               retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05)) as client:
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while seen != {"a", "b", "busy"} and time.monotonic() < deadline:  # every replica connected
            seen.add((await client.chat_response("hi")).text)
        busy.refusals = 10**6
        counted = collections.Counter([(await client.chat_response("hi")).text for _ in range(24)])
    assert seen == {"a", "b", "busy"} and set(counted) == {"a", "b"}, (seen, counted)
    assert busy.calls > len(seen)  # refused, and retried on the others


def test_refusals_are_retried_on_another_replica(replicas):
    refusing = [FakeReplica(name, code) for name, code in  # they answer until told to refuse
                (("busy", grpc.StatusCode.RESOURCE_EXHAUSTED), ("draining", grpc.StatusCode.UNAVAILABLE))]
    target = ",".join([replicas(FakeReplica("ok"))] + [replicas(r) for r in refusing])
    with ChatClient(target, timeout=10, retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05)) as client:
        assert until_each_answers(client, {"ok", "busy", "draining"}) == {"ok", "busy", "draining"}
        answered = [r.calls for r in refusing]
        for r in refusing:
            r.refusals = 10**6
        assert answers(client, 20) == {"ok": 20}
    assert all(r.calls > before for r, before in zip(refusing, answered, strict=True))  # refused, went elsewhere


def test_without_retries_a_refusal_reaches_the_caller(replicas):
    with ChatClient(replicas(FakeReplica("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, refusals=1)), timeout=10,
                    retry=None) as client, pytest.raises(grpc.RpcError) as refused:
        client.chat_response("hi")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_replica_that_is_not_serving_gets_no_calls(replicas):
    loading = FakeReplica("loading")
    target = ",".join([replicas(FakeReplica("ok")),
                       replicas(loading, health_pb2.HealthCheckResponse.NOT_SERVING)])
    with ChatClient(target, timeout=10, wait_for_ready=True) as client:
        assert answers(client, 10) == {"ok": 10}
    assert loading.calls == 0


def test_a_retry_waits_for_the_servers_pushback(replicas):
    full = FakeReplica("full", grpc.StatusCode.RESOURCE_EXHAUSTED, refusals=1, pushback="400")
    with ChatClient(replicas(full), timeout=10, retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.01)) as client:
        started = time.monotonic()
        assert client.chat_response("hi").text == "full"
        assert time.monotonic() - started >= 0.4 and full.calls == 2  # not the policy's 10 ms


def test_a_negative_pushback_stops_retries(replicas):
    full = FakeReplica("full", grpc.StatusCode.RESOURCE_EXHAUSTED, refusals=1, pushback="-1")
    with ChatClient(replicas(full), timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
        client.chat_response("hi")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and full.calls == 1


def test_invalid_argument_is_not_retried(replicas):
    bad = FakeReplica("bad", grpc.StatusCode.INVALID_ARGUMENT, refusals=10**6)
    with ChatClient(replicas(bad), timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
        client.chat_response("hi")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.calls == 1


def test_cli_answers_through_an_address_list(server):
    """chat-client with the retry flags, against a list naming the session server twice (two subchannels)."""
    done = subprocess.run([sys.executable, "-m", "client.cli", "--target", f"{server.address},{server.address}",
                           "--retry-max-attempts", "3", "--retry-max-backoff", "0.5", "--wait-for-ready",
                           "--temperature", "0", "--max-new-tokens", "16", "What is the capital of France?"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_tls_address_list_checks_the_certificate_against_server_name():
    """An address list carries no name: the certificate (for chat.internal and 127.0.0.1) is checked against
    `server_name`; without it, the check fails (README: Several replicas)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("chat.internal"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    server = grpc.server(futures.ThreadPoolExecutor(4))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(FakeReplica("tls"), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, pem)]))
    server.start()
    try:
        target = f"127.0.0.1:{port},127.0.0.1:{port}"
        with ChatClient(target, timeout=10, root_certificates=pem, server_name="chat.internal") as client:
            assert client.chat_response("hi").text == "tls"
        with ChatClient(target, timeout=10, root_certificates=pem, retry=None) as client, \
                pytest.raises(grpc.RpcError) as refused:
            client.chat_response("hi")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "Hostname" in refused.value.details()
    finally:
        server.stop(0)
