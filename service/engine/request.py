"""What the engine takes and gives back, free of any transport: a request's ids and sampling, and its chunks.

The servicer and the HTTP layer convert their own messages to and from these at the boundary.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class FinishReason(enum.IntEnum):
    """Why generation ended. The values equal chat.v1.FinishReason's (a test checks), so converting is a cast."""

    UNSPECIFIED = 0
    STOP = 1  # end of sequence
    LENGTH = 2  # max_new_tokens reached
    STOP_SEQUENCE = 3  # a stop string was generated
    CANCELLED = 4  # the caller went away or its deadline passed


class ConstraintKind(enum.Enum):
    """What a structured answer must match (chat.v1.Constraint's `kind`)."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


@dataclass(frozen=True)
class Constraint:
    """A request's constraint as sent: the schema, regex or Lark grammar text, the choices, or None (JSON_OBJECT).
    Compiled for the model's tokenizer by service/engine/constraint.py."""

    kind: ConstraintKind
    value: str | tuple[str, ...] | None


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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # the ends (EOS, stop_token_ids) are masked until the answer has this many tokens
    logprobs: bool = False
    top_logprobs: int = 0
    return_token_ids: bool = False
    n: int = 1  # answers to the prompt, sharing its KV

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the row's token counts."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def wants_tokens(self) -> bool:
        """Whether chunks carry a TokenInfo per generated token."""
        return self.wants_logprobs or self.return_token_ids

    def for_choice(self, index: int) -> SamplingParams:
        """Choice `index`'s parameters: the same, its seed moved on by `index` (so it is the answer a request with
        n 1 and that seed gets)."""
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return dataclasses.replace(self, seed=seed, n=1)


@dataclass
class GenerationRequest:
    """What the engine runs: prompt ids and resolved sampling."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    priority: int = 0  # lower runs first; the scheduler admits by (priority, arrival) and preempts the highest
    constraint: Any = None  # a compiled constraint (service/engine/constraint.py), compiled at admission


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id and, when asked for, its log-probability and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


@dataclass
class Chunk:
    """Text produced for one request since its last chunk; the last one carries the finish reason."""

    text: str
    token_count: int
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (last chunk only)
    index: int = 0  # which of the request's n answers
    tokens: tuple[TokenLogprob, ...] = ()  # the tokens since the last chunk, when the request asked for them
    stop_sequence: str = ""  # the stop string or stop token's text that ended it (last chunk only)
