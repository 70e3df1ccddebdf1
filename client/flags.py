"""The connection flags every command-line front end of the client shares (chat-client, chat-web)."""

from __future__ import annotations

import argparse
import os


def add_security_flags(parser: argparse.ArgumentParser, title: str = "security", *, mtls: bool = True) -> None:
    """--tls, --tls-ca, --tls-server-name and --token (default $CHAT_TOKEN); with `mtls`, --tls-cert and
    --tls-key for a client certificate too."""
    security = parser.add_argument_group(title)
    security.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    security.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    if mtls:
        security.add_argument("--tls-cert", help="client certificate chain, PEM, for mTLS (implies --tls)")
        security.add_argument("--tls-key", help="client private key, PEM, for mTLS")
    security.add_argument("--tls-server-name", help="name to check the server's certificate against")
    security.add_argument("--token", default=os.environ.get("CHAT_TOKEN"), help="bearer token (default: $CHAT_TOKEN)")
