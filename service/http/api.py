"""POST /: ChatGLM2-6B's original api.py contract, on the shared request path (same validation, admission,
engine, metrics and log line as gRPC).

    curl -sX POST "http://127.0.0.1:8080" -H 'Content-Type: application/json' \
        -d '{"prompt": "你好", "history": []}'
    {"response": "...", "history": [["你好", "..."]], "status": 200, "time": "2026-11-25 18:00:00"}

Request fields: prompt (required), history ([[query, answer], ...]), max_length, top_p, temperature; absent or
null fields take the server's defaults. Errors: {"status": <HTTP status>, "error": "<field>: <why>"}, with 400
for bad input, 401 without the token, 408 for a body too slow, 413 for one too big, 429 for a full queue (or a
step out of memory), 503 while loading or draining, and 500 only for a bug (logged).
"""

from __future__ import annotations

import datetime
import functools
import json

from aiohttp import web

from service.core.frontend import Frontend
from service.core.types import Answer, ChatInput, RequestedParams
from service.failures import RequestFailed
from service.http.errors import error_boundary, handed_over, http_message, respond
from service.http.fields import invalid, json_type, optional_int, optional_number, require_object, required_string
from service.http.guard import Guard, request_id
from service.models.base import Turn

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # what api.py meant (its own "%Y-%m-d" was a typo)

dumps = functools.partial(json.dumps, ensure_ascii=False)  # Chinese stays readable, as FastAPI sent it


def parse_history(value: object) -> tuple[Turn, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid("history", f"must be a list of [query, answer] pairs, got {json_type(value)}")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise invalid(f"history[{i}]", f"must be a [query, answer] pair of strings, got {json.dumps(pair)[:80]}")
        turns.append(Turn(user=pair[0], assistant=pair[1]))
    return tuple(turns)


def chat_input(body: object, rid: str) -> ChatInput:
    """The request path's input for an api.py body; InvalidRequest (400) naming the field if it has the wrong
    shape."""
    body = require_object(body, "body")
    params = RequestedParams(max_length=optional_int(body, "max_length"),
                             top_p=optional_number(body, "top_p"),
                             temperature=optional_number(body, "temperature"))
    return ChatInput(prompt=required_string(body, "prompt"), history=parse_history(body.get("history")),
                     system=None, params=params, request_id=rid)


def answer_body(answer: Answer) -> dict:
    return {
        "response": answer.text,
        "history": [[turn.user, turn.assistant] for turn in answer.history],
        "status": 200,
        "time": datetime.datetime.now().strftime(TIME_FORMAT),
    }


def error_response(failed: RequestFailed) -> web.Response:
    return respond({"status": failed.kind.http_status, "error": http_message(failed)}, failed, dumps=dumps)


def api_routes(frontend: Frontend, guard: Guard) -> list[web.RouteDef]:
    async def chat(request: web.Request) -> web.Response:
        body = await guard.json_body(request)
        chat = chat_input(body, request_id(request, "api"))
        handed_over(request)
        admitted = await frontend.start(chat, None)
        answer = await frontend.run(admitted)
        return web.json_response(answer_body(answer), dumps=dumps)

    return [web.post("/", error_boundary(chat, error_response, frontend))]
