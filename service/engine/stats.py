"""The engine's counters and gauges, read by tests, GetModelInfo, metrics and the logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    created: int = 0
    released: int = 0
    running: int = 0  # sequences holding KV blocks
    waiting: int = 0  # sequences queued for blocks (preempted ones among them)
    kv_tokens: int = 0  # KV positions computed for running sequences
    kv_capacity_tokens: int = 0  # positions the KV pool holds
    kv_blocks_held: int = 0  # blocks running sequences hold (a shared block once)
    kv_blocks_pool: int = 0  # blocks sequences may hold (the scratch block aside)
    kv_blocks_free: int = 0  # blocks nobody holds: every block is held or free
    kv_blocks_cached: int = 0  # of the free blocks, those keeping a cached prefix, evicted when the pool needs them
    steps: int = 0  # decode steps
    prefill_chunks: int = 0  # prompt chunks computed
    prefix_hits: int = 0  # requests that found at least one cached block
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    preempted: int = 0  # times a running sequence gave its blocks back to wait again (recompute preemption)
    resumed_cached_tokens: int = 0  # positions a resumed sequence found cached instead of recomputing
    prefilled: int = 0  # requests that reached the model (got blocks)
    cancelled_in_queue: int = 0  # left the queue because the caller went away; never reached the model
    expired_in_queue: int = 0  # left the queue because their deadline passed; never reached the model
    dropped_running: int = 0  # left the batch mid-generation: caller gone or deadline passed
    failed_steps: int = 0  # model steps that raised (their requests failed)
    failed_rows: int = 0  # requests failed alone: their own sampling or text raised, the step went on
    masked_rows: int = 0  # row-steps a constraint's mask was applied to
    mask_seconds: float = 0.0  # time spent computing and applying those masks
