"""The engine: one worker thread owns the model and decodes every admitted request in one continuous batch.

The event loop calls `submit` and reads chunks from the returned handle; it never touches the model. Each
iteration of the worker reads: schedule -> run -> postprocess -> sample -> emit. The scheduler decides who
holds which KV blocks (service/engine/scheduler.py); the runner computes the step's prompt chunks and decode
tokens in one forward; finished, cancelled or expired requests give their blocks back at once, and every row's
new text goes to the event loop in one call per step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from service.config import Limits
from service.engine.block_manager import BlockManager
from service.engine.constraint import Masks
from service.engine.faults import Faults
from service.engine.handle import RequestHandle, deliver
from service.engine.kv_budget import auto_kv_tokens
from service.engine.model_runner import ModelRunner, StepRow
from service.engine.request import Chunk, FinishReason, GenerationRequest, TokenLogprob
from service.engine.sampling import Row, TokenCounts, make_generator, sample
from service.engine.scheduler import Plan, Scheduler
from service.engine.sequence import Sequence
from service.engine.stats import EngineStats
from service.engine.step_graphs import StepMode
from service.engine.text import TextStream
from service.failures import Failure, RequestFailed
from service.models.base import LoadedModel
from service.models.loader import use_device

__all__ = ["Engine", "EngineStats", "RequestHandle"]

KV_BLOCK_SIZE = 16  # positions per KV block (docs/engine.md, Paged KV: 16 against 32)

log = logging.getLogger(__name__)


class DeviceLost(Exception):
    """The accelerator's context is unusable (an illegal address, an ECC or a launch failure): every later step
    would fail too, so the worker stops, as if it had died, and the server goes NOT_SERVING to be restarted."""


def device_lost(err: BaseException, device: torch.device) -> bool:
    """Whether `err` leaves the device unusable. torch raises AcceleratorError for a CUDA runtime error (out of
    memory is its own type, and recoverable); on a CUDA device an older torch's RuntimeError says so in words."""
    if isinstance(err, torch.AcceleratorError):
        return True
    text = str(err)
    return (device.type == "cuda" and isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError)
            and (text.startswith("CUDA error") or "CUBLAS_STATUS_EXECUTION_FAILED" in text))


class Engine:
    """Continuous batching over a single worker thread."""

    def __init__(self, loaded: LoadedModel, limits: Limits, *, step_mode: StepMode = StepMode.EAGER,
                 step_fallback: StepMode | None = None, faults: Faults | None = None):
        """`step_mode`, `step_fallback`: how decode-only steps run, and instead if inductor cannot compile them
        (service/engine/step_graphs.py); `faults`: the tests' seam for injecting failures
        (service/engine/faults.py), None in production."""
        self.loaded = loaded
        self.limits = limits
        self.step_mode, self.step_fallback = step_mode, step_fallback
        self.stats = EngineStats()
        self.block_size = KV_BLOCK_SIZE
        self.num_blocks = 0  # the pool's blocks, the scratch block included; sized by `start`
        #: the longest prompt + answer one request may have: the model's context, --max-model-len, the pool
        self.max_context = 0
        # Made on the worker thread by `start`: torch work on a second thread starts a second OpenMP pool that
        # competes for the cores (building the runner on the event loop's thread made every step 50 ms, not 27).
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self.counts: TokenCounts | None = None  # penalized rows' token counts, on the model's device
        self.masks: Masks | None = None  # constrained rows' token masks
        self._incoming: queue.SimpleQueue[RequestHandle] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._done: Future | None = None
        self._worker: threading.Thread | None = None
        self._ids = itertools.count()
        self._outbox: list[tuple[RequestHandle, Chunk | RequestFailed]] = []
        self.faults = faults or Faults()
        self.failed: BaseException | None = None  # set when the worker died

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
            self._worker = threading.current_thread()
            try:
                self._build()
            finally:
                running.set()
            self._run()

        self._done = self._executor.submit(run)
        running.wait()
        if self._done.done():  # building the runner failed: say why, here
            self._done.result()

    def _size_pool(self) -> None:
        limits, loaded = self.limits, self.loaded
        tokens = limits.kv_cache_tokens or auto_kv_tokens(loaded.model, limits.prefill_chunk_tokens, KV_BLOCK_SIZE)
        self.num_blocks = tokens // KV_BLOCK_SIZE + 1  # and the scratch block
        pool = (self.num_blocks - 1) * KV_BLOCK_SIZE
        self.max_context = min(loaded.context_length, limits.max_model_len or loaded.context_length, pool)
        self.stats.kv_capacity_tokens = pool
        self.stats.kv_blocks_pool = self.stats.kv_blocks_free = self.num_blocks - 1

    def _build(self) -> None:
        use_device(self.loaded.model.device)
        self._size_pool()
        limits = self.limits
        self.runner = ModelRunner(self.loaded.model, num_blocks=self.num_blocks, block_size=self.block_size,
                                  max_rows=limits.max_batch_size, max_context=self.max_context,
                                  step_mode=self.step_mode, step_fallback=self.step_fallback)
        self.scheduler = Scheduler(BlockManager(self.num_blocks, self.block_size), self.stats,
                                   max_rows=limits.max_batch_size, prefill_chunk_tokens=limits.prefill_chunk_tokens,
                                   prefix_caching=limits.prefix_cache_tokens > 0)
        device, vocab = self.loaded.model.device, self.loaded.vocab_size
        self.counts = TokenCounts(vocab, device)
        self.masks = Masks(limits.max_batch_size, vocab, device, self.stats)

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

    @property
    def worker_alive(self) -> bool:
        """Whether the worker thread is still running (after `stop`, it should not be)."""
        return self._worker is not None and self._worker.is_alive()

    def wake(self) -> None:
        self._wakeup.set()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; read its chunks from the handle. Call from the event loop."""
        if not self.alive:
            raise RequestFailed(Failure.ENGINE_UNAVAILABLE, "the engine is not running")
        if len(request.prompt_ids) + request.params.max_new_tokens > self.max_context:  # the frontend checks first
            raise RequestFailed(Failure.INVALID, f"prompt ({len(request.prompt_ids)} tokens) plus "
                                f"max_new_tokens ({request.params.max_new_tokens}) must fit the context of "
                                f"{self.max_context} tokens", field="params.max_new_tokens")
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        handle = RequestHandle(request, self, asyncio.get_running_loop())
        self.stats.created += request.params.n  # one sequence per answer, each released once
        self._incoming.put(handle)
        self.wake()
        return handle

    # ---- worker side -----------------------------------------------------------------------------

    def _run(self) -> None:
        if self.scheduler is None:
            return
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._iterate()
        except BaseException as err:  # the worker cannot go on; callers must not hang
            self.failed = err
            log.exception("engine worker died")
        finally:
            self._fail_everyone(RequestFailed(Failure.ENGINE_UNAVAILABLE, "the engine stopped"))

    def _iterate(self) -> None:
        self._take_incoming()
        for seq in self.scheduler.drop_gone():
            self._finish(seq, FinishReason.CANCELLED)
        if self.scheduler.idle:
            self._publish()
            self._wakeup.wait(0.5)
            self._wakeup.clear()
            return
        plan = self.scheduler.schedule()
        try:
            self.faults.before_step(plan)
            self._run_plan(plan)
        except Exception as err:  # one bad step fails its requests, not the server, unless the device is lost
            if device_lost(err, self.runner.device):
                raise DeviceLost(f"the device failed, the engine stops: {type(err).__name__}: {err}") from err
            self._fail_step(plan, err)
        self._publish()

    def _take_incoming(self) -> None:
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                return
            first = self._sequence(handle, 0)
            first.forks_left = handle.request.params.n - 1
            self.scheduler.add(first)

    def _sequence(self, handle: RequestHandle, index: int) -> Sequence:
        """Answer `index` of a request: its own text, random stream (seed + index) and constraint matcher."""
        params = handle.request.params.for_choice(index)
        constraint = handle.request.constraint
        return Sequence(handle=handle, text=TextStream(self.loaded.tokenizer, params.stop), params=params,
                        generator=make_generator(params, self.loaded.model.device), index=index,
                        matcher=constraint.matcher() if constraint is not None else None)

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Requests with n answers whose prompt was just computed: answers 1..n-1 start from answer 0's KV and
        sample their first token from its logits [B, V] (rows repeated)."""
        rows = list(range(len(seqs)))
        for row, seq in enumerate(list(seqs)):
            if seq.forks_left:
                children = [self._sequence(seq.handle, index) for index in range(1, seq.forks_left + 1)]
                seq.forks_left = 0
                started = self.scheduler.fork(seq, children)
                seqs.extend(started)
                rows += [row] * len(started)
        if len(rows) == len(logits):
            return seqs, logits
        return seqs, logits[torch.tensor(rows, device=logits.device)]

    def _run_plan(self, plan: Plan) -> None:
        """Compute this step's decode tokens and prompt chunks in one forward, then sample and emit."""
        rows = [StepRow(s.block_table, s.next_position, [s.generated[-1]]) for s in plan.decode]
        rows += [StepRow(c.sequence.block_table, c.start, c.ids, wanted=c.samples) for c in plan.prefill]
        logits = self.runner.run(rows, plan.fresh_blocks, plan.copies)  # [W, V]
        self.scheduler.postprocess(plan)
        self.stats.steps += bool(plan.decode)
        self.stats.prefill_chunks += len(plan.prefill)
        self._accept(*self._fork(plan.decode + [c.sequence for c in plan.prefill if c.samples], logits))
        self._release_finished()

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token [B, V] -> ids, turn it into text, and mark those that are done. What
        one row's parameters or text can break (sampling, penalties, stop strings, detokenizing) fails that row
        alone; the others go on."""
        for seq, picked in zip(seqs, self._sample(seqs, logits), strict=True):
            if picked is None:  # its sampling failed; it has left already
                continue
            try:
                self._advance(seq, *picked)
            except RequestFailed as err:  # its constraint could no longer be followed
                self._fail(seq, err)
            except Exception as err:
                self._fail_row(seq, err)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None] | None]:
        """Next ids for logits [B, V], in one batched pass. If that raises, each row is sampled again on its
        own (seeded rows from the random state they had before), and only the rows that still fail fail."""
        states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
        try:
            return self._sample_rows(seqs, logits)
        except torch.OutOfMemoryError:  # not one row's fault: the step fails (RESOURCE_EXHAUSTED)
            raise
        except Exception as err:
            if device_lost(err, self.runner.device):  # not one row's fault either: the engine stops
                raise
            if len(seqs) == 1:
                self._fail_row(seqs[0], err)
                return [None]
        tokens: list[tuple[int, TokenLogprob | None] | None] = []
        for row, (seq, state) in enumerate(zip(seqs, states, strict=True)):
            if state is not None:
                seq.generator.set_state(state)
            try:
                tokens += self._sample_rows([seq], logits[row:row + 1])
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                self._fail_row(seq, err)
                tokens.append(None)
        return tokens

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        for seq in seqs:
            self.faults.before_sample(seq.request)
        rows = [Row(s.params, s.generator, len(s.generated), self._count_slot(s), s.matcher) for s in seqs]
        tokens, infos = sample(logits, rows, eos_ids=self.loaded.tokenizer.eos_token_ids, counts=self.counts,
                               masks=self.masks)
        counted = [(s.count_slot, token) for s, token in zip(seqs, tokens, strict=True) if s.count_slot is not None]
        if counted:
            self.counts.add(*map(list, zip(*counted, strict=True)))
        return list(zip(tokens, infos, strict=True))

    def _count_slot(self, seq: Sequence) -> int | None:
        """A penalized sequence's row of token counts, assigned at its first sampling."""
        if seq.count_slot is None and seq.params.penalized:
            seq.count_slot = self.counts.assign(seq.prompt_ids, seq.generated, seq.params.presence_penalty,
                                                seq.params.frequency_penalty)
        return seq.count_slot

    def _advance(self, seq: Sequence, token: int, info: TokenLogprob | None = None) -> None:
        """`token` joins `seq`'s answer: its text (held back while it may still become a stop string) goes out,
        and the sequence is marked done on EOS or a stop token, when its constraint is complete, at its length
        limit or on a stop string."""
        seq.generated.append(token)
        params = seq.params
        seq.pending_tokens += 1
        if params.wants_tokens:
            seq.pending_infos.append(info or TokenLogprob(token))
        if seq.matcher is not None:
            seq.matcher.advance(token)
            if seq.matcher.finished:  # nothing but the end is allowed: the answer is complete
                seq.finish = FinishReason.STOP
        if token in self.loaded.tokenizer.eos_token_ids and not params.ignore_eos:
            seq.finish = FinishReason.STOP
            return
        if token in params.stop_token_ids:
            seq.finish, seq.stop_sequence = FinishReason.STOP_SEQUENCE, self._token_text(token)
            return
        if not seq.done and len(seq.generated) >= params.max_new_tokens:
            seq.finish = FinishReason.LENGTH
        seq.pending_text += seq.text.advance([token], final=seq.done)
        if seq.text.hit_stop:
            seq.finish, seq.stop_sequence = FinishReason.STOP_SEQUENCE, seq.text.stop_hit
        if not seq.done and seq.pending_text:
            self._outbox.append((seq.handle, Chunk(text=seq.pending_text, token_count=seq.pending_tokens,
                                                   index=seq.index, tokens=tuple(seq.pending_infos))))
            seq.pending_text, seq.pending_tokens, seq.pending_infos = "", 0, []

    def _token_text(self, token: int) -> str:
        return self.loaded.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _leave(self, seq: Sequence) -> None:
        """`seq` gives back its blocks and its token counts."""
        self.scheduler.release(seq)
        if seq.count_slot is not None:
            self.counts.free(seq.count_slot)
            seq.count_slot = None

    def _fail_row(self, seq: Sequence, err: Exception) -> None:
        """One row's own work raised: that request fails with INTERNAL (a bug, logged); the step goes on."""
        log.error("request %s failed alone: %s: %s", seq.request.request_id, type(err).__name__, err,
                  exc_info=err)
        self.stats.failed_rows += 1
        self._fail(seq, RequestFailed(Failure.INTERNAL, f"generating this answer failed: {type(err).__name__}: "
                                    f"{err}"))

    def _fail(self, seq: Sequence, error: RequestFailed) -> None:
        """`seq` leaves with `error`; only its blocks that were fully computed stay cached."""
        self._leave(seq)
        self._outbox.append((seq.handle, error))
        self.stats.released += 1

    def _release_finished(self) -> None:
        for seq in [s for s in self.scheduler.running if s.done]:
            try:
                self._finish(seq, seq.finish)
            except Exception as err:
                self._fail_row(seq, err)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """`seq` leaves with its last chunk (the rest of its text, the finish reason and the usage)."""
        if reason == FinishReason.CANCELLED:
            text = ""
        else:
            text = seq.pending_text + (seq.text.advance([], final=True) if not seq.text.hit_stop else "")
        self._leave(seq)
        self._outbox.append((seq.handle, Chunk(
            text=text,
            token_count=seq.pending_tokens,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated),
            cached_prompt_tokens=seq.cached_prompt_tokens,
            index=seq.index,
            tokens=tuple(seq.pending_infos),
            stop_sequence=seq.stop_sequence,
        )))
        self.stats.released += 1

    def _fail_step(self, plan: Plan, err: Exception) -> None:
        """The step itself failed (the forward pass, out of memory): the requests in it fail with a clear error;
        the others (running but not in this step, or still waiting) are not affected."""
        in_step = [s for s in plan.sequences() if s in self.scheduler.running]
        if isinstance(err, torch.OutOfMemoryError):
            error = RequestFailed(Failure.OUT_OF_MEMORY, f"out of memory while generating: {err}")
            log.error("engine step ran out of memory; failing its %d requests", len(in_step))
        else:
            error = RequestFailed(Failure.INTERNAL, f"engine step failed: {type(err).__name__}: {err}")
            log.exception("engine step failed; failing its %d requests", len(in_step))
        self.stats.failed_steps += 1
        for seq in in_step:
            self._fail(seq, error)
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_everyone(self, error: RequestFailed) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(seq, error)
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                break
            self._outbox.append((handle, error))
            self.stats.released += 1
        self._publish()

    def _update_gauges(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = len(self.scheduler.waiting)
        self.stats.kv_tokens = self.scheduler.kv_tokens()
        self.stats.kv_blocks_held, self.stats.kv_blocks_free, self.stats.kv_blocks_cached = \
            self.scheduler.blocks_in_use()

    def _publish(self) -> None:
        """Hand this step's chunks to their event loops: one thread-safe call per loop."""
        self._update_gauges()
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, item in outbox:
            by_loop.setdefault(handle.loop, []).append((handle, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # that loop is closed; nobody is listening
                pass
