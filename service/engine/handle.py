"""The event loop's side of a request: its chunks as they arrive, a way to cancel it, a way to fail it."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from service.engine.request import Chunk, FinishReason, GenerationRequest
from service.failures import RequestFailed


class Waker(Protocol):
    def wake(self) -> None: ...


class RequestHandle:
    """Chunks of one request, delivered by the engine's worker through the event loop."""

    def __init__(self, request: GenerationRequest, waker: Waker, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.chunks: asyncio.Queue[Chunk | RequestFailed] = asyncio.Queue()
        self.cancelled = False  # read by the worker between steps
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None  # when the worker took it from the queue into a prefill
        self._waker = waker

    def fail(self, error: RequestFailed) -> None:
        """End the request with `error` now (its stream raises it). Call on the request's event loop: the
        server does when the engine dies or the drain's grace period runs out."""
        self.chunks.put_nowait(error)

    def cancel(self) -> None:
        """Stop generating for this request; its row leaves the batch at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self._waker.wake()

    async def stream(self):
        """Chunks until every answer's last one (params.n answers, each chunk naming its `index`); raises
        RequestFailed if the request failed. Chunks of one answer that queued up while the caller was busy come
        merged into one, so a slow reader costs fewer writes."""
        unfinished = self.request.params.n
        held: Chunk | RequestFailed | None = None
        while True:
            item = held if held is not None else await self.chunks.get()
            held = None
            while isinstance(item, Chunk) and item.finish_reason == FinishReason.UNSPECIFIED \
                    and not self.chunks.empty():
                following = self.chunks.get_nowait()
                if isinstance(following, Chunk) and following.index != item.index:
                    held = following
                    break
                if isinstance(following, RequestFailed):
                    item = following
                    break
                following.text = item.text + following.text
                following.token_count += item.token_count
                following.tokens = item.tokens + following.tokens
                item = following
            if isinstance(item, RequestFailed):
                raise item
            yield item
            if item.finish_reason != FinishReason.UNSPECIFIED:
                unfinished -= 1
                if not unfinished:
                    return


def deliver(items: list[tuple[RequestHandle, Chunk | RequestFailed]]) -> None:
    """Runs on the event loop: hand each item to its request."""
    for handle, item in items:
        handle.chunks.put_nowait(item)  # a chunk, or the RequestFailed that ends it
