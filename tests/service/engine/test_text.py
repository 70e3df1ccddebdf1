"""TextStream: whole characters only, stop strings cut across tokens, held-back text released at the end."""

from __future__ import annotations

from service.engine.text import TextStream


class ByteTokenizer:
    """Each id is one UTF-8 byte, so characters span several ids."""

    eos_token_ids = frozenset({0})
    rewrite_keys: tuple[str, ...] = ()

    def encode_chat(self, prompt, history, system):
        return list(prompt.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def finalize(self, text):
        return text.strip()


class RewritingTokenizer(ByteTokenizer):
    rewrite_keys = ("[[year]]",)

    def finalize(self, text):
        return text.strip().replace("[[year]]", "2023")


def feed(stream: TextStream, text: str) -> list[str]:
    """Push `text` byte by byte; the deltas, then what the end releases."""
    data = text.encode()
    deltas = [stream.advance([b], final=False) for b in data]
    return deltas + [stream.advance([], final=True)]


def test_multibyte_characters_are_never_split():
    deltas = feed(TextStream(ByteTokenizer(), ()), "héllo 你好 🙂!")
    assert "".join(deltas) == "héllo 你好 🙂!"
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # valid on its own


def test_stop_string_across_tokens_is_cut_and_not_sent():
    stream = TextStream(ByteTokenizer(), ("STOP",))
    sent = []
    for b in b"abc STOP def":
        sent.append(stream.advance([b], final=False))
        if stream.hit_stop:
            break
    assert stream.hit_stop
    assert "".join(sent) == "abc"


def test_text_that_might_become_a_stop_string_is_held_back():
    stream = TextStream(ByteTokenizer(), ("STOP",))
    assert "".join(stream.advance([b], final=False) for b in b"go ST") == "go"
    assert stream.advance(list(b"ay"), final=False) == " STay"
    assert not stream.hit_stop


def test_earliest_stop_string_wins():
    stream = TextStream(ByteTokenizer(), ("cd", "b"))
    assert stream.advance(list(b"abcd"), final=False) == "a"
    assert stream.hit_stop


def test_trailing_space_waits_for_what_follows():
    stream = TextStream(ByteTokenizer(), ())
    assert stream.advance(list(b"one "), final=False) == "one"
    assert stream.advance(list(b"two  "), final=False) == " two"
    assert stream.advance([], final=True) == ""
    assert stream.sent == "one two"


def test_rewrites_apply_to_whole_keys_only():
    deltas = feed(TextStream(RewritingTokenizer(), ()), "since [[year]] ok")
    assert "".join(deltas) == "since 2023 ok"
    assert not any("[" in d for d in deltas)
