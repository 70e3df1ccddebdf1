"""`chat-client`: stream an answer to the terminal, or hold a conversation (-i)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from client.chat_client import ChatClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-client", description="Talk to a chat.v1 server.")
    parser.add_argument("prompt", nargs="?", help="one prompt; omit with -i for a conversation")
    parser.add_argument("--target", default="localhost:50051", help="server address (default %(default)s)")
    parser.add_argument("-i", "--interactive", action="store_true", help="multi-turn conversation")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per answer, seconds")
    parser.add_argument("--info", action="store_true", help="print the server's model info and exit")
    security = parser.add_argument_group("security")
    security.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    security.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    security.add_argument("--tls-cert", help="client certificate chain, PEM, for mTLS (implies --tls)")
    security.add_argument("--tls-key", help="client private key, PEM, for mTLS")
    security.add_argument("--tls-server-name", help="name to check the server's certificate against")
    security.add_argument("--token", default=os.environ.get("CHAT_TOKEN"),
                          help="bearer token (default: $CHAT_TOKEN)")
    return parser


def _params(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "system": args.system}


def answer(client: ChatClient, prompt: str, history: list, args) -> list:
    """Stream one answer to stdout; returns the updated history."""
    new_history = history
    for chunk in client.stream_chunks(prompt, history, **_params(args)):
        sys.stdout.write(chunk.delta)
        sys.stdout.flush()
        if chunk.history:
            new_history = [(t.user, t.assistant) for t in chunk.history]
    sys.stdout.write("\n")
    return new_history


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with ChatClient(args.target, timeout=args.timeout, token=args.token, tls=args.tls,
                    root_certificates=args.tls_ca, certificate_chain=args.tls_cert, private_key=args.tls_key,
                    server_name=args.tls_server_name) as client:
        try:
            if args.info:
                print(client.model_info())
                return 0
            if not args.interactive:
                if not args.prompt:
                    build_parser().error("give a prompt, or -i for a conversation")
                answer(client, args.prompt, [], args)
                return 0
            history: list = []
            while True:
                try:
                    prompt = input("you> ")
                except EOFError:
                    return 0
                if prompt.strip() in ("/quit", "/exit"):
                    return 0
                if prompt.strip() == "/clear":
                    history = []
                    continue
                if prompt.strip():
                    sys.stdout.write("assistant> ")
                    history = answer(client, prompt, history, args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
