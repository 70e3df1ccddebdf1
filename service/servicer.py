"""chat.v1.ChatService handlers: convert, validate, delegate to the engine, convert back."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc

from service.config import ServerConfig
from service.engine.engine import Engine, EngineError, RequestHandle
from service.models.base import Turn
from service.types import Answer, ChatInput, FinishReason, defaults_to_pb
from service.validation import InvalidRequest, build_request

log = logging.getLogger("service.requests")

_ENGINE_STATUS = {
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


@dataclass
class Admission:
    """A bound on requests admitted at once (running plus queued), independent of gRPC's own limits."""

    limit: int
    active: int = 0
    draining: bool = False

    def try_enter(self) -> str | None:
        """None if admitted, else why not."""
        if self.draining:
            return "draining"
        if self.active >= self.limit:
            return "full"
        self.active += 1
        return None

    def leave(self) -> None:
        self.active -= 1


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Thin handlers. The engine is set once the model has loaded; until then calls get UNAVAILABLE.

    Every admitted request is in `active` until its handler ends, so the server can end them all with a
    clear status (`fail_all`) when the engine dies or the drain's grace period runs out.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine: Engine | None = None
        self.admission = Admission(config.limits.max_queued_requests)
        self.active: set[RequestHandle] = set()

    def fail_all(self, error: EngineError) -> int:
        """End every admitted request with `error` (its handler aborts with the matching status). Call on
        the server's event loop. Returns how many there were."""
        for handle in self.active:
            handle.chunks.put_nowait(error)
        return len(self.active)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no admitted request is left, False if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self.active or self.admission.active:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _start(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        """Validate, admit and submit; aborts the call with a clear status when it can't run."""
        engine = self.engine
        if self.admission.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        chat = ChatInput.from_pb(request)
        try:
            generation = build_request(
                chat,
                tokenizer=engine.loaded.tokenizer,
                defaults=self.config.defaults,
                limits=self.config.limits,
                context_length=min(engine.loaded.context_length, self.config.limits.kv_cache_tokens),
                timeout=context.time_remaining(),
            )
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        refused = self.admission.try_enter()
        if refused == "full":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server is at its limit of {self.admission.limit} requests; retry later")
        if refused == "draining":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
        try:
            handle = engine.submit(generation)
        except EngineError as err:
            self.admission.leave()
            await context.abort(_ENGINE_STATUS[err.kind], str(err))
        self.active.add(handle)
        return chat, handle

    async def _run(self, chat: ChatInput, handle: RequestHandle, context, on_text):
        """Forward the engine's chunks to `on_text`; returns the answer. Logs one line per request."""
        started = time.monotonic()
        first_token_at = None
        parts: list[str] = []
        status = "OK"
        last = None
        try:
            async for chunk in handle.stream():
                if first_token_at is None and chunk.token_count:
                    first_token_at = time.monotonic()
                parts.append(chunk.text)
                last = chunk
                await on_text(chunk)
            text = "".join(parts)
            return Answer(
                text=text,
                history=chat.history + (Turn(user=chat.prompt, assistant=text),),
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                finish_reason=last.finish_reason,
                model=self.engine.loaded.name,
            )
        except EngineError as err:
            status = _ENGINE_STATUS[err.kind].name
            await context.abort(_ENGINE_STATUS[err.kind], str(err))
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            handle.cancel()  # a caller who has gone stops the generation at the next step
            self.active.discard(handle)
            self.admission.leave()
            self._log(chat, handle, started, first_token_at, last, status)

    def _log(self, chat, handle, started, first_token_at, last, status) -> None:
        request = handle.request
        ttft = f"{first_token_at - started:.3f}s" if first_token_at else "-"
        extra = f" prompt={chat.prompt!r}" if self.config.log_prompts else ""
        log.info(
            "request id=%s status=%s prompt_tokens=%d completion_tokens=%d ttft=%s duration=%.3fs finish=%s%s",
            request.request_id, status, len(request.prompt_ids), last.completion_tokens if last else 0,
            ttft, time.monotonic() - started,
            FinishReason(last.finish_reason).name if last else "-", extra,
        )

    async def Chat(self, request, context):
        chat, handle = await self._start(request, context)

        async def ignore(_chunk):
            return None

        answer = await self._run(chat, handle, context, ignore)
        return answer.to_pb()

    async def StreamChat(self, request, context):
        chat, handle = await self._start(request, context)
        queue: asyncio.Queue = asyncio.Queue()
        created = time.time()
        model = self.engine.loaded.name

        async def forward(chunk):
            if chunk.finish_reason == FinishReason.UNSPECIFIED:
                await context.write(chat_pb2.ChatChunk(delta=chunk.text, token_count=chunk.token_count,
                                                       model=model))
            else:
                queue.put_nowait(chunk)

        answer = await self._run(chat, handle, context, forward)
        last = queue.get_nowait()
        answer.created = created
        await context.write(answer.last_chunk_pb(last.text, last.token_count))

    async def GetModelInfo(self, request, context):
        engine = self.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        limits = self.config.limits
        model = engine.loaded.model
        return chat_pb2.GetModelInfoResponse(
            name=engine.loaded.name,
            context_length=engine.loaded.context_length,
            default_params=defaults_to_pb(self.config.defaults),
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            max_batch_size=limits.max_batch_size,
            max_queued_requests=limits.max_queued_requests,
            kv_cache_tokens=limits.kv_cache_tokens,
        )
