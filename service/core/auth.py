"""The bearer token check that gRPC (service/grpc/interceptors.py) and HTTP (service/http/guard.py) share."""

from __future__ import annotations

import hmac


def bearer_matches(header: str | bytes | None, token: str) -> bool:
    """Whether an `authorization` value is `Bearer <token>`. The scheme is case-insensitive (RFC 7235 2.1:
    `bearer`, `BEARER` and `Bearer` are the same); the token is compared in constant time."""
    if not header or not token:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())
