"""A ChatGLM2 tokenizer that llama.cpp's `convert_hf_to_gguf.py` can load under transformers 5.

The converter reads a ChatGLM vocabulary through `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`,
then walks ids 0..padded_vocab_size-1 with `_convert_id_to_token` and asks `tokenizer.tokenizer.sp_model` for
each id's score and kind (unknown, control, unused, byte). THUDM's own `tokenization_chatglm.py` does not run on
transformers 5, so `bench/peers_chatglm2.py` copies this file into an overlay of the checkpoint as
`tokenization_chatglm.py` (the name the checkpoint's `tokenizer_config.json` auto_map points at). It is built
from the checkpoint's own `tokenizer.model` and mirrors THUDM's `SPTokenizer`: the sentencepiece pieces, then
`[MASK] [gMASK] [sMASK] sop eop` right after them, as `service/models/chatglm2_tokenizer.py` numbers them.

Self-contained on purpose (sentencepiece and transformers only): transformers imports it as remote code from
the overlay directory, where the `bench` package is not importable.
"""

from __future__ import annotations

import os

from sentencepiece import SentencePieceProcessor
from transformers import PreTrainedTokenizer

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class SPTokenizer:
    """THUDM's `SPTokenizer` as far as the converter reads it: `sp_model`, `n_words` and the special ids."""

    def __init__(self, model_path: str):
        self.sp_model = SentencePieceProcessor(model_file=model_path)
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.unk_id()
        self.special_tokens = {name: self.n_words + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {index: name for name, index in self.special_tokens.items()}

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.PieceToId(token)

    def convert_id_to_token(self, index: int) -> str:
        """A special's name; "" for bos, eos, pad and ids past the specials (the padded vocab); else the piece."""
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index in (self.eos_id, self.bos_id, self.pad_id) or index < 0 or index >= self.n_words:
            return ""
        return self.sp_model.IdToPiece(index)


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, padding_side: str = "left", **kwargs):
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        self.tokenizer = SPTokenizer(vocab_file)  # before super().__init__, which already asks for the vocab
        super().__init__(padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.pop("", None)  # bos, eos and pad have no text of their own
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenizer.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.tokenizer.sp_model.decode_pieces(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix or "") + "tokenizer.model")
        with open(out, "wb") as f:
            f.write(self.tokenizer.sp_model.serialized_model_proto())
        return (out,)
