"""A friendly client for chat.v1, shaped like ChatGLM2's `model.chat` / `model.stream_chat`.

    client = ChatClient("localhost:50051")
    response, history = client.chat("Hello")
    for piece in client.stream_chat("And in French?", history=history):
        print(piece, end="")

Over TLS (mTLS with a client certificate) and with a bearer token:

    client = ChatClient("chat.internal:50051", root_certificates="ca.pem", certificate_chain="client.pem",
                        private_key="client.key", token=os.environ["CHAT_TOKEN"])

Several replicas: a `dns:///NAME:PORT` target (every address NAME resolves to) or a comma-separated list of
IP:PORT; calls go round_robin across the replicas that report SERVING, and refusals (UNAVAILABLE,
RESOURCE_EXHAUSTED) are retried on the next one (client/balancing.py):

    client = ChatClient("dns:///chat-headless.default.svc.cluster.local:50051",
                        retry=RetryPolicy(max_attempts=4, max_backoff=1.0))
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.balancing import DEFAULT_RETRY, SERVICE, RetryPolicy, balancing_options, channel_target

History = list[tuple[str, str]]  # [(user, assistant), ...] as ChatGLM2 returns it

# every SamplingParams field but `stop` (its own argument): constraint=chat_pb2.Constraint(...), logit_bias={id: bias}
_PARAMS = tuple(f.name for f in chat_pb2.SamplingParams.DESCRIPTOR.fields if f.name != "stop")


def build_request(prompt: str, history: Sequence[Sequence[str]] | None = None, *, system: str | None = None,
                  stop: Sequence[str] = (), request_id: str = "", priority: int = 0,
                  **params) -> chat_pb2.ChatRequest:
    """A ChatRequest; `params` are SamplingParams fields (max_new_tokens=..., temperature=0, ...). `priority`:
    lower runs first (default 0, within +-1000000)."""
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
    sampling = chat_pb2.SamplingParams(stop=list(stop), **{k: v for k, v in params.items() if v is not None})
    request = chat_pb2.ChatRequest(
        prompt=prompt,
        history=[chat_pb2.Turn(user=u, assistant=a) for u, a in (history or [])],
        params=sampling,
        request_id=request_id,
        priority=priority,
    )
    if system is not None:
        request.system = system
    return request


def history_of(turns) -> History:
    return [(t.user, t.assistant) for t in turns]


Pem = bytes | str | os.PathLike | None  # PEM bytes, or the path of a PEM file


def _pem(value: Pem) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def make_channel(target: str, *, asynchronous: bool = False, tls: bool = False, root_certificates: Pem = None,
                 certificate_chain: Pem = None, private_key: Pem = None, server_name: str | None = None,
                 retry: RetryPolicy | None = DEFAULT_RETRY, wait_for_ready: bool = False, health_check: bool = True,
                 options: Sequence[tuple[str, object]] = ()):
    """A channel to `target` (HOST:PORT, dns:///NAME:PORT, or a comma-separated list of IP:PORT): plaintext
    unless `tls` or any certificate is given. With TLS, the server is checked against `root_certificates`
    (default: the system's roots); `certificate_chain` and `private_key` are the client's own for mTLS;
    `server_name` overrides the name the server's certificate must carry. `retry`, `wait_for_ready` and
    `health_check` shape the service config (client/balancing.py); `options` win over it."""
    target = channel_target(target)
    given = {name for name, _ in options}
    options = [o for o in balancing_options(retry, wait_for_ready=wait_for_ready, health_check=health_check)
               if o[0] not in given] + list(options)
    secure = tls or root_certificates is not None or certificate_chain is not None or private_key is not None
    module = grpc.aio if asynchronous else grpc
    if not secure:
        return module.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                               private_key=_pem(private_key),
                                               certificate_chain=_pem(certificate_chain))
    return module.secure_channel(target, credentials, options=options)


def _call_metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    """The caller's metadata plus `authorization: Bearer <token>` when a token is given."""
    return tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token else ())


class ChatClient:
    """Blocking client. `timeout` is each call's deadline in seconds (all retries included). `token` is sent as
    a bearer token. `target` may name several replicas (see make_channel); `retry` is the gRPC retry policy
    (None: no retries), `wait_for_ready` holds calls until a replica is ready instead of failing at once.
    `tls`, `root_certificates`, `certificate_chain`, `private_key`, `server_name` and `health_check` are
    make_channel's."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 300.0,
                 channel: grpc.Channel | None = None, metadata: Sequence[tuple[str, str]] = (),
                 token: str | None = None, retry: RetryPolicy | None = DEFAULT_RETRY, wait_for_ready: bool = False,
                 **tls):
        self._channel = channel or make_channel(target, retry=retry, wait_for_ready=wait_for_ready, **tls)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = _call_metadata(metadata, token)

    def chat(self, prompt: str, history: Sequence[Sequence[str]] | None = None, **kwargs) -> tuple[str, History]:
        """The whole answer and the updated history."""
        response = self.chat_response(prompt, history, **kwargs)
        return response.text, history_of(response.history)

    def chat_response(self, prompt: str, history=None, *, timeout: float | None = None, **kwargs):
        """The raw ChatResponse (usage, finish reason, model)."""
        return self._stub.Chat(build_request(prompt, history, **kwargs), timeout=timeout or self.timeout,
                               metadata=self.metadata)

    def stream_chat(self, prompt: str, history: Sequence[Sequence[str]] | None = None, *,
                    timeout: float | None = None, **kwargs) -> Iterator[str]:
        """Text pieces of the answer as they are generated."""
        for chunk in self.stream_chunks(prompt, history, timeout=timeout, **kwargs):
            if chunk.delta:
                yield chunk.delta

    def stream_chunks(self, prompt: str, history=None, *, timeout: float | None = None, **kwargs):
        """The raw ChatChunk stream; the last chunk has the finish reason, usage and history."""
        return self._stub.StreamChat(build_request(prompt, history, **kwargs),
                                     timeout=timeout or self.timeout, metadata=self.metadata)

    def model_info(self) -> chat_pb2.GetModelInfoResponse:
        return self._stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=self.timeout,
                                       metadata=self.metadata)

    def count_tokens(self, prompt: str, history=None, *, return_token_ids: bool = False,
                     timeout: float | None = None, **kwargs) -> chat_pb2.CountTokensResponse:
        """What `chat` with the same arguments would take, without running the model: `prompt_tokens` (what its
        usage will say), `context_length`, `max_new_tokens` (the most its answer may have), and the prompt's
        `token_ids` when `return_token_ids`. Raises grpc.RpcError where `chat` would be refused."""
        request = build_request(prompt, history, return_token_ids=return_token_ids, **kwargs)
        return self._stub.CountTokens(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def serving(self, timeout: float = 5.0) -> bool:
        """True when the server is ready (health of chat.v1.ChatService is SERVING), False while it loads the model
        or drains. Raises grpc.RpcError (UNAVAILABLE) when the server can't be reached."""
        check = health_pb2_grpc.HealthStub(self._channel).Check
        status = check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncChatClient:
    """asyncio client with the same methods (and TLS / token arguments) as ChatClient."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 300.0,
                 channel: grpc.aio.Channel | None = None, metadata: Sequence[tuple[str, str]] = (),
                 token: str | None = None, retry: RetryPolicy | None = DEFAULT_RETRY, wait_for_ready: bool = False,
                 **tls):
        self._channel = channel or make_channel(target, asynchronous=True, retry=retry,
                                                wait_for_ready=wait_for_ready, **tls)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = _call_metadata(metadata, token)

    async def chat(self, prompt: str, history=None, **kwargs) -> tuple[str, History]:
        response = await self.chat_response(prompt, history, **kwargs)
        return response.text, history_of(response.history)

    async def chat_response(self, prompt: str, history=None, *, timeout: float | None = None, **kwargs):
        return await self._stub.Chat(build_request(prompt, history, **kwargs), timeout=timeout or self.timeout,
                                     metadata=self.metadata)

    async def stream_chat(self, prompt: str, history=None, *, timeout: float | None = None,
                          **kwargs) -> AsyncIterator[str]:
        async for chunk in self.stream_chunks(prompt, history, timeout=timeout, **kwargs):
            if chunk.delta:
                yield chunk.delta

    def stream_chunks(self, prompt: str, history=None, *, timeout: float | None = None, **kwargs):
        return self._stub.StreamChat(build_request(prompt, history, **kwargs),
                                     timeout=timeout or self.timeout, metadata=self.metadata)

    async def model_info(self) -> chat_pb2.GetModelInfoResponse:
        return await self._stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=self.timeout,
                                             metadata=self.metadata)

    async def count_tokens(self, prompt: str, history=None, *, return_token_ids: bool = False,
                           timeout: float | None = None, **kwargs) -> chat_pb2.CountTokensResponse:
        """ChatClient.count_tokens."""
        request = build_request(prompt, history, return_token_ids=return_token_ids, **kwargs)
        return await self._stub.CountTokens(request, timeout=timeout or self.timeout, metadata=self.metadata)

    async def serving(self, timeout: float = 5.0) -> bool:
        """ChatClient.serving."""
        check = health_pb2_grpc.HealthStub(self._channel).Check
        status = (await check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)).status
        return status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
