"""Worker-side state of one request: where it is in its life, its slot in the KV cache, what it generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from service.engine.handle import RequestHandle
from service.engine.request import FinishReason, GenerationRequest
from service.engine.text import TextStream


class Status(enum.Enum):
    WAITING = enum.auto()  # queued; holds no KV
    PREFILLING = enum.auto()  # has a slot; part of its prompt is not computed yet
    DECODING = enum.auto()  # has a slot; one token per step
    FINISHED = enum.auto()  # left the batch; its slot is free


@dataclass(eq=False)
class Sequence:
    handle: RequestHandle
    text: TextStream
    generator: torch.Generator | None
    status: Status = Status.WAITING
    slot: int = -1  # row of the KV cache it owns while PREFILLING or DECODING
    computed: int = 0  # positions of the prompt (then of prompt + answer) whose KV is in the slot
    generated: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_tokens: int = 0
    finish: FinishReason = FinishReason.UNSPECIFIED

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def next_position(self) -> int:
        """Where the next token fed to the model goes: after the prompt and every generated token but the last."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def done(self) -> bool:
        return self.finish != FinishReason.UNSPECIFIED

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated
