"""Generated ids to client text: whole characters only, stop strings cut, undecided text held back."""

from __future__ import annotations

from collections.abc import Sequence

from service.models.base import ChatTokenizer

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def _undecided_tail(text: str, watched: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into one of `watched`."""
    longest = 0
    for word in watched:
        for size in range(min(len(word) - 1, len(text)), longest, -1):
            if text.endswith(word[:size]):
                longest = size
                break
    return longest


class TextStream:
    """One answer's text as it is generated. `advance` returns only text that can no longer change."""

    def __init__(self, tokenizer: ChatTokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._watched = self._stop + tuple(tokenizer.rewrite_keys)
        self._scanned = 0  # characters of the raw text already searched for stop strings
        self._raw = ""  # text of ids[:_read_offset]: whole characters only
        self._prefix_offset = 0  # ids[_prefix_offset:_read_offset] are decoded again as context for new ids
        self._read_offset = 0
        self.ids: list[int] = []
        self.sent = ""  # the finalized text handed out so far
        self.hit_stop = False
        self.stop_hit = ""  # the stop string that ended the text

    def _decode_new(self, final: bool) -> str:
        """Text of the ids not decoded yet, decoding only them and a few before as context (vLLM's incremental
        detokenizing): the cost per token stays flat as the answer grows. Text ending in a character whose
        bytes are still arriving stays undecided (and is returned without being kept) until `final`."""
        prefix = self._tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._tokenizer.decode(self.ids[self._prefix_offset:])
        new = full[len(prefix):]
        if final or (new and not new.endswith(REPLACEMENT_CHAR)):
            self._raw += new
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return ""
        return new

    def _find_stop(self, raw: str) -> int | None:
        """Where the earliest stop string begins in `raw`, searching only what could hold a new one."""
        if not self._stop:
            return None
        start = max(0, self._scanned - max(len(s) for s in self._stop) + 1)
        hits = [(i, s) for i, s in ((raw.find(s, start), s) for s in self._stop) if i >= 0]
        self._scanned = len(raw)
        if not hits:
            return None
        cut, self.stop_hit = min(hits, key=lambda hit: hit[0])
        return cut

    def advance(self, new_ids: Sequence[int], final: bool) -> str:
        """Take new ids; return the text that became certain. With `final`, return everything left."""
        self.ids.extend(new_ids)
        undecided = self._decode_new(final)
        raw = self._raw + undecided
        cut = self._find_stop(raw)
        if cut is not None:
            raw, final, self.hit_stop = raw[:cut], True, True
        if not final:
            raw = raw.rstrip(REPLACEMENT_CHAR)  # bytes of a character still arriving
            raw = raw[: len(raw) - _undecided_tail(raw, self._watched)]
            raw = raw.rstrip()  # trailing space is decided by what follows it
        text = self._tokenizer.finalize(raw)
        if not text.startswith(self.sent):
            # Finalizing changed text already sent; send nothing rather than contradict it.
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
