"""Worker-side state of one request: where it is in its life, its KV blocks, what it generated.

The scheduler (service/engine/scheduler.py) makes every change of `status`, `block_table` and `computed`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from service.engine.handle import RequestHandle
from service.engine.request import FinishReason, GenerationRequest, SamplingParams, TokenLogprob
from service.engine.text import TextStream


class Status(enum.Enum):
    WAITING = enum.auto()  # queued, or preempted and queued again; holds no KV
    PREFILLING = enum.auto()  # holds blocks; part of its prompt (or, resumed, its answer so far) is not computed
    DECODING = enum.auto()  # holds blocks; one token per step
    FINISHED = enum.auto()  # left; its blocks are released


@dataclass(eq=False)
class Sequence:
    handle: RequestHandle
    text: TextStream
    generator: torch.Generator | None
    params: SamplingParams | None = None  # the request's with this answer's seed; None: the request's
    index: int = 0  # which of the request's n answers
    forks_left: int = 0  # answers to fork from this one once its prompt is computed (n - 1 for answer 0)
    matcher: Any = None  # its constraint's matcher (service/engine/constraint.py), if any
    count_slot: int | None = None  # its row of the sampler's token counts, while penalized
    order: int = 0  # arrival: among equal priorities the earlier runs first
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    sealed: int = 0  # leading blocks of the table that are sealed (hashed, shareable)
    computed: int = 0  # positions whose KV is in the blocks
    cached_prompt_tokens: int = 0  # prompt positions the first admission found in the prefix cache
    preemptions: int = 0
    generated: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_tokens: int = 0
    pending_infos: list[TokenLogprob] = field(default_factory=list)  # tokens not sent yet, when asked for
    finish: FinishReason = FinishReason.UNSPECIFIED
    stop_sequence: str = ""  # the stop string or stop token's text that ended it

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = self.request.params

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def priority(self) -> tuple[int, int]:
        """The order the scheduler admits in (smallest first) and preempts in (largest first)."""
        return self.request.priority, self.order

    @property
    def prefill_target(self) -> int:
        """Positions computed before decoding (re)starts: the prompt, or after a preemption everything but the
        last generated token, which the next decode step feeds."""
        return len(self.prompt_ids) + max(0, len(self.generated) - 1)

    @property
    def next_position(self) -> int:
        """Where the next token fed to the model goes: after the prompt and every generated token but the last."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def done(self) -> bool:
        return self.finish != FinishReason.UNSPECIFIED

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated
