"""Queues and admission: who waits, who gets a KV slot, which prompt tokens are computed this step.

Each step the scheduler drops sequences whose caller went away, gives free slots to waiting sequences (copying
a cached prefix into the slot when one matches), and plans the step: up to `prefill_chunk_tokens` prompt
tokens (a long prompt is computed in chunks over several steps, so running streams keep getting tokens), and
one decode token for every sequence already decoding.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from service.engine.kv_cache import KVCache
from service.engine.prefix_cache import PrefixCache
from service.engine.sequence import Sequence, Status
from service.engine.stats import EngineStats

# Prefixes shorter than this, or covering less than half the prompt, are recomputed rather than copied. At 16 a
# prompt that shares the chat template's system part (or all but its last token) with a kept one reuses it, as
# llama-server's prompt cache does: 16 clients of `make bench-peers` got their first token at p50 0.11 s against
# 0.35 s with a minimum of 64 (copying a slot's KV costs ~0.2 ms; computing the same tokens in a prefill, more).
MIN_REUSED_PREFIX = 16
MIN_REUSED_SHARE = 0.5


@dataclass
class PrefillChunk:
    sequence: Sequence
    start: int  # first prompt position computed in this step
    end: int  # one past the last

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.sequence.prompt_ids)


@dataclass
class Plan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, kv: KVCache, prefixes: PrefixCache, stats: EngineStats, prefill_chunk_tokens: int):
        self.kv = kv
        self.prefixes = prefixes
        self.stats = stats
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # PREFILLING or DECODING, each holding a slot

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def drop_gone(self) -> list[Sequence]:
        """Sequences whose caller cancelled or whose deadline passed, queued or running, marked CANCELLED."""
        now = time.monotonic()
        gone = []
        for seq in list(self.waiting):
            expired = seq.request.deadline is not None and now > seq.request.deadline
            if seq.handle.cancelled or expired:
                self.waiting.remove(seq)
                if expired:
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

    def schedule(self) -> Plan:
        self._admit()
        plan = Plan(decode=[s for s in self.running if s.status == Status.DECODING])
        budget = self.prefill_chunk_tokens
        for seq in self.running:
            if seq.status != Status.PREFILLING or budget <= 0:
                continue
            end = min(len(seq.prompt_ids), seq.computed + budget)
            plan.prefill.append(PrefillChunk(seq, seq.computed, end))
            budget -= end - seq.computed
        return plan

    def _admit(self) -> None:
        """Waiting sequences take free slots, oldest first."""
        now = time.monotonic()
        while self.waiting and self.kv.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.kv.allocate()
            seq.status = Status.PREFILLING
            seq.handle.scheduled_at = now
            self.stats.prefilled += 1
            self._reuse_prefix(seq)
            self.running.append(seq)

    def _reuse_prefix(self, seq: Sequence) -> None:
        prompt = seq.prompt_ids
        self.stats.prefix_queried_tokens += len(prompt)
        found = self.prefixes.lookup(prompt, max(MIN_REUSED_PREFIX, int(MIN_REUSED_SHARE * len(prompt))))
        if found is None:
            return
        entry, length = found
        self.kv.copy_in(seq.slot, entry, length)
        seq.computed = length
        self.stats.prefix_hits += 1
        self.stats.reused_tokens += length

    def release(self, seq: Sequence, *, keep_prefix: bool) -> None:
        """`seq` leaves the batch; with `keep_prefix` its KV is kept for a next turn that resends it."""
        if seq in self.running:
            self.running.remove(seq)
            if keep_prefix:
                self._remember(seq)
            self.kv.release(seq.slot)
        seq.status, seq.slot = Status.FINISHED, -1

    def _remember(self, seq: Sequence) -> None:
        ids = seq.all_ids()[:seq.computed]  # positions whose KV is in the slot
        if self.prefixes.capacity >= len(ids) >= MIN_REUSED_PREFIX:
            self.prefixes.store(ids, self.kv.copy_out(seq.slot, len(ids)))

    def kv_tokens(self) -> int:
        """KV positions held by running sequences."""
        return sum(seq.computed for seq in self.running)
