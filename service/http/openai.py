"""OpenAI-compatible chat completions on the shared request path, so the openai client, LangChain and load
generators work unchanged: POST /v1/chat/completions (streaming as server-sent events) and GET /v1/models; and
vLLM's POST /tokenize, which counts a chat's prompt tokens without running the model.

Messages map onto the chat input: leading system (or developer) messages become the system message, then
user/assistant pairs the history, and the last user message the prompt. Parameters: max_tokens /
max_completion_tokens, temperature, top_p, stop, seed, stream, stream_options.include_usage, n, logprobs,
top_logprobs, presence_penalty, frequency_penalty, logit_bias, response_format, and the extensions top_k,
repetition_penalty, min_p, min_tokens, stop_token_ids, structured_outputs (vLLM's) and priority (vLLM's: lower
runs first); `user` is accepted and not used (service/http/openai_params.py maps the sampling set). OpenAI
parameters that this server does not implement (tools, audio, ...) are refused with a 400 that names them, as is
any parameter it does not know: nothing is silently ignored. Usage reports
prompt_tokens_details.cached_tokens, the prompt tokens reused from the prefix cache. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from service.core.frontend import Frontend
from service.core.types import Answer, ChatInput, Chunk, FinishReason, RequestedParams, TokenCount, TokenLogprob
from service.failures import Failure, RequestFailed
from service.http.errors import error_boundary, handed_over, http_field, http_message, respond
from service.http.fields import (
    invalid,
    json_type,
    optional_bool,
    optional_int,
    optional_number,
    require_object,
    required_string,
)
from service.http.guard import Guard, request_id
from service.http.openai_params import parse_extras
from service.models.base import Turn

log = logging.getLogger(__name__)

ACCEPTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
            "stream", "stream_options", "top_k", "repetition_penalty", "priority", "user", "n", "logprobs",
            "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "min_p",
            "min_tokens", "stop_token_ids", "structured_outputs"}


def _in(*values):
    return lambda value: value in values


# OpenAI parameters this server does not implement: accepted only at the value that means "not used".
UNSUPPORTED = {
    "tools": _in(None, []),
    "tool_choice": _in(None, "none"),
    "parallel_tool_calls": _in(None),
    "functions": _in(None, []),
    "function_call": _in(None, "none"),
    "modalities": _in(None, ["text"]),
    "audio": _in(None),
    "prediction": _in(None),
    "reasoning_effort": _in(None),
    "web_search_options": _in(None),
    "service_tier": _in(None, "auto", "default"),
    "store": _in(None, False),
    "metadata": _in(None, {}),
}

TOKENIZE_ACCEPTED = {"model", "messages"}

SYSTEM_ROLES = ("system", "developer")
FINISH = {FinishReason.STOP: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length"}
# ---- the request --------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """A parsed chat completion request: the chat input, and where each of its parts came from (to name the
    message an error is about)."""

    chat: ChatInput
    model: str | None  # None only on POST /tokenize, where it is optional
    stream: bool
    include_usage: bool
    max_tokens_field: str  # max_tokens or max_completion_tokens, whichever the caller used
    places: dict[str, str]  # validation field -> request field (prompt -> messages[3].content, ...)

    def param(self, field: str | None) -> str | None:
        """The request field for a validation field."""
        if field is None:
            return None
        if field == "max_new_tokens":
            return self.max_tokens_field
        if field in self.places:
            return self.places[field]
        base, bracket, rest = field.partition("[")  # constraint.choice[1] -> structured_outputs.choice[1]
        return f"{self.places[base]}[{rest}" if bracket and base in self.places else field

    def located(self, failed: RequestFailed) -> RequestFailed:
        """`failed` with its field named as this request named it (prompt -> messages[3].content)."""
        field = self.param(http_field(failed))
        if field == http_field(failed):
            return failed
        return RequestFailed(failed.kind, failed.message, field=field, retry_after_ms=failed.retry_after_ms)


def text_of(content: object, field: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            part = require_object(part, f"{field}[{j}]")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{field}[{j}]", f"only text parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(field, f"must be a string or a list of text parts, got {json_type(content)}")


def parse_messages(value: object) -> tuple[str | None, tuple[Turn, ...], str, dict[str, str]]:
    """(system, history, prompt, places) from `messages`: [system...] (user assistant)* user."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty list of messages" if isinstance(value, list)
                      else f"must be a list of messages, got {json_type(value)}")
    systems: list[str] = []
    said: list[tuple[int, str]] = []  # (index, text) of the user/assistant messages, in order
    places: dict[str, str] = {}
    for i, message in enumerate(value):
        field = f"messages[{i}]"
        message = require_object(message, field)
        role = message.get("role")
        if role == "tool" or role == "function":
            raise invalid(f"{field}.role", f"{role} messages are not supported (this server has no tools)")
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise invalid(f"{field}.role", f"must be system, user or assistant, got {json.dumps(role)[:40]}")
        extra = sorted(k for k in set(message) - {"role", "content"} if not (k == "name" and message[k] is None))
        if extra:
            raise invalid(f"{field}.{extra[0]}", "not supported")
        text = text_of(message.get("content"), f"{field}.content")
        if role in SYSTEM_ROLES:
            if said:
                raise invalid(f"{field}.role", "system messages must come before the conversation")
            places.setdefault("system", f"{field}.content")
            systems.append(text)
            continue
        expected = "user" if len(said) % 2 == 0 else "assistant"
        if role != expected:
            raise invalid(f"{field}.role", f"expected {expected}: messages alternate user and assistant")
        said.append((i, text))
    if not said or len(said) % 2 == 0:
        raise invalid("messages", "the last message must be from the user")
    history = []
    for k in range(0, len(said) - 1, 2):
        (qi, question), (ai, answer) = said[k], said[k + 1]
        places[f"history[{k // 2}].user"] = f"messages[{qi}].content"
        places[f"history[{k // 2}].assistant"] = f"messages[{ai}].content"
        history.append(Turn(user=question, assistant=answer))
    places["prompt"] = f"messages[{said[-1][0]}].content"
    places["history"] = "messages"
    system = "\n\n".join(systems) if systems else None
    return system, tuple(history), said[-1][1], places


