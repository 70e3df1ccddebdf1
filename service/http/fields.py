"""Typed fields out of a JSON request body. Every failure is an InvalidRequest (400) naming the field and what was
wrong."""

from __future__ import annotations

import math

from service.core.validation import InvalidRequest, shown

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(field, message)


def require_object(value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(field, f"must be a JSON object, got {json_type(value)}")
    return value


def optional_int(body: dict, field: str) -> int | None:
    """An integer, or None when absent or null. 2048.0 counts as 2048; true, "2048" and 2048.5 do not."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be an integer, got {json_type(value)}")
    return value


def optional_number(body: dict, field: str) -> float | None:
    """A number as a float, or None when absent or null. An integer literal too large for a float (JSON allows
    hundreds of digits) is refused here; the ranges are checked by the request path's validation."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, f"must be a number, got {json_type(value)}")
    try:
        return float(value)
    except OverflowError:
        raise invalid(field, f"must be a number in range, got one too large ({shown(value)})") from None


def optional_bool(body: dict, field: str) -> bool | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(field, f"must be true or false, got {json_type(value)}")
    return value


def required_string(body: dict, field: str) -> str:
    value = body.get(field)
    if value is None:
        raise invalid(field, "required")
    if not isinstance(value, str):
        raise invalid(field, f"must be a string, got {json_type(value)}")
    return value
