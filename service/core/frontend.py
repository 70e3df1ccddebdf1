"""The transport-neutral request path: admit, validate, submit to the engine, stream its chunks, record metrics
and log one line per request (refusals before any work are summed, one line a second: refusal_log.py). gRPC
(service/grpc/servicer.py) and HTTP call it the same way and say its failures (service/failures.py) their own
way.

Admission comes before the expensive work: the checks that need no tokenizer run first, then the admission
counter, and only admitted requests are tokenized, on a thread of their own, so a burst of calls beyond the
bound is refused without waiting behind tokenization on the event loop.

Counting (`count`: CountTokens, POST /tokenize) takes the same path up to the engine and stops there: the same
checks, the same tokenization on the same thread, the same room for the answer and the same refusals, but no
admission, no engine work and no request record. It is not admitted because it holds nothing while it waits
and nothing after: its whole cost is one tokenization, bounded by --max-prompt-chars, on the one tokenizer
thread (one thread, so the tokenizer is never used from two at once). A flood of counts can delay the
tokenization of admitted Chat requests, never their decoding; gRPC's own stream limits bound it as they bound
GetModelInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.config import ServerConfig
from service.core import validation
from service.core.record import RequestRecord
from service.core.refusal_log import SUMMED, RefusalLog
from service.core.types import Answer, ChatInput, ChoiceAnswer, Chunk, FinishReason, TokenCount
from service.engine.constraint import Grammars
from service.engine.engine import Engine, RequestHandle
from service.failures import Failure, RequestFailed, Status, left_early
from service.metrics import EngineView, Metrics
from service.models.base import Turn

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is configured
    from service.grpc.tracing import Tracing

log = logging.getLogger("service.requests")

RETRY_PUSHBACK_MS = 500  # what a refusal for a full queue tells retrying clients to wait (grpc-retry-pushback-ms)


@dataclass
class Admission:
    """A bound on requests admitted at once (running plus queued), independent of gRPC's own limits."""

    limit: int
    active: int = 0
    draining: bool = False

    def try_enter(self) -> Failure | None:
        """None if admitted, else why not (DRAINING or FULL)."""
        if self.draining:
            return Failure.DRAINING
        if self.active >= self.limit:
            return Failure.FULL
        self.active += 1
        return None

    def leave(self) -> None:
        self.active -= 1

    def drain(self) -> None:
        """Admit nothing from now on (DRAINING)."""
        self.draining = True

    def reopen(self) -> None:
        """Admit again after a drain that was called off."""
        self.draining = False


@dataclass
class Admitted:
    """One admitted request, between `Frontend.start` and the end of `Frontend.stream` (or `run`)."""

    chat: ChatInput
    handle: RequestHandle
    arrived: float  # time.monotonic() when the transport handed it over
    created: float  # time.time() then: the answer's `created`
    model: str
    answer: Answer | None = None  # set by `Frontend.stream` with the last chunk
    choices: dict[int, ChoiceAnswer] = field(default_factory=dict)  # each answer once its last chunk came


OnChunk = Callable[[Chunk], Awaitable[None]]