def check_supported(body: dict) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in body and not unused(body[name]):
            raise invalid(name, f"not supported by this server (got {json.dumps(body[name])[:60]})")
    unknown = sorted(set(body) - ACCEPTED - set(UNSUPPORTED))
    if unknown:
        raise invalid(unknown[0], f"unknown parameter {json.dumps(unknown[0])}")


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise invalid("stop", f"must be a string or a list of strings, got {json_type(stop)}")


def parse_max_tokens(body: dict) -> tuple[int | None, str]:
    legacy, new = optional_int(body, "max_tokens"), optional_int(body, "max_completion_tokens")
    if legacy is not None and new is not None and legacy != new:
        raise invalid("max_completion_tokens", f"differs from max_tokens ({new} != {legacy}); give one")
    return (new, "max_completion_tokens") if new is not None else (legacy, "max_tokens")


def parse_stream(body: dict) -> tuple[bool, bool]:
    stream = bool(optional_bool(body, "stream"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    options = require_object(options, "stream_options")
    if not stream:
        raise invalid("stream_options", "only allowed with stream: true")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise invalid(f"stream_options.{unknown[0]}", f"unknown option {json.dumps(unknown[0])}")
    return stream, bool(optional_bool(options, "include_usage"))


def parse_completion(body: object, rid: str) -> Completion:
    body = require_object(body, "body")
    check_supported(body)
    model = required_string(body, "model")
    system, history, prompt, places = parse_messages(body.get("messages"))
    max_tokens, max_tokens_field = parse_max_tokens(body)
    stream, include_usage = parse_stream(body)
    extras, extra_places = parse_extras(body)
    params = RequestedParams(max_new_tokens=max_tokens, temperature=optional_number(body, "temperature"),
                             top_p=optional_number(body, "top_p"), top_k=optional_int(body, "top_k"),
                             repetition_penalty=optional_number(body, "repetition_penalty"),
                             seed=optional_int(body, "seed"),
                             stop=parse_stop(body), **extras)
    places.update(extra_places)
    priority = optional_int(body, "priority")
    chat = ChatInput(prompt=prompt, history=history, system=system, params=params, request_id=rid,
                     priority=0 if priority is None else priority)
    return Completion(chat, model, stream, include_usage, max_tokens_field, places)


def parse_tokenize(body: object, rid: str) -> Completion:
    """A POST /tokenize body: OpenAI-style `messages` and an optional `model`; nothing else. Its chat input
    takes the server's defaults, as a chat completion that sets no parameters would."""
    body = require_object(body, "body")
    if "prompt" in body:
        raise invalid("prompt", "not supported: this server tokenizes chats; send messages")
    unknown = sorted(set(body) - TOKENIZE_ACCEPTED)
    if unknown:
        raise invalid(unknown[0], f"unknown parameter {json.dumps(unknown[0])}")
    model = body.get("model")
    if model is not None:
        model = required_string(body, "model")
    system, history, prompt, places = parse_messages(body.get("messages"))
    chat = ChatInput(prompt=prompt, history=history, system=system, params=RequestedParams(), request_id=rid)
    return Completion(chat, model, stream=False, include_usage=False, max_tokens_field="max_tokens", places=places)


def tokenize_body(count: TokenCount) -> dict:
    """vLLM's TokenizeResponse: the prompt's token count, the per-request context and the ids."""
    return {"count": count.prompt_tokens, "max_model_len": count.context_length, "tokens": list(count.prompt_ids)}


# ---- the answer ---------------------------------------------------------------------------------------------


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": answer.cached_prompt_tokens}}


TokenBytes = Callable[[int], bytes]


def token_logprob(token: int, logprob: float, token_bytes: TokenBytes) -> dict:
    data = token_bytes(token)
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


def logprobs_body(tokens: Sequence[TokenLogprob], token_bytes: TokenBytes) -> dict:
    """OpenAI's choices[].logprobs: each token's logprob and bytes, and its top alternatives."""
    return {"content": [{**token_logprob(t.id, t.logprob, token_bytes),
                         "top_logprobs": [token_logprob(i, lp, token_bytes) for i, lp in t.top]} for t in tokens],
            "refusal": None}


def completion_body(cid: str, created: int, answer: Answer, params: RequestedParams,
                    token_bytes: TokenBytes) -> dict:
    """OpenAI's chat.completion, one choice per answer; vLLM's stop_reason names the stop that matched."""
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs_body(c.tokens, token_bytes) if params.logprobs else None,
                "finish_reason": FINISH.get(c.finish_reason, "stop"), "stop_reason": c.stop_sequence or None}
               for c in answer.choices]
    return {"id": cid, "object": "chat.completion", "created": created, "model": answer.model,
            "choices": choices, "usage": usage(answer)}


