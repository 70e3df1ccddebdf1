"""`chat-client`: stream an answer to the terminal, or hold a conversation (-i)."""

from __future__ import annotations

import argparse
import sys

import grpc

from client.balancing import DEFAULT_RETRY, RetryPolicy
from client.chat_client import ChatClient
from client.flags import add_security_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-client", description="Talk to a chat.v1 server.")
    parser.add_argument("prompt", nargs="?", help="one prompt; omit with -i for a conversation")
    parser.add_argument("--target", default="localhost:50051",
                        help="HOST:PORT, dns:///NAME:PORT (round_robin over every address), or a comma-separated "
                             "list of IP:PORT (default %(default)s)")
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
    retries = parser.add_argument_group("retries (UNAVAILABLE and RESOURCE_EXHAUSTED, before the first response)")
    retries.add_argument("--retry-max-attempts", type=int, default=DEFAULT_RETRY.max_attempts,
                         help="attempts per call, 1 to 5; 1 turns retries off (default %(default)s)")
    retries.add_argument("--retry-initial-backoff", type=float, default=DEFAULT_RETRY.initial_backoff,
                         help="seconds (default %(default)s)")
    retries.add_argument("--retry-max-backoff", type=float, default=DEFAULT_RETRY.max_backoff,
                         help="seconds (default %(default)s)")
    retries.add_argument("--retry-backoff-multiplier", type=float, default=DEFAULT_RETRY.backoff_multiplier,
                         help="(default %(default)s)")
    retries.add_argument("--wait-for-ready", action="store_true",
                         help="wait (up to --timeout) for a ready replica instead of failing at once")
    add_security_flags(parser)
    return parser


def _params(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "system": args.system}


def retry_policy(args, parser: argparse.ArgumentParser) -> RetryPolicy:
    """The retry flags as a RetryPolicy; a bad value exits with usage, naming the flag."""
    try:
        return RetryPolicy(max_attempts=args.retry_max_attempts, initial_backoff=args.retry_initial_backoff,
                           max_backoff=args.retry_max_backoff, backoff_multiplier=args.retry_backoff_multiplier)
    except ValueError as err:
        parser.error(f"--retry-{str(err).replace('_', '-')}")


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
    parser = build_parser()
    args = parser.parse_args(argv)
    retry = retry_policy(args, parser)
    try:
        client = ChatClient(args.target, timeout=args.timeout, token=args.token, tls=args.tls,
                            root_certificates=args.tls_ca, certificate_chain=args.tls_cert, private_key=args.tls_key,
                            server_name=args.tls_server_name, retry=retry, wait_for_ready=args.wait_for_ready)
    except ValueError as err:
        parser.error(f"--target: {err}")
    with client:
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
