"""TLS, mTLS, the bearer token, reflection off, and connection management timers, with certificates made here.

The mTLS server shares the session server's model; it also runs with short keepalive and connection-age
timers to show that a paused stream is not cut by them.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.chat_client import AsyncChatClient, ChatClient, make_channel
from service.config import ServerConfig
from service.grpc.server import NOT_SERVING, create_server
from service.runtime import Runtime

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
SHORT_TIMERS = {  # the README's connection management, shrunk from minutes to fractions of a second
    "grpc.keepalive_time_ms": 250,
    "grpc.keepalive_timeout_ms": 2_000,
    "grpc.max_connection_idle_ms": 500,
    "grpc.max_connection_age_ms": 1_000,
    "grpc.max_connection_age_grace_ms": 60_000,
}


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key=None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = None
    if key is not None:
        key_path = directory / f"{name}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1, a client certificate, and a stranger's client
    certificate from another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _cert("test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_key, None, rogue_key, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    paths = {}
    paths["ca"], _ = _write(directory, "ca", ca)
    paths["server"], paths["server_key"] = _write(
        directory, "server", _cert("localhost", server_key, ca.subject, ca_key, ca=False, server=True), server_key)
    paths["client"], paths["client_key"] = _write(
        directory, "client", _cert("a caller", client_key, ca.subject, ca_key, ca=False), client_key)
    paths["stranger"], paths["stranger_key"] = _write(
        directory, "stranger", _cert("a stranger", stranger_key, rogue_ca.subject, rogue_key, ca=False), stranger_key)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secure(start_server, pki):
    fields = {"tls_cert": str(pki["server"]), "tls_key": str(pki["server_key"]), "tls_client_ca": str(pki["ca"]),
              "auth_token": TOKEN, "reflection": False, "health_port": free_port()}
    return start_server(fields, SHORT_TIMERS, max_batch_size=4, max_queued_requests=8)


def mtls(pki, **overrides) -> dict:
    return {"root_certificates": pki["ca"], "certificate_chain": pki["client"], "private_key": pki["client_key"],
            **overrides}


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
@pytest.mark.parametrize("rpc", ["Chat", "StreamChat", "GetModelInfo", "CountTokens"])
def test_missing_or_bad_token_is_unauthenticated(secure, pki, token, rpc):
    created = secure.engine.stats.created
    with ChatClient(secure.address, timeout=10, token=token, **mtls(pki)) as client:
        with pytest.raises(grpc.RpcError) as err:
            if rpc == "Chat":
                client.chat_response("Hello", max_new_tokens=2)
            elif rpc == "StreamChat":
                list(client.stream_chunks("Hello", max_new_tokens=2))
            elif rpc == "CountTokens":
                client.count_tokens("Hello")
            else:
                client.model_info()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert "bearer token" in err.value.details()
    assert secure.engine.stats.created == created  # refused before the handler


def test_good_token_over_mtls_works_for_both_rpcs(secure, pki):
    with ChatClient(secure.address, timeout=30, token=TOKEN, **mtls(pki)) as client:
        whole = client.chat_response("What is the capital of France?", temperature=0.0, max_new_tokens=12)
        streamed = "".join(client.stream_chat("What is the capital of France?", temperature=0.0,
                                              max_new_tokens=12))
        assert "Paris" in whole.text and streamed == whole.text
        assert client.model_info().name == "SmolLM2-135M-Instruct"


async def test_async_client_takes_the_same_tls_and_token(secure, pki):
    async with AsyncChatClient(secure.address, timeout=30, token=TOKEN, **mtls(pki)) as client:
        assert (await client.model_info()).max_batch_size == 4


def test_health_is_open_without_a_token(secure, pki):
    with make_channel(secure.address, **mtls(pki)) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_health_port_is_plaintext_without_a_token_and_serves_nothing_else(secure):
    """What Kubernetes' gRPC probes need when TLS is on: grpc.health.v1 in plaintext, no token, on its own port;
    liveness ("") and readiness (chat.v1.ChatService) both SERVING once warmed up. Chat is not there."""
    with grpc.insecure_channel(f"127.0.0.1:{secure.config.health_port}") as plain:
        health = health_pb2_grpc.HealthStub(plain)
        for service in ("", "chat.v1.ChatService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            chat_pb2_grpc.ChatServiceStub(plain).GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(secure.address) as plain, pytest.raises(grpc.RpcError) as err:
        health_status(plain)  # the main port still speaks only TLS
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_listener_serves_tls_with_the_servers_certificate(secure, pki):
    """With TLS on, GET /metrics is HTTPS with the gRPC port's certificate (and its client CA: mTLS)."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    url = f"https://127.0.0.1:{secure.runtime.http.port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert response.status == 200 and b"grpc_server_started_total" in response.read()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()


