"""The OpenAI request's sampling fields beyond the basics, mapped onto the chat.v1 features: n, logprobs and
top_logprobs, presence_penalty, frequency_penalty, logit_bias (string keys, as OpenAI sends them), the
extensions min_p, min_tokens and stop_token_ids, and structured output from `response_format` (OpenAI's
json_schema / json_object / text) or vLLM's `structured_outputs` (json, regex, choice, grammar, json_object).
Each failure is a 400 naming the request's own field; each constraint remembers which field it came from, so a
compile error names `response_format.json_schema.schema` or `structured_outputs.regex`, not chat.v1's name."""

from __future__ import annotations

import json

from service.core.types import Constraint, ConstraintKind
from service.http.fields import invalid, json_type, optional_bool, optional_int, optional_number, require_object

STRUCTURED_OUTPUTS = {"json": ConstraintKind.JSON_SCHEMA, "regex": ConstraintKind.REGEX,
                      "choice": ConstraintKind.CHOICE, "grammar": ConstraintKind.GRAMMAR,
                      "json_object": ConstraintKind.JSON_OBJECT}


def parse_extras(body: dict) -> tuple[dict, dict[str, str]]:
    """(RequestedParams' keyword arguments for these fields, validation field -> request field)."""
    logprobs = bool(optional_bool(body, "logprobs"))
    top_logprobs = optional_int(body, "top_logprobs")
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    constraint, places = parse_constraint(body)
    params = dict(n=optional_int(body, "n"), logprobs=logprobs, top_logprobs=top_logprobs,
                  presence_penalty=optional_number(body, "presence_penalty"),
                  frequency_penalty=optional_number(body, "frequency_penalty"),
                  logit_bias=parse_logit_bias(body), min_p=optional_number(body, "min_p"),
                  min_new_tokens=optional_int(body, "min_tokens"), stop_token_ids=parse_stop_token_ids(body),
                  constraint=constraint)
    return params, {"min_new_tokens": "min_tokens", **places}


def parse_logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} -> ((id, bias), ...). The ids' and biases' ranges are checked by validation."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    pairs = []
    for key, bias in require_object(value, "logit_bias").items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias[{json.dumps(key)[:40]}]", "keys must be token ids (integers)") from None
        pairs.append((token, _required(optional_number, bias, f"logit_bias[{token}]")))
    return tuple(pairs)


def parse_stop_token_ids(body: dict) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid("stop_token_ids", f"must be a list of token ids, got {json_type(value)}")
    return tuple(_required(optional_int, v, f"stop_token_ids[{i}]") for i, v in enumerate(value))


def _required(parse, value: object, where: str):
    """`value` read by a fields.optional_* reader, null refused, errors naming `where`."""
    if value is None:
        raise invalid(where, "must not be null")
    return parse({where: value}, where)


def parse_constraint(body: dict) -> tuple[Constraint | None, dict[str, str]]:
    """The constraint `response_format` or `structured_outputs` asks for (at most one of them), and the request
    field its validation field stands for."""
    formatted = parse_response_format(body.get("response_format"))
    structured = parse_structured_outputs(body.get("structured_outputs"))
    if formatted[0] is not None and structured[0] is not None:
        raise invalid("structured_outputs", "give either response_format or structured_outputs, not both")
    constraint, where = formatted if formatted[0] is not None else structured
    if constraint is None:
        return None, {}
    return constraint, {f"constraint.{constraint.kind.value}": where}


def parse_response_format(value: object) -> tuple[Constraint | None, str]:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}."""
    if value is None:
        return None, ""
    value = require_object(value, "response_format")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise invalid("response_format.type", f"must be text, json_object or json_schema, got {json.dumps(kind)[:40]}")
    extra = sorted(set(value) - allowed[kind])
    if extra:
        raise invalid(f"response_format.{extra[0]}", f"not allowed with type {kind}")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT, None), "response_format"
    spec = require_object(value.get("json_schema"), "response_format.json_schema")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise invalid(f"response_format.json_schema.{extra[0]}", "unknown field")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise invalid("response_format.json_schema.name", "required: a non-empty string")
    optional_bool(spec, "strict")  # a strict schema is what every schema here gets: the answer always matches
    if spec.get("schema") is None:
        raise invalid("response_format.json_schema.schema", "required: a JSON Schema object")
    schema = require_object(spec["schema"], "response_format.json_schema.schema")
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)), "response_format.json_schema.schema"


def parse_structured_outputs(value: object) -> tuple[Constraint | None, str]:
    """vLLM's structured_outputs: exactly one of json (a schema, as an object or a string), regex, choice (a list
    of strings), grammar (Lark) or json_object (true)."""
    if value is None:
        return None, ""
    value = require_object(value, "structured_outputs")
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS))
    if unknown:
        raise invalid(f"structured_outputs.{unknown[0]}", "not supported (json, regex, choice, grammar, json_object)")
    given = [name for name in STRUCTURED_OUTPUTS if value.get(name) not in (None, False)]
    if len(given) != 1:
        raise invalid("structured_outputs", f"must give exactly one of {', '.join(STRUCTURED_OUTPUTS)}, "
                      f"got {len(given)}")
    name = given[0]
    where, item = f"structured_outputs.{name}", value[name]
    kind = STRUCTURED_OUTPUTS[name]
    if kind is ConstraintKind.JSON_OBJECT:
        if item is not True:
            raise invalid(where, f"must be true, got {json_type(item)}")
        return Constraint(kind, None), where
    if kind is ConstraintKind.JSON_SCHEMA:
        if isinstance(item, dict):
            return Constraint(kind, json.dumps(item)), where
        if isinstance(item, str):
            return Constraint(kind, item), where
        raise invalid(where, f"must be a JSON Schema (an object or its text), got {json_type(item)}")
    if kind is ConstraintKind.CHOICE:
        if not isinstance(item, list) or not all(isinstance(c, str) for c in item):
            raise invalid(where, f"must be a list of strings, got {json_type(item)}")
        return Constraint(kind, tuple(item)), where
    if not isinstance(item, str):
        raise invalid(where, f"must be a string, got {json_type(item)}")
    return Constraint(kind, item), where
