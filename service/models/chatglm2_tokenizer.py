"""ChatGLM2-6B's tokenizer and chat format, on sentencepiece alone (no code from the checkpoint).

Matches THUDM's `tokenization_chatglm.py` + `build_prompt` for ChatGLM2-6B:

* ids are the sentencepiece ids; the five specials follow the sentencepiece vocab:
  `[MASK]` = piece count, then `[gMASK]`, `[sMASK]`, `sop`, `eop`;
* every prompt starts with `[gMASK] sop`;
* eos is `</s>` (2), pad is `<unk>` (0);
* decoding drops `<unk>`, `<s>`, `</s>` and the specials; ids past the specials are the padding of
  `padded_vocab_size` (65024 in the real model) and are dropped too.

One deliberate difference: the original ran text through `PreTrainedTokenizer.tokenize`, which turns a
literal `</s>` / `<unk>` typed by a user into the control id. Here user text is always plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from service.models.base import Turn, UnsupportedInput

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
TRAINING_TIME_KEY = "[[训练时间]]"
TRAINING_TIME_VALUE = "2023年"


def build_prompt(prompt: str, history: Sequence[Turn]) -> str:
    """ChatGLM2's prompt text: one `[Round n]` block per earlier turn, rounds counted from 1."""
    rounds = [
        f"[Round {i}]\n\n问：{turn.user}\n\n答：{turn.assistant}\n\n" for i, turn in enumerate(history, 1)
    ]
    return "".join(rounds) + f"[Round {len(history) + 1}]\n\n问：{prompt}\n\n答："


class ChatGLM2Tokenizer:
    """`ChatTokenizer` for ChatGLM2-6B, built on the checkpoint's `tokenizer.model`."""

    def __init__(self, model_file: Path) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        pieces = self._sp.get_piece_size()
        #: name -> id for `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop`.
        self.special_ids: dict[str, int] = {name: pieces + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.unk_id()
        self.eos_token_ids: frozenset[int] = frozenset({self.eos_id})
        self.rewrite_keys: tuple[str, ...] = (TRAINING_TIME_KEY,)
        self.prefix_ids: tuple[int, ...] = (self.special_ids["[gMASK]"], self.special_ids["sop"])
        controls = {self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()}
        self._dropped = frozenset(controls | set(self.special_ids.values()))
        self.special_token_ids: frozenset[int] = self._dropped
        self._names = {i: name for name, i in self.special_ids.items()}

    @property
    def piece_count(self) -> int:
        """Number of sentencepiece pieces (ids below this are plain text pieces or controls)."""
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """Pieces plus the five specials; the model's `padded_vocab_size` must be at least this."""
        return self.piece_count + len(SPECIAL_TOKENS)

    def encode_text(self, text: str) -> list[int]:
        """Sentencepiece ids of `text`, no prefix."""
        return list(self._sp.encode(text))

    def encode_chat(self, prompt: str, history: Sequence[Turn], system: str | None) -> list[int]:
        """`[gMASK] sop` + ids of the ChatGLM2 prompt. ChatGLM2 has no system role, so `system` is refused."""
        if system:
            raise UnsupportedInput("system", "ChatGLM2 has no system prompt")
        return [*self.prefix_ids, *self.encode_text(build_prompt(prompt, history))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with controls, specials and padding ids dropped; broken UTF-8 shows as U+FFFD."""
        kept = [i for i in ids if 0 <= i < self.piece_count and i not in self._dropped]
        return self._sp.decode(kept)

    def finalize(self, text: str) -> str:
        """ChatGLM2's `process_response`: strip, then the training-time placeholder becomes `2023年`."""
        return text.strip().replace(TRAINING_TIME_KEY, TRAINING_TIME_VALUE)

    def token_bytes(self, token: int) -> bytes:
        """A piece's bytes (`▁` a space, `<0xNN>` the byte); a control's or special's name; b"" for padding."""
        if token in self._names:
            return self._names[token].encode()
        if not 0 <= token < self.piece_count:
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.is_byte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.encode() if token in self._dropped else piece.replace("▁", " ").encode()
