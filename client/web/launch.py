"""`chat-web`: serve the chat page (Streamlit) for a chat.v1 server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from client.flags import add_security_flags

APP = Path(__file__).with_name("app.py")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-web", description="A browser chat page for a chat.v1 server.")
    parser.add_argument("--target", default="localhost:50051", help="gRPC server address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8501, help="web port (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="web address to listen on (default %(default)s)")
    parser.add_argument("--connect-wait", type=float, default=60.0,
                        help="seconds the page keeps trying to reach a server that is not up yet (default %(default)s)")
    add_security_flags(parser, "security (towards the gRPC server)", mtls=False)
    return parser


def page_environment(args: argparse.Namespace) -> dict[str, str]:
    """What the page script reads: the server's address, token and TLS settings."""
    env = {"CHAT_WEB_TARGET": args.target, "CHAT_WEB_TLS": "1" if args.tls or args.tls_ca else "0",
           "CHAT_WEB_CONNECT_WAIT": str(args.connect_wait)}
    if args.tls_ca:
        env["CHAT_WEB_TLS_CA"] = os.path.abspath(args.tls_ca)
    if args.tls_server_name:
        env["CHAT_WEB_TLS_SERVER_NAME"] = args.tls_server_name
    if args.token:
        env["CHAT_TOKEN"] = args.token
    return env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.update(page_environment(args))
    from streamlit.web import cli  # the page's own dependency: `pip install .[web]`

    sys.argv = ["streamlit", "run", str(APP), "--server.port", str(args.port), "--server.address", args.host,
                "--server.headless", "true", "--browser.gatherUsageStats", "false", "--global.developmentMode",
                "false", "--client.toolbarMode", "minimal"]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
