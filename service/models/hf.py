"""Chat tokenizer for transformers models: the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Sequence

from service.models.base import Turn


class HFChatTokenizer:
    """A transformers tokenizer with a chat template, speaking `ChatTokenizer`."""

    rewrite_keys: tuple[str, ...] = ()

    def __init__(self, tokenizer, eos_token_ids: frozenset[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; a chat model is needed")
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids

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