def error_body(failed: RequestFailed) -> dict:
    """OpenAI's error shape; `param` is the request's own field (`messages[2].content`, `max_tokens`)."""
    kind = failed.kind
    return {"error": {"message": http_message(failed), "type": kind.openai_type, "param": http_field(failed),
                      "code": kind.openai_code}}


def error_response(failed: RequestFailed) -> web.Response:
    return respond(error_body(failed), failed)


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class Streamer:
    """Writes one completion as server-sent events: a role chunk per answer, content chunks (with their tokens'
    logprobs when asked for), a finish chunk per answer, the usage chunk if asked for, `data: [DONE]`. Each
    chunk's choice carries its answer's `index`."""

    def __init__(self, response: web.StreamResponse, cid: str, created: int, model: str,
                 completion: Completion, token_bytes: TokenBytes):
        self.response = response
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self.include_usage = completion.include_usage
        self.logprobs = completion.chat.params.logprobs
        self.token_bytes = token_bytes

    async def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None,
                    **extra) -> None:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}
        body = {**self.head, "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        await self.response.write(sse(body))

    async def start(self, answers: int) -> None:
        for index in range(answers):
            await self.chunk(index, {"role": "assistant", "content": ""})

    async def content(self, chunk: Chunk) -> None:
        """A chunk's text, and its answer's finish when it is the last."""
        if chunk.text or (self.logprobs and chunk.tokens):
            logprobs = logprobs_body(chunk.tokens, self.token_bytes) if self.logprobs else None
            await self.chunk(chunk.index, {"content": chunk.text}, logprobs=logprobs)
        if chunk.finish_reason != FinishReason.UNSPECIFIED:
            await self.chunk(chunk.index, {}, FINISH.get(chunk.finish_reason, "stop"),
                             stop_reason=chunk.stop_sequence or None)

    async def finish(self, answer: Answer) -> None:
        if self.include_usage:
            await self.response.write(sse({**self.head, "choices": [], "usage": usage(answer)}))
        await self.response.write(sse("[DONE]"))

    async def fail(self, error: RequestFailed) -> None:
        await self.response.write(sse(error_body(error)))
        await self.response.write(sse("[DONE]"))


# ---- the routes ---------------------------------------------------------------------------------------------


def openai_routes(frontend: Frontend, guard: Guard) -> list[web.RouteDef]:
    started = int(time.time())

    def model_card(name: str) -> dict:
        """OpenAI's model object, with vLLM's `max_model_len`: the longest prompt plus answer a request may have."""
        return {"id": name, "object": "model", "created": started, "owned_by": "chat.v1",
                "max_model_len": frontend.engine.max_context}

    def served_model() -> str:
        if frontend.engine is None:
            raise RequestFailed(Failure.LOADING, "the model is still loading; retry shortly")
        return frontend.model

    async def models(request: web.Request) -> web.Response:
        guard.check_token(request)
        return web.json_response({"object": "list", "data": [model_card(served_model())]})

    async def model(request: web.Request) -> web.Response:
        guard.check_token(request)
        name = served_model()
        if request.match_info["model"] != name:
            raise not_found(request.match_info["model"], name)
        return web.json_response(model_card(name))

    async def completions(request: web.Request) -> web.StreamResponse:
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        body = await guard.json_body(request)
        completion = parse_completion(body, request_id(request, default=cid))
        name = frontend.model
        if name and completion.model != name:
            raise not_found(completion.model, name)
        handed_over(request)
        try:
            admitted = await frontend.start(completion.chat, None)
        except RequestFailed as failed:
            raise completion.located(failed) from None
        if completion.stream:
            return await stream(request, completion, admitted, cid, created)
        answer = await frontend.run(admitted)
        return web.json_response(completion_body(cid, created, answer, completion.chat.params, frontend.token_bytes))

    async def tokenize(request: web.Request) -> web.Response:
        """vLLM's POST /tokenize for chats: what a chat completion with these messages would take as its prompt;
        the same checks and refusals, no engine work (Frontend.count)."""
        body = await guard.json_body(request)
        parsed = parse_tokenize(body, request_id(request, "tokenize"))
        name = frontend.model
        if parsed.model is not None and name and parsed.model != name:
            raise not_found(parsed.model, name)
        try:
            count = await frontend.count(parsed.chat)
        except RequestFailed as failed:
            raise parsed.located(failed) from None
        return web.json_response(tokenize_body(count))

    async def stream(request, completion: Completion, admitted, cid: str, created: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        streamer = Streamer(response, cid, created, admitted.model, completion, frontend.token_bytes)
        try:
            async with contextlib.aclosing(frontend.stream(admitted)) as chunks:
                await response.prepare(request)
                await streamer.start(completion.chat.params.n or 1)
                async for chunk in chunks:
                    await streamer.content(chunk)
            await streamer.finish(admitted.answer)
        except RequestFailed as failed:
            await streamer.fail(failed)
        except ConnectionResetError:  # the client went away; the request has already left the engine
            log.debug("client of %s disconnected mid-stream", cid)
        return response

    def routes(*pairs) -> list[web.RouteDef]:
        return [route(path, error_boundary(handler, error_response, frontend)) for route, path, handler in pairs]

    return routes((web.post, "/v1/chat/completions", completions), (web.get, "/v1/models", models),
                  (web.get, "/v1/models/{model}", model), (web.post, "/tokenize", tokenize))


def not_found(asked: str, served: str) -> RequestFailed:
    return RequestFailed(Failure.NOT_FOUND, f"no model {asked!r}; this server serves {served!r}", field="model")
