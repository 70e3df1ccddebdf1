"""A friendly client for chat.v1, shaped like ChatGLM2's `model.chat` / `model.stream_chat`.

    client = ChatClient("localhost:50051")
    response, history = client.chat("Hello")
    for piece in client.stream_chat("And in French?", history=history):
        print(piece, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc

History = list[tuple[str, str]]  # [(user, assistant), ...] as ChatGLM2 returns it

_PARAMS = ("max_length", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
           "ignore_eos")


def build_request(prompt: str, history: Sequence[Sequence[str]] | None = None, *, system: str | None = None,
                  stop: Sequence[str] = (), request_id: str = "", **params) -> chat_pb2.ChatRequest:
    """A ChatRequest; `params` are SamplingParams fields (max_new_tokens=..., temperature=0, ...)."""
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
    sampling = chat_pb2.SamplingParams(stop=list(stop), **{k: v for k, v in params.items() if v is not None})
    request = chat_pb2.ChatRequest(
        prompt=prompt,
        history=[chat_pb2.Turn(user=u, assistant=a) for u, a in (history or [])],
        params=sampling,
        request_id=request_id,
    )
    if system is not None:
        request.system = system
    return request


def history_of(turns) -> History:
    return [(t.user, t.assistant) for t in turns]


class ChatClient:
    """Blocking client. `timeout` is each call's deadline in seconds."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 300.0,
                 channel: grpc.Channel | None = None, metadata: Sequence[tuple[str, str]] = ()):
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncChatClient:
    """asyncio client with the same methods as ChatClient."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = 300.0,
                 channel: grpc.aio.Channel | None = None, metadata: Sequence[tuple[str, str]] = ()):
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

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

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
