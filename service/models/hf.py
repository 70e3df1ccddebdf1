"""Chat tokenizer for transformers models: the tokenizer's own chat template."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from service.models.base import Turn

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards (transformers' own table): the character each byte is written as ->
    the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """A vocabulary entry's bytes: byte-level (GPT-2) characters mapped back, or a SentencePiece piece with its
    `▁` as a space and `<0xNN>` as the byte."""
    if byte_level:
        alphabet = byte_level_alphabet()
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()


class HFChatTokenizer:
    """A transformers tokenizer with a chat template, speaking `ChatTokenizer`."""

    rewrite_keys: tuple[str, ...] = ()

    def __init__(self, tokenizer, eos_token_ids: frozenset[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; a chat model is needed")
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids
        self.special_token_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, added in tokenizer.added_tokens_decoder.items() if added.special)

    def encode_chat(self, prompt: str, history: Sequence[Turn], system: str | None) -> list[int]:
        messages = [{"role": "system", "content": system}] if system is not None else []
        for turn in history:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        messages.append({"role": "user", "content": prompt})
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tok.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, no chat template and no special tokens."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def finalize(self, text: str) -> str:
        return text.strip()

    def token_bytes(self, token: int) -> bytes:
        table = self._vocabulary
        return table[token] if 0 <= token < len(table) else b""

    @functools.cached_property
    def _vocabulary(self) -> tuple[bytes, ...]:
        """Every id's bytes, found once (49152 ids: ~0.1 s)."""
        decoder = getattr(getattr(self._tok, "backend_tokenizer", None), "decoder", None)
        byte_level = "ByteLevel" in repr(decoder)
        pieces = self._tok.convert_ids_to_tokens(list(range(len(self._tok))))
        added = {i: t.content for i, t in self._tok.added_tokens_decoder.items()}
        return tuple(added[i].encode() if i in added else piece_bytes(piece or "", byte_level)
                     for i, piece in enumerate(pieces))