class Frontend:
    """The request path every transport shares. The engine is set once the model has loaded; until then calls
    fail with LOADING.

    Every admitted request is in `active` until `stream` (or `run`) ends, so the server can end them all with a
    clear status (`fail_all`) when the engine dies or the drain's grace period runs out.
    """

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None, tracing: Tracing | None = None):
        self.config = config
        self.metrics = metrics
        self.tracing = tracing  # a service.grpc.tracing.Tracing with --otlp-endpoint: spans get the figures
        self.engine: Engine | None = None
        self.admission = Admission(config.limits.max_queued_requests)
        self.active: set[RequestHandle] = set()
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.refusals = RefusalLog()
        self._grammars = None  # (the loaded model, its Grammars), made by the first constrained request

    @property
    def model(self) -> str:
        return self.engine.loaded.name if self.engine is not None else ""

    def token_bytes(self, token: int) -> bytes:
        """A generated token's bytes, from the served model's tokenizer (the transports' TokenInfo and logprobs)."""
        return self.engine.loaded.tokenizer.token_bytes(token)

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        if self.metrics is not None:
            self.metrics.watch_engine(self.engine_view)

    def engine_view(self) -> EngineView | None:
        engine = self.engine
        if engine is None:
            return None
        stats = engine.stats
        return EngineView(model=engine.loaded.name, running=stats.running, waiting=stats.waiting,
                          kv_tokens=stats.kv_tokens, kv_capacity=stats.kv_capacity_tokens,
                          prefix_queried_tokens=stats.prefix_queried_tokens, prefix_hit_tokens=stats.reused_tokens,
                          preemptions=stats.preempted, kv_blocks_held=stats.kv_blocks_held,
                          kv_blocks_cached=stats.kv_blocks_cached, masked_rows=stats.masked_rows,
                          mask_seconds=stats.mask_seconds)

    def close(self) -> None:
        self.refusals.flush()
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # ---- admission and submission -------------------------------------------------------------------------

    async def start(self, chat: ChatInput, timeout: float | None) -> Admitted:
        """Check, admit, tokenize and submit `chat`; raises RequestFailed (recorded and logged) if it can't run.
        `timeout` is the caller's remaining time in seconds, if any."""
        arrived = time.monotonic()
        deadline = None if timeout is None else arrived + timeout
        try:
            return await self._start(chat, arrived, deadline)
        except RequestFailed as failed:
            if failed.kind in SUMMED:  # counted per request, logged once a second
                self._record(chat.request_id, RequestRecord(model=self.model, code=failed.kind.status))
                self.refusals.add(failed.kind)
            else:
                self._end_refused(chat, arrived, failed.kind.status)
            raise
        except asyncio.CancelledError:  # the caller left while its prompt was being tokenized
            self._end_refused(chat, arrived, Status.CANCELLED)
            raise
        except Exception:  # a bug; the transport reports it as INTERNAL
            self._end_refused(chat, arrived, Status.INTERNAL)
            raise

    def _checked(self, chat: ChatInput) -> Engine:
        """The engine, once `chat` passed the checks that need no tokenizer; DRAINING or LOADING before them."""
        engine = self.engine
        if self.admission.draining:
            raise _draining()
        if engine is None:
            raise RequestFailed(Failure.LOADING, "the model is still loading; retry shortly")
        # engine.max_context: the model's context, or less: --max-model-len, the KV pool
        validation.check_input(chat, self.config.limits, engine.max_context, engine.loaded.vocab_size)
        return engine

    async def _start(self, chat: ChatInput, arrived: float, deadline: float | None) -> Admitted:
        engine = self._checked(chat)
        context_length = engine.max_context
        refused = self.admission.try_enter()
        if refused is Failure.FULL:
            raise RequestFailed(Failure.FULL, f"server is at its limit of {self.admission.limit} requests; "
                                "retry later", retry_after_ms=RETRY_PUSHBACK_MS)
        if refused is Failure.DRAINING:
            raise _draining()
        try:
            generation = await self._prepare(chat, engine, context_length, deadline)
            handle = engine.submit(generation)
        except BaseException:  # refused (RequestFailed), the caller gone, or a bug: it leaves at once
            self.admission.leave()
            raise
        self.active.add(handle)
        return Admitted(chat=chat, handle=handle, arrived=arrived, created=time.time(), model=engine.loaded.name)

    async def _encode(self, chat: ChatInput, engine: Engine) -> list[int]:
        """The prompt ids, tokenized on the tokenizer thread, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer, validation.encode_prompt, chat, engine.loaded.tokenizer)

    async def _prepare(self, chat: ChatInput, engine: Engine, context_length: int, deadline: float | None):
        """Tokenize (and compile the constraint) off the event loop, then resolve the sampling parameters."""
        prompt_ids = await self._encode(chat, engine)
        defaults = self.config.defaults.for_model(engine.loaded.default_max_length)
        request = validation.make_request(chat, prompt_ids, defaults=defaults,
                                          context_length=context_length, deadline=deadline)
        if chat.params.constraint is not None:
            loop = asyncio.get_running_loop()
            request.constraint = await loop.run_in_executor(self._tokenizer, self._compile, chat, engine)
        return request

    def _compile(self, chat: ChatInput, engine: Engine):
        """The request's constraint compiled for the served model's tokenizer (on the tokenizer thread; the
        model's llguidance tokenizer is built by the first constrained request, ~0.5 s for 49152 ids). RequestFailed
        (INVALID, naming the field) if it is bad."""
        if self._grammars is None or self._grammars[0] is not engine.loaded:
            self._grammars = engine.loaded, Grammars(engine.loaded.tokenizer, engine.loaded.vocab_size)
        return self._grammars[1].compile(chat.params.constraint)

    # ---- counting ----------------------------------------------------------------------------------------

    async def count(self, chat: ChatInput) -> TokenCount:
        """What `start` would make of `chat`, found without the engine: its prompt ids, the context and the room
        for the answer. Raises the RequestFailed that `start` would (DRAINING, LOADING, INVALID), except FULL:
        counting is not admitted (see the module's docstring), and it is not recorded as a request."""
        engine = self._checked(chat)
        prompt_ids = await self._encode(chat, engine)
        defaults = self.config.defaults.for_model(engine.loaded.default_max_length)
        room = validation.answer_room(chat.params, defaults, len(prompt_ids), engine.max_context)
        if chat.params.constraint is not None:  # refused where Chat would refuse it
            await asyncio.get_running_loop().run_in_executor(self._tokenizer, self._compile, chat, engine)
        return TokenCount(prompt_ids=tuple(prompt_ids), context_length=engine.max_context, max_new_tokens=room)

    # ---- running -----------------------------------------------------------------------------------------

    async def run(self, admitted: Admitted, on_chunk: OnChunk | None = None) -> Answer:
        """The answer (forwarding the engine's chunks to `on_chunk`, if given); raises RequestFailed if the
        engine fails the request. Whatever happens, the request leaves the engine and the admission count, and
        is recorded and logged once (see `stream`)."""
        async with contextlib.aclosing(self.stream(admitted)) as chunks:
            async for chunk in chunks:
                if on_chunk is not None:
                    await on_chunk(chunk)
        return admitted.answer

    async def stream(self, admitted: Admitted) -> AsyncIterator[Chunk]:
        """The engine's chunks for an admitted request; `admitted.answer` is set before the last one is yielded.
        Raises RequestFailed if the engine fails the request. Use it with `contextlib.aclosing`, so that a
        consumer who stops early (a caller gone) ends the request at once: it then leaves the engine and the
        admission count, and is recorded and logged once."""
        handle = admitted.handle
        first_token_at = last_token_at = None
        first_tokens = received = 0
        parts: dict[int, list[str]] = {}
        tokens: dict[int, list] = {}
        last: Chunk | None = None
        code = Status.OK
        try:
            async for chunk in handle.stream():
                if chunk.token_count:
                    last_token_at = time.monotonic()
                    if first_token_at is None:
                        first_token_at, first_tokens = last_token_at, chunk.token_count
                    received += chunk.token_count
                parts.setdefault(chunk.index, []).append(chunk.text)
                tokens.setdefault(chunk.index, []).extend(chunk.tokens)
                last = chunk
                if chunk.finish_reason != FinishReason.UNSPECIFIED:
                    self._finish_choice(admitted, chunk, "".join(parts[chunk.index]), tuple(tokens[chunk.index]))
                yield chunk
        except RequestFailed as failed:
            code = failed.kind.status
            raise
        except (asyncio.CancelledError, ConnectionError, GeneratorExit):
            if admitted.answer is None:  # gone before the answer was complete
                deadline = handle.request.deadline
                code = left_early(deadline is not None and time.monotonic() >= deadline)
            raise
        except BaseException:
            code = Status.INTERNAL
            raise
        finally:
            handle.cancel()  # a caller who has gone stops the generation at the next step
            self.active.discard(handle)
            self.admission.leave()
            completion = admitted.answer.completion_tokens if admitted.answer is not None else received
            itl = None
            if last_token_at is not None and completion > first_tokens:
                itl = (last_token_at - first_token_at) / (completion - first_tokens)
            self._end(admitted, code, last, completion, first_token_at, itl)

    @staticmethod
    def _finish_choice(admitted: Admitted, chunk: Chunk, text: str, tokens: tuple) -> None:
        """Answer `chunk.index` is complete; once all are, `admitted.answer` holds them (choice 0 in front)."""
        chat = admitted.chat
        admitted.choices[chunk.index] = ChoiceAnswer(
            index=chunk.index, text=text, history=chat.history + (Turn(user=chat.prompt, assistant=text),),
            finish_reason=chunk.finish_reason, completion_tokens=chunk.completion_tokens, tokens=tokens,
            stop_sequence=chunk.stop_sequence)
        if len(admitted.choices) < admitted.handle.request.params.n:
            return
        choices = tuple(admitted.choices[i] for i in sorted(admitted.choices))
        first = choices[0]
        admitted.answer = Answer(
            text=first.text,
            history=first.history,
            prompt_tokens=chunk.prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in choices),
            finish_reason=first.finish_reason,
            model=admitted.model,
            created=admitted.created,
            cached_prompt_tokens=chunk.cached_prompt_tokens,
            choices=choices,
            tokens=first.tokens,
            stop_sequence=first.stop_sequence,
        )

    def fail_all(self, error: RequestFailed) -> int:
        """End every admitted request with `error` (its `run` raises it). Call on the server's event loop.
        Returns how many there were."""
        for handle in self.active:
            handle.fail(error)
        return len(self.active)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no admitted request is left, False if `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self.active or self.admission.active:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # ---- the record of each request ------------------------------------------------------------------------

    def _end(self, admitted: Admitted, code: Status, last: Chunk | None, completion: int,
             first_token_at: float | None, itl: float | None) -> None:
        now = time.monotonic()
        handle = admitted.handle
        finish = admitted.answer.finish_reason if admitted.answer is not None else None
        ttft = first_token_at - admitted.arrived if first_token_at is not None else None
        scheduled = handle.scheduled_at
        self._record(handle.request.request_id, RequestRecord(
            model=admitted.model, code=code, finish_reason=finish.name if finish else None,
            prompt_tokens=len(handle.request.prompt_ids), completion_tokens=completion,
            cached_prompt_tokens=last.cached_prompt_tokens if last is not None else 0, admitted=True,
            e2e=now - admitted.arrived, queue_time=scheduled - handle.submitted_at if scheduled else None,
            ttft=ttft, itl=itl))
        extra = f" prompt={admitted.chat.prompt!r}" if self.config.log_prompts else ""
        log.info("request id=%s status=%s prompt_tokens=%d completion_tokens=%d ttft=%s duration=%.3fs finish=%s%s",
                 handle.request.request_id, code.name, len(handle.request.prompt_ids), completion,
                 f"{ttft:.3f}s" if ttft is not None else "-", now - admitted.arrived,
                 finish.name if finish else "-", extra)

    def _end_refused(self, chat: ChatInput, arrived: float, code: Status) -> None:
        self.record_unanswered(chat.request_id, arrived, code)

    def record_unanswered(self, request_id: str, arrived: float, code: Status) -> None:
        """Record and log a request that never reached the engine, e.g. one a transport failed on a bug before
        handing it over."""
        self._record(request_id, RequestRecord(model=self.model, code=code))
        log.info("request id=%s status=%s prompt_tokens=0 completion_tokens=0 ttft=- duration=%.3fs finish=-",
                 request_id or "-", code.name, time.monotonic() - arrived)

    def _record(self, request_id: str, record: RequestRecord) -> None:
        if self.metrics is not None:
            self.metrics.record(record)
        if self.tracing is not None:
            self.tracing.annotate(request_id, record)


def _draining() -> RequestFailed:
    return RequestFailed(Failure.DRAINING, "the server is shutting down; retry elsewhere")
