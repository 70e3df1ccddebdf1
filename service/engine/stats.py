"""The engine's counters and gauges, read by tests, GetModelInfo, metrics and the logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    created: int = 0
    released: int = 0
    running: int = 0  # sequences holding a KV slot
    waiting: int = 0  # sequences queued for a slot
    kv_tokens: int = 0  # KV positions held by running sequences
    kv_capacity_tokens: int = 0  # positions all slots together hold
    steps: int = 0  # decode steps
    prefill_chunks: int = 0  # prompt chunks computed
    prefix_hits: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefilled: int = 0  # requests that reached the model (got a slot)
    cancelled_in_queue: int = 0  # left the queue because the caller went away; never reached the model
    expired_in_queue: int = 0  # left the queue because their deadline passed; never reached the model
    dropped_running: int = 0  # left the batch mid-generation: caller gone or deadline passed
    failed_steps: int = 0  # model steps that raised (their requests failed)
    failed_rows: int = 0  # requests failed alone: their own sampling or text raised, the step went on
