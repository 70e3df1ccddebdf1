"""chat.v1.ChatService handlers: convert, delegate to the frontend, convert back; failures become their gRPC codes."""

from __future__ import annotations

import contextlib

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc

from service.config import ServerConfig
from service.core.frontend import Admitted, Frontend
from service.core.types import FinishReason
from service.core.validation import MAX_TOP_LOGPROBS
from service.failures import RequestFailed
from service.grpc import convert

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6: how long a retrying client should wait
CONSTRAINT_KINDS = (chat_pb2.CONSTRAINT_KIND_JSON_SCHEMA, chat_pb2.CONSTRAINT_KIND_JSON_OBJECT,
                    chat_pb2.CONSTRAINT_KIND_REGEX, chat_pb2.CONSTRAINT_KIND_CHOICE, chat_pb2.CONSTRAINT_KIND_GRAMMAR)


def _trailers(failed: RequestFailed) -> tuple[tuple[str, str], ...]:
    """A full queue's refusal tells retrying clients how long to wait (grpc-retry-pushback-ms)."""
    return () if failed.retry_after_ms is None else ((PUSHBACK_KEY, str(failed.retry_after_ms)),)


def set_status(context: grpc.aio.ServicerContext, failed: RequestFailed) -> None:
    """Give the call the failure's status, sent when the handler returns; before any response, that is a
    Trailers-Only response."""
    context.set_code(grpc.StatusCode[failed.kind.status.name])
    context.set_details(str(failed))
    context.set_trailing_metadata(_trailers(failed))


async def abort(context: grpc.aio.ServicerContext, failed: RequestFailed) -> None:
    """End the call with the failure's status now (raises grpc.aio.AbortError); refusals are Trailers-Only."""
    await context.abort(grpc.StatusCode[failed.kind.status.name], str(failed), trailing_metadata=_trailers(failed))


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Thin handlers over the transport-neutral Frontend."""

    def __init__(self, config: ServerConfig, frontend: Frontend):
        self.config = config
        self.frontend = frontend

    async def _start(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> Admitted:
        try:
            return await self.frontend.start(convert.chat_input(request), context.time_remaining())
        except RequestFailed as failed:
            await abort(context, failed)

    async def Chat(self, request, context):
        admitted = await self._start(request, context)
        try:
            answer = await self.frontend.run(admitted)
        except RequestFailed as failed:
            await abort(context, failed)
        return convert.chat_response(answer, self.frontend.token_bytes)

    async def StreamChat(self, request, context):
        """An async generator (not context.write), so interceptors that wrap streaming handlers as generators,
        such as OpenTelemetry's, work with it. A refused stream ends by returning with its status set, which
        costs less than raising an abort through the generators of every interceptor."""
        try:
            admitted = await self.frontend.start(convert.chat_input(request), context.time_remaining())
        except RequestFailed as failed:
            set_status(context, failed)
            return
        model, token_bytes = admitted.model, self.frontend.token_bytes
        try:
            async with contextlib.aclosing(self.frontend.stream(admitted)) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason == FinishReason.UNSPECIFIED:
                        yield convert.chunk_pb(chunk, model, token_bytes)
                    else:
                        yield convert.last_chunk(admitted.choices[chunk.index], chunk, model, admitted.created,
                                                 token_bytes)
        except RequestFailed as failed:
            await abort(context, failed)

    async def GetModelInfo(self, request, context):
        engine = self.frontend.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        limits = self.config.limits
        model = engine.loaded.model
        return chat_pb2.GetModelInfoResponse(
            name=engine.loaded.name,
            context_length=engine.max_context,  # the model's, or less: --max-model-len, the KV pool
            default_params=convert.default_params(self.config.defaults.for_model(engine.loaded.default_max_length)),
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            max_batch_size=limits.max_batch_size,
            max_queued_requests=limits.max_queued_requests,
            kv_cache_tokens=engine.stats.kv_capacity_tokens,
            weight_format=int(engine.loaded.weight_format),
            eos_token_ids=sorted(engine.loaded.tokenizer.eos_token_ids),
            vocab_size=engine.loaded.vocab_size,
            constraint_kinds=list(CONSTRAINT_KINDS),
            max_n=limits.max_n,
            max_top_logprobs=MAX_TOP_LOGPROBS,
        )

    async def CountTokens(self, request, context):
        """The request's prompt tokens, the context and the room for the answer, with Chat's checks and refusals
        and no engine work (Frontend.count)."""
        try:
            count = await self.frontend.count(convert.chat_input(request))
        except RequestFailed as failed:
            await abort(context, failed)
        return convert.count_tokens_response(count, with_ids=request.params.return_token_ids)
