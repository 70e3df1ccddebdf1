"""What every model loader returns: a causal LM plus the tokenizer that speaks its chat format."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from service.models.quant.quantize import WeightFormat, weight_format


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of a conversation: what the user said and what the assistant answered."""

    user: str
    assistant: str


class UnsupportedInput(ValueError):
    """Input the model's chat format cannot express (ChatGLM2 has no system role): `field` names the part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ChatTokenizer(Protocol):
    """Turns a conversation into prompt ids and generated ids back into text."""

    #: Token ids that end an answer.
    eos_token_ids: frozenset[int]
    #: Strings that `finalize` rewrites; a stream holds back text that might still become one.
    rewrite_keys: tuple[str, ...]
    #: Ids of control tokens (chat markers, EOS, ...): never plain text, so a constraint never allows them.
    special_token_ids: frozenset[int]

    def encode_chat(self, prompt: str, history: Sequence[Turn], system: str | None) -> list[int]:
        """Prompt ids for `prompt` after `history`, ready to generate the assistant's answer; UnsupportedInput
        for what the chat format cannot express."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, no chat format and no special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special ids dropped. Incomplete UTF-8 at the end shows as U+FFFD."""
        ...

    def finalize(self, text: str) -> str:
        """The answer as the user sees it (for example stripped). Applied to decided text only."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one id stands for, as the model wrote them (a leading space included, part of a UTF-8
        character where the piece is a byte); a special token's name; b"" for ids past the tokenizer's own
        vocabulary (the LM head's padding)."""
        ...


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve."""

    model: torch.nn.Module  # a transformers causal LM: forward(input_ids, attention_mask, position_ids, cache)
    tokenizer: ChatTokenizer
    name: str  # reported by GetModelInfo
    context_length: int  # prompt plus answer, in tokens
    #: The checkpoint's own default `max_length` (e.g. chatglm2-6b-32k's chat() uses 32768), used where the
    #: operator left --max-length at its default; None: the server's default applies.
    default_max_length: int | None = None

    @functools.cached_property
    def vocab_size(self) -> int:
        """The ids a logit exists for (ChatGLM2's padded vocabulary included): the largest useful top_k."""
        return int(self.model.config.vocab_size)

    @functools.cached_property
    def weight_format(self) -> WeightFormat:
        """How most of the linear weights are stored (GetModelInfo reports it; found once, the model is fixed)."""
        return weight_format(self.model)
