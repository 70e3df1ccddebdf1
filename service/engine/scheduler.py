"""Queues, admission and preemption: every change of a sequence's status, blocks and computed positions.

Each step the scheduler plans: a decode token for every decoding sequence (each gets the block its next position
needs, preempting the lowest-priority, most recent sequence when none is free), then admits waiting sequences
by priority then arrival while rows and blocks (plus a small watermark) allow, sharing the cached blocks their
prompts start with, then hands out up to `prefill_chunk_tokens` prompt tokens (a long prompt is computed in
chunks over several steps, so running streams keep getting tokens). A preempted sequence frees its blocks and
waits again; its computed blocks stay cached, so resuming recomputes little. After the step `postprocess`
advances what was computed and seals the blocks that are full.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

from service.engine.block_manager import BlockManager
from service.engine.sequence import Sequence, Status
from service.engine.stats import EngineStats

WATERMARK_SHARE = 0.01  # of the pool kept free at admission, so running sequences can grow (as vLLM's)


@dataclass
class PrefillChunk:
    sequence: Sequence
    start: int  # first position computed in this step
    end: int  # one past the last

    @property
    def ids(self) -> list[int]:
        return self.sequence.all_ids()[self.start:self.end]

    @property
    def samples(self) -> bool:
        """Whether this chunk ends the prompt of a sequence that has sampled nothing yet: its last logits give
        the first token. A resumed sequence's chunks only recompute KV."""
        return self.end == self.sequence.prefill_target and not self.sequence.generated


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    fresh_blocks: list[int] = field(default_factory=list)  # handed out for the first time: zero before use
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks to copy, after zeroing

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    def sequences(self) -> list[Sequence]:
        return list(dict.fromkeys(self.decode + [c.sequence for c in self.prefill]))


class Scheduler:
    def __init__(self, blocks: BlockManager, stats: EngineStats, *, max_rows: int, prefill_chunk_tokens: int,
                 prefix_caching: bool = True):
        self.blocks = blocks
        self.prefix_caching = prefix_caching
        self.stats = stats
        self.max_rows = max_rows
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.watermark = max(1, int(WATERMARK_SHARE * blocks.usable))
        self.waiting: list[Sequence] = []  # by (priority, arrival)
        self.running: list[Sequence] = []  # PREFILLING or DECODING, each holding blocks
        self._arrivals = itertools.count()
        self._copies: list[tuple[int, int]] = []  # forks' block copies, for the next step

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        seq.order = next(self._arrivals)
        self._queue(seq)

    def _queue(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def drop_gone(self) -> list[Sequence]:
        """Sequences whose caller cancelled or whose deadline passed, queued or running."""
        now = time.monotonic()
        gone = []
        for seq in list(self.waiting):
            expired = seq.request.deadline is not None and now > seq.request.deadline
            if seq.handle.cancelled or expired:
                if seq.preemptions:  # it had been running
                    self.stats.dropped_running += 1
                elif expired:
                    self.stats.expired_in_queue += 1
                else:
                    self.stats.cancelled_in_queue += 1
                gone.append(seq)
        for seq in self.running:
            deadline = seq.request.deadline
            if not seq.done and (seq.handle.cancelled or (deadline is not None and now > deadline)):
                self.stats.dropped_running += 1
                gone.append(seq)
        return gone

    # ---- planning a step -------------------------------------------------------------------------

    def schedule(self) -> Plan:
        plan = Plan()
        preempted = False
        for seq in sorted((s for s in self.running if s.status is Status.DECODING), key=lambda s: s.priority):
            if seq.status is not Status.DECODING:  # preempted to make room for one before it
                continue
            while not self._grow(seq, seq.computed + 1):
                preempted = True
                victim = max(self.running, key=lambda s: s.priority)
                self._preempt(victim)
                if victim is seq:
                    break
        plan.decode = [s for s in self.running if s.status is Status.DECODING]
        if not preempted:
            self._admit()
        budget = self.prefill_chunk_tokens
        for seq in sorted(self.running, key=lambda s: s.priority):
            if seq.status is Status.PREFILLING and budget > 0:
                end = min(seq.prefill_target, seq.computed + budget)
                plan.prefill.append(PrefillChunk(seq, seq.computed, end))
                budget -= end - seq.computed
        plan.fresh_blocks = self.blocks.take_fresh()
        plan.copies, self._copies = self._copies, []
        return plan

    def _grow(self, seq: Sequence, positions: int) -> bool:
        """Give `seq` the blocks `positions` positions need, if that many are free."""
        if self.blocks.blocks_for(positions) - len(seq.block_table) > self.blocks.free:
            return False
        self.blocks.grow(seq.block_table, positions)
        return True

    def _admit(self) -> None:
        """Waiting sequences start, best priority first, while a row and their prompt's blocks are free. One that
        does not fit may preempt running sequences of a worse priority (a larger value); else admission stops
        (those behind it wait too, so a long prompt is not starved by short ones)."""
        while self.waiting:
            seq = self.waiting[0]
            limit = (seq.prefill_target - 1) // self.blocks.block_size  # the last prompt token is computed
            shared = self.blocks.match(seq.all_ids(), limit) if self.prefix_caching else []
            needed = self.blocks.fresh_needed(shared, seq.prefill_target)
            reserve = self.watermark if self.running else 0
            if len(self.running) < self.max_rows and needed + reserve <= self.blocks.free:
                self._start(self.waiting.pop(0), shared)
                continue
            worse = [s for s in self.running if s.request.priority > seq.request.priority]
            if not worse:
                return
            self._preempt(max(worse, key=lambda s: s.priority))

    def _start(self, seq: Sequence, shared: list[int]) -> None:
        seq.block_table = self.blocks.allocate(shared, seq.prefill_target)
        seq.computed, seq.sealed = len(shared) * self.blocks.block_size, len(shared)
        seq.status = Status.PREFILLING
        self.running.append(seq)
        if seq.preemptions:  # resumed: what it finds cached is recomputed no more
            self.stats.resumed_cached_tokens += seq.computed
            return
        seq.cached_prompt_tokens = seq.computed
        seq.handle.scheduled_at = time.monotonic()
        self.stats.prefilled += 1
        self.stats.prefix_queried_tokens += len(seq.prompt_ids)
        self.stats.reused_tokens += seq.computed
        self.stats.prefix_hits += bool(shared)

    def fork(self, parent: Sequence, children: list[Sequence]) -> list[Sequence]:
        """`parent`'s other answers start where it is (its prompt computed, nothing sampled yet), sharing its full
        blocks, each with its own copy of the last partly filled one. Returns those that started, to sample their
        first token from the parent's logits; a child that finds no free row or block waits as a new arrival
        (its prompt's full blocks are found cached, if prefix caching is on)."""
        started = []
        for child in children:
            child.order = next(self._arrivals)
            partial = parent.computed % self.blocks.block_size != 0
            if len(self.running) >= self.max_rows or self.blocks.free < partial + self.watermark:
                self._queue(child)
                continue
            child.block_table, copy = self.blocks.fork(parent.block_table, parent.computed)
            if copy is not None:
                self._copies.append(copy)
            child.computed, child.sealed = parent.computed, parent.sealed
            child.cached_prompt_tokens = parent.cached_prompt_tokens
            child.status = Status.DECODING
            self.running.append(child)
            started.append(child)
        return started

    def _preempt(self, seq: Sequence) -> None:
        """`seq` gives its blocks back and waits again, ahead of later arrivals of its priority. Its caller sees
        a pause: what it generated stays, and its KV is recomputed (mostly found cached) when it resumes."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.computed = seq.sealed = 0
        seq.preemptions += 1
        self.stats.preempted += 1
        self._queue(seq)

    # ---- after a step ----------------------------------------------------------------------------

    def postprocess(self, plan: Plan) -> None:
        """What the step computed: decode rows' one position each, prefill chunks' positions (a chunk that ends
        the prompt starts decoding); then the blocks that are now full are sealed."""
        for seq in plan.decode:
            seq.computed += 1
        for chunk in plan.prefill:
            seq = chunk.sequence
            seq.computed = chunk.end
            if chunk.end == seq.prefill_target:
                seq.status = Status.DECODING
        if self.prefix_caching:
            for seq in plan.sequences():
                if seq.computed // self.blocks.block_size > seq.sealed:  # a block filled up this step
                    seq.sealed = self.blocks.seal(seq.block_table, seq.all_ids(), seq.computed, seq.sealed)

    def release(self, seq: Sequence) -> None:
        """`seq` leaves: finished, failed, cancelled or expired. Its sealed blocks stay cached for later prompts."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED

    def kv_tokens(self) -> int:
        """KV positions held by running sequences."""
        return sum(seq.computed for seq in self.running)

    def blocks_in_use(self) -> tuple[int, int, int]:
        """(blocks running sequences hold, free blocks, free blocks that keep a cached prefix)."""
        return self.blocks.held, self.blocks.free, self.blocks.cached_free
