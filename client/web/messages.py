"""Friendly words for what can go wrong between the page and the server; never a traceback."""

from __future__ import annotations

import grpc


def unreachable(target: str, *, retrying: bool = False) -> str:
    then = "This page keeps trying." if retrying else "Then press Retry."
    return (f"Can't reach the chat server at `{target}`. Is it running? Start it with `make run` (or "
            f"`chat-server`). {then}")


def explain(err: grpc.RpcError, target: str) -> str:
    """A sentence for a failed call, by its status code."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"The server refused this input: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"The server is busy right now ({details}). Please try again in a moment."
    if code == grpc.StatusCode.UNAVAILABLE:
        if "loading" in details:
            return "The model is still loading. Please try again in a moment."
        if "shut" in details or "engine" in details:
            return f"The server is not available ({details}). Please try again shortly."
        return unreachable(target)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "The answer took too long and was abandoned. Try a shorter answer (max_new_tokens)."
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "The server wants a token: start the page with `CHAT_TOKEN=... chat-web` (or `--token`)."
    if code == grpc.StatusCode.CANCELLED:
        return "The request was cancelled."
    return f"The server could not answer ({code.name}: {details})."