def test_the_http_apis_take_the_same_tls_and_token(secure, pki):
    """POST / and /v1/chat/completions over HTTPS with the client certificate; the bearer token is required."""
    import json

    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    base = f"https://127.0.0.1:{secure.runtime.http.port}"

    def post(path: str, body: dict, token: str | None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"bearer {token}"} if token else {})}
        request = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert post("/", {"prompt": "Hi", "max_length": 64}, None)[0] == 401
    status, body = post("/", {"prompt": "Hi", "max_length": 64}, TOKEN)
    assert status == 200 and body["response"]
    chat = {"model": secure.engine.loaded.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert post("/v1/chat/completions", chat, "wrong")[0] == 401
    status, body = post("/v1/chat/completions", chat, TOKEN)
    assert status == 200 and body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("peer", ["plaintext", "no client certificate", "client certificate from another CA",
                                  "server not trusted"])
def test_tls_refuses_plaintext_and_untrusted_peers(secure, pki, peer):
    if peer == "plaintext":
        channel = grpc.insecure_channel(secure.address)
    elif peer == "no client certificate":
        channel = make_channel(secure.address, root_certificates=pki["ca"])
    elif peer == "client certificate from another CA":
        channel = make_channel(secure.address, **mtls(pki, certificate_chain=pki["stranger"],
                                                       private_key=pki["stranger_key"]))
    else:  # the client checks the server against its own (rogue) CA only
        channel = make_channel(secure.address, **mtls(pki, root_certificates=pki["stranger"]))
    with channel, pytest.raises(grpc.RpcError) as err:
        health_status(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


def test_reflection_can_be_turned_off(secure, pki):
    with make_channel(secure.address, **mtls(pki)) as channel:
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                        request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(reflect(iter([b""]), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_paused_stream_outlives_keepalive_and_connection_age(secure, pki):
    """With keepalive pings every 250 ms, idle connections closed after 500 ms and connections recycled after
    1 s, a stream whose reader pauses for 2.5 s still gets its whole answer; the channel then reconnects."""
    with ChatClient(secure.address, timeout=60, token=TOKEN, **mtls(pki)) as client:
        chunks = client.stream_chunks("Tell me a story about a cat.", temperature=0.0, max_new_tokens=24,
                                      ignore_eos=True)
        first = next(chunks)
        time.sleep(2.5)  # longer than the keepalive interval, the idle limit and the connection age
        rest = list(chunks)
        assert rest[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert first.token_count + sum(c.token_count for c in rest) == 24
        time.sleep(1.0)  # the connection has no call now: idle and over age, the server closes it
        assert "Paris" in client.chat_response("What is the capital of France?", temperature=0.0,
                                               max_new_tokens=12).text


async def test_tls_without_client_certificates(pki):
    """Plain TLS (no client CA): any client that trusts the server's CA connects. No model is needed to show it:
    health answers, and Chat reaches the servicer (which says the model is still loading)."""
    config = ServerConfig(host="127.0.0.1", port=0, tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]))
    runtime = Runtime(config)
    server, port = create_server(config, runtime)
    await runtime.set_health(NOT_SERVING)  # as serve() does until the model has loaded
    await server.start()
    try:
        # health_check=False: a client that watches health sends nothing to a NOT_SERVING server; this test wants
        # the server's own answer. retry=None: that answer (UNAVAILABLE) as it is, not after retries.
        async with make_channel(f"127.0.0.1:{port}", asynchronous=True, root_certificates=pki["ca"],
                                health_check=False, retry=None) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await chat_pb2_grpc.ChatServiceStub(channel).Chat(chat_pb2.ChatRequest(prompt="Hi"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_cli_takes_tls_files_and_a_token(secure, pki, capsys, monkeypatch):
    from client.cli import main

    tls = ["--target", secure.address, "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"]),
           "--tls-key", str(pki["client_key"])]
    monkeypatch.delenv("CHAT_TOKEN", raising=False)
    assert main([*tls, "--info"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("CHAT_TOKEN", TOKEN)
    assert main([*tls, "--info"]) == 0
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out
