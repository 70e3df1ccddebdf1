"""The engine: one worker thread owns the model and decodes every admitted request in one continuous batch.

The event loop calls `submit` and reads chunks from the returned handle; it never touches the model.
Between decode steps the worker admits waiting requests (prefill, then merge into the batch), drops
cancelled or expired ones, and hands every row's new text to the event loop in one call per step.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from service.config import Limits
from service.engine import attention
from service.engine import batch as kv
from service.engine.prefix_cache import PrefixCache
from service.engine.sampling import make_generator, next_tokens
from service.engine.text import TextStream
from service.models.base import LoadedModel
from service.types import Chunk, FinishReason, GenerationRequest

log = logging.getLogger(__name__)

MIN_REUSED_PREFIX = 64  # shorter shared prefixes are cheaper to recompute in a batched prefill
MIN_REUSED_SHARE = 0.5  # ...and so are prefixes covering less than half the prompt: reuse extends one row at a time


class EngineError(Exception):
    """A request failed inside the engine. `kind` is "resource_exhausted", "internal" or "unavailable"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class RequestHandle:
    """The event loop's side of one request: its chunks, and a way to cancel it."""

    def __init__(self, request: GenerationRequest, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.chunks: asyncio.Queue[Chunk | EngineError] = asyncio.Queue()
        self.cancelled = False  # read by the worker between steps
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None  # when the worker took it from the queue into a prefill
        self._engine = engine

    def cancel(self) -> None:
        """Stop generating for this request; its row leaves the batch at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self._engine.wake()

    async def stream(self):
        """Chunks until the last one; raises EngineError if the engine failed the request. Chunks that
        queued up while the caller was busy come merged into one, so a slow reader costs fewer writes."""
        while True:
            item = await self.chunks.get()
            while isinstance(item, Chunk) and item.finish_reason == FinishReason.UNSPECIFIED \
                    and not self.chunks.empty():
                following = self.chunks.get_nowait()
                if isinstance(following, EngineError):
                    item = following
                    break
                following.text = item.text + following.text
                following.token_count += item.token_count
                item = following
            if isinstance(item, EngineError):
                raise item
            yield item
            if item.finish_reason != FinishReason.UNSPECIFIED:
                return


@dataclass
class Row:
    """Worker-side state of one request."""

    handle: RequestHandle
    text: TextStream
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_tokens: int = 0
    finish: FinishReason = FinishReason.UNSPECIFIED

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    def reserved_tokens(self) -> int:
        """KV positions this row may grow to."""
        return len(self.request.prompt_ids) + self.request.params.max_new_tokens


@dataclass
class EngineStats:
    """Counters read by tests, GetModelInfo and the logs."""

    created: int = 0
    released: int = 0
    running: int = 0
    waiting: int = 0
    kv_tokens: int = 0
    steps: int = 0
    prefix_hits: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefilled: int = 0  # requests that reached the model (prefill)
    cancelled_in_queue: int = 0  # left the queue because the caller went away; never reached the model
    expired_in_queue: int = 0  # left the queue because their deadline passed; never reached the model
    dropped_running: int = 0  # left the batch mid-generation: caller gone or deadline passed
    failed_steps: int = 0  # model steps that raised (their requests failed)


class Engine:
    """Continuous batching over a single worker thread."""

    def __init__(self, loaded: LoadedModel, limits: Limits):
        self.loaded = loaded
        self.limits = limits
        self.stats = EngineStats()
        self._incoming: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None  # the worker, once started
        self._executor: ThreadPoolExecutor | None = None
        self._done: Future | None = None
        self._ids = itertools.count()
        self.fault_hook = None  # tests only: called before each model step; may raise
        self.failed: BaseException | None = None  # set when the worker died
        # Worker-thread state.
        self._waiting: collections.deque[Row] = collections.deque()
        self._rows: list[Row] = []
        self._joining: list[Row] = []  # taken from the queue, not yet in the batch
        self._batch: kv.KVBatch | None = None
        self._prefixes = PrefixCache(limits.prefix_cache_tokens)
        self._outbox: list[tuple[RequestHandle, Chunk | EngineError]] = []
        kv.check_supported(loaded.model)
        attention.install(loaded.model)
        pad = getattr(loaded.model.generation_config, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else min(loaded.tokenizer.eos_token_ids)

    # ---- event-loop side -------------------------------------------------------------------------

    def start(self, executor: ThreadPoolExecutor | None = None) -> None:
        """Run the batching loop on `executor`'s single thread, or on a new one.

        Pass the executor that loaded the model: torch ops on CPU are much slower on a thread other than the
        one that first ran them (measured: 35 ms a token on the loading thread, 54 ms on another, 2 threads),
        because each thread gets its own OpenMP pool and the idle one competes for the cores.
        """
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-worker")
        running = threading.Event()

        def run() -> None:
            self._thread = threading.current_thread()
            running.set()
            self._run()

        self._done = self._executor.submit(run)
        running.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever is left as unavailable, end the loop and join the worker thread."""
        self._stopping.set()
        self.wake()
        if self._done is None:
            return
        try:
            self._done.result(timeout)
        except FutureTimeout:
            log.error("the engine worker did not stop within %.1f s", timeout)
            return
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._done is not None and not self._done.done() and self.failed is None

    def wake(self) -> None:
        self._wakeup.set()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; read its chunks from the handle. Call from the event loop."""
        if not self.alive:
            raise EngineError("unavailable", "the engine is not running")
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        handle = RequestHandle(request, self, asyncio.get_running_loop())
        self.stats.created += 1
        self._incoming.put(handle)
        self.wake()
        return handle

    # ---- worker side -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._iterate()
        except BaseException as err:  # the worker cannot go on; callers must not hang
            self.failed = err
            log.exception("engine worker died")
        finally:
            self._fail_everyone(EngineError("unavailable", "the engine stopped"))

    def _iterate(self) -> None:
        self._take_incoming()
        self._drop_gone()
        if not self._rows and not self._waiting:
            self._wakeup.wait(0.5)
            self._wakeup.clear()
            return
        try:
            self._admit()
            if self._rows:
                self._step()
        except Exception as err:  # one bad step fails its requests, not the server
            self._fail_step(err)
        self._publish()

    def _take_incoming(self) -> None:
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                return
            params = handle.request.params
            self._waiting.append(Row(handle=handle, text=TextStream(self.loaded.tokenizer, params.stop),
                                     generator=make_generator(params, self.loaded.model.device)))

    def _drop_gone(self) -> None:
        """Rows whose caller cancelled or whose deadline passed leave at once, queued or running."""
        now = time.monotonic()

        def gone(row: Row) -> bool:
            deadline = row.request.deadline
            return row.handle.cancelled or (deadline is not None and now > deadline)

        for row in [r for r in self._waiting if gone(r)]:
            self._waiting.remove(row)
            if row.request.deadline is not None and now > row.request.deadline:
                self.stats.expired_in_queue += 1
            else:
                self.stats.cancelled_in_queue += 1
            self._finish(row, FinishReason.CANCELLED)
        if any(gone(r) for r in self._rows):
            for row in self._rows:
                if gone(row):
                    row.finish = FinishReason.CANCELLED
                    self.stats.dropped_running += 1
            self._release_finished()
        self._publish()

    def _fits(self, candidate: Row, count: int, widest: int) -> bool:
        rows = count + 1
        widest = max(widest, candidate.reserved_tokens())
        return rows <= self.limits.max_batch_size and rows * widest <= self.limits.kv_cache_tokens

    def _admit(self) -> None:
        """Prefill waiting requests that fit the batch and the KV budget, then merge them in."""
        widest = max((r.reserved_tokens() for r in self._rows), default=0)
        joining = self._joining
        while self._waiting and self._fits(self._waiting[0], len(self._rows) + len(joining), widest):
            row = self._waiting.popleft()
            widest = max(widest, row.reserved_tokens())
            joining.append(row)
        if not joining:
            return
        self._check_fault()
        self.stats.prefilled += len(joining)
        fresh = []
        now = time.monotonic()
        for row in list(joining):
            prompt = row.request.prompt_ids
            row.handle.scheduled_at = now
            self.stats.prefix_queried_tokens += len(prompt)
            reused = self._prefixes.lookup(prompt, max(MIN_REUSED_PREFIX, int(MIN_REUSED_SHARE * len(prompt))))
            if reused is None:
                fresh.append(row)
                continue
            part, logits = self._prefill_from(reused, row)
            self._join(part, [row], logits)
        if fresh:
            part, logits = kv.prefill(self.loaded.model, [r.request.prompt_ids for r in fresh], self._pad_id)
            self._join(part, fresh, logits)

    def _prefill_from(self, reused: kv.KVBatch, row: Row):
        """Extend a cached prefix with the rest of this row's prompt."""
        prompt = row.request.prompt_ids
        self.stats.prefix_hits += 1
        self.stats.reused_tokens += reused.width
        logits = kv.extend(self.loaded.model, reused, prompt[reused.width:])
        return reused, logits

    def _join(self, part: kv.KVBatch, rows: list[Row], logits: torch.Tensor) -> None:
        self._batch = kv.merge(self._batch, part)
        self._rows.extend(rows)
        self._joining = [r for r in self._joining if r not in rows]
        self._accept(rows, logits)

    def _step(self) -> None:
        """Decode one token for every row."""
        self._check_fault()
        last = torch.tensor([r.generated[-1] for r in self._rows], dtype=torch.long,
                            device=self.loaded.model.device)  # [B]
        logits = kv.decode_one_token(self.loaded.model, self._batch, last)  # [B, V]
        self.stats.steps += 1
        self._accept(self._rows, logits)

    def _check_fault(self) -> None:
        if self.fault_hook is not None:
            self.fault_hook()

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, turn it into text, and finish rows that are done."""
        device = logits.device
        seen = [torch.tensor(r.request.prompt_ids + r.generated, device=device)
                if r.request.params.repetition_penalty != 1.0 else None for r in rows]
        tokens = next_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows], seen)
        eos = self.loaded.tokenizer.eos_token_ids
        for row, token in zip(rows, tokens, strict=True):
            row.generated.append(token)
            params = row.request.params
            if token in eos and not params.ignore_eos:
                row.finish = FinishReason.STOP
                row.pending_tokens += 1
                continue
            if len(row.generated) >= params.max_new_tokens:
                row.finish = FinishReason.LENGTH
            row.pending_text += row.text.advance([token], final=row.finish != FinishReason.UNSPECIFIED)
            row.pending_tokens += 1
            if row.text.hit_stop:
                row.finish = FinishReason.STOP_SEQUENCE
        self._flush(rows)
        self._release_finished()

    def _flush(self, rows: list[Row]) -> None:
        """Queue each row's new text for the event loop (sent in one call per step)."""
        for row in rows:
            if row.finish != FinishReason.UNSPECIFIED:
                continue  # `_finish` sends the rest with the last chunk
            if row.pending_text:
                self._outbox.append((row.handle, Chunk(text=row.pending_text, token_count=row.pending_tokens)))
                row.pending_text, row.pending_tokens = "", 0

    def _release_finished(self) -> None:
        """Finished rows leave the batch; the rest keep decoding."""
        if not any(r.finish != FinishReason.UNSPECIFIED for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if r.finish == FinishReason.UNSPECIFIED]
        for i, row in enumerate(self._rows):
            if row.finish != FinishReason.UNSPECIFIED:  # cancelled rows' KV is as valid as finished ones'
                self._remember_prefix(i, row)
            if row.finish != FinishReason.UNSPECIFIED:
                self._finish(row, row.finish)
        self._rows = [self._rows[i] for i in keep]
        self._batch = kv.keep_rows(self._batch, keep)
        self._update_gauges()

    def _remember_prefix(self, index: int, row: Row) -> None:
        """Keep a finished conversation's KV so its next turn skips the shared prefix."""
        tokens = row.request.prompt_ids + row.generated[:-1]  # the last token was never fed back
        if self._prefixes.capacity >= len(tokens) >= MIN_REUSED_PREFIX:
            self._prefixes.store(tokens, kv.slice_row(self._batch, index, len(tokens)))

    def _finish(self, row: Row, reason: FinishReason) -> None:
        if reason == FinishReason.CANCELLED:
            text = ""
        else:
            text = row.pending_text + (row.text.advance([], final=True) if not row.text.hit_stop else "")
        self._outbox.append((row.handle, Chunk(
            text=text,
            token_count=row.pending_tokens,
            finish_reason=reason,
            prompt_tokens=len(row.request.prompt_ids),
            completion_tokens=len(row.generated),
        )))
        self.stats.released += 1

    def _fail_step(self, err: Exception) -> None:
        """The step's requests fail with a clear error; the engine starts over with an empty batch."""
        if isinstance(err, torch.OutOfMemoryError):
            error = EngineError("resource_exhausted", f"out of memory while generating: {err}")
            log.error("engine step ran out of memory; failing %d requests", len(self._rows))
        else:
            error = EngineError("internal", f"engine step failed: {type(err).__name__}: {err}")
            log.exception("engine step failed; failing %d requests", len(self._rows))
        self.stats.failed_steps += 1
        for row in self._rows + self._joining:
            self._outbox.append((row.handle, error))
            self.stats.released += 1
        self._rows, self._joining, self._batch = [], [], None
        self._prefixes.clear()
        self._update_gauges()
        if self.loaded.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_everyone(self, error: EngineError) -> None:
        for row in list(self._rows) + list(self._waiting):
            self._outbox.append((row.handle, error))
            self.stats.released += 1
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                break
            self._outbox.append((handle, error))
            self.stats.released += 1
        self._rows, self._batch = [], None
        self._waiting.clear()
        self._update_gauges()
        self._publish()

    def _update_gauges(self) -> None:
        self.stats.running = len(self._rows)
        self.stats.waiting = len(self._waiting)
        self.stats.kv_tokens = kv.cached_tokens(self._batch)

    def _publish(self) -> None:
        """Hand this step's chunks to their event loops: one thread-safe call per loop."""
        if not self._outbox:
            self._update_gauges()
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, item in outbox:
            by_loop.setdefault(handle.loop, []).append((handle, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed; nobody is listening
                pass
        self._update_gauges()


def _deliver(items) -> None:
    for handle, item in items:
        handle.chunks.put_nowait(item)
