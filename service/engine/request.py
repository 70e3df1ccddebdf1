"""What the engine takes and gives back, free of any transport: a request's ids and sampling, and its chunks.

The servicer and the HTTP layer convert their own messages to and from these at the boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.IntEnum):
    """Why generation ended. The values equal chat.v1.FinishReason's (a test checks), so converting is a cast."""

    UNSPECIFIED = 0
    STOP = 1  # end of sequence
    LENGTH = 2  # max_new_tokens reached
    STOP_SEQUENCE = 3  # a stop string was generated
    CANCELLED = 4  # the caller went away or its deadline passed


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling for one request: every field decided."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """What the engine runs: prompt ids and resolved sampling."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    priority: int = 0  # lower runs first; the scheduler admits by (priority, arrival) and preempts the highest


@dataclass
class Chunk:
    """Text produced for one request since its last chunk; the last one carries the finish reason."""

    text: str
    token_count: int
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (last chunk only)
