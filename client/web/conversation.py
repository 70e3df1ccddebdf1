"""One exchange of the chat page (a question and its answer, with its figures) and the history it gives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chat.v1 import chat_pb2

History = list[tuple[str, str]]


def finish_name(reason: int) -> str:
    """`stop`, `length`, `stop_sequence`, ... from a chat.v1 FinishReason value."""
    return chat_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


@dataclass
class Exchange:
    """A user message and the assistant's answer as it arrived. `stopped` when the user stopped it (the partial
    answer is kept); `error` is a friendly message when the server refused or failed the request."""

    user: str
    answer: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    finish: str | None = None
    ttft: float | None = None  # seconds from sending to the first text
    seconds: float | None = None  # seconds from sending to the end
    stopped: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic, repr=False)

    def add(self, chunk: chat_pb2.ChatChunk) -> None:
        """Take one streamed chunk: its text, its token count, and on the last one usage and finish reason."""
        if chunk.delta and self.ttft is None:
            self.ttft = time.monotonic() - self.started
        self.answer += chunk.delta
        self.completion_tokens += chunk.token_count
        if chunk.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish = finish_name(chunk.finish_reason)
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
            self.end()

    def end(self) -> None:
        if self.seconds is None:
            self.seconds = time.monotonic() - self.started

    def stop(self) -> None:
        """The user stopped the answer: keep what arrived."""
        self.stopped = True
        self.end()

    def fail(self, message: str) -> None:
        self.error = message
        self.end()

    @property
    def done(self) -> bool:
        return self.finish is not None or self.stopped or self.error is not None

    @property
    def in_history(self) -> bool:
        """Whether the next turn sends this exchange as history: answered (even partly) and not failed."""
        return self.error is None and self.answer.strip() != ""

    def figures(self) -> str:
        """The line under an answer: tokens, time to first token, tokens/s and how it ended."""
        parts = []
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens} prompt + {self.completion_tokens} answer tokens")
        else:
            parts.append(f"{self.completion_tokens} answer tokens")
        if self.ttft is not None:
            parts.append(f"first token {self.ttft:.2f} s")
        if self.seconds and self.completion_tokens:
            parts.append(f"{self.completion_tokens / self.seconds:.1f} tokens/s")
        if self.stopped:
            parts.append("stopped by you (the partial answer is kept)")
        elif self.finish:
            parts.append(f"finish: {self.finish}")
        return " · ".join(parts)


def history_of(exchanges: list[Exchange]) -> History:
    """The history to send with the next message: every exchange that has an answer."""
    return [(e.user, e.answer) for e in exchanges if e.in_history]
