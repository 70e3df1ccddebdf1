"""How grpc.aio serves a burst that mixes two methods, with no model and no refusal path of ours.

    python -m bench.grpc_method_mix              # 768 calls of one method evenly mixed with 256 of another

A server in a child process answers two unary methods, both at once and both OK; this process sends the burst
and times each call from its start to its end. With the methods added as generic handlers the two finish
together (p99 ratio 1.0). Added as registered methods, as generated `*_pb2_grpc.py` code does since grpcio 1.63
(`add_registered_method_handlers`), the method with three times the calls ends about twice as late: grpc
matches incoming calls per registered method, so the many wait behind their own kind. That is what
bench/burst.py's `mixed 3:1` figure measures, whatever a refusal costs (its `control 3:1` shows the same with
Health.Check in place of the refusals).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time

import grpc

from bench.burst import percentile
from bench.cpu import cpu_flags, cpu_name

SERVICE = "bench.Mix"


def serve(port: int, registered: bool, ready) -> None:
    async def answer(request: bytes, context) -> bytes:
        return request

    async def main() -> None:
        handlers = {name: grpc.unary_unary_rpc_method_handler(answer) for name in ("Many", "Few")}
        server = grpc.aio.server()
        if registered:
            server.add_registered_method_handlers(SERVICE, handlers)
        else:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def one_burst(port: int, many: int, few: int) -> float:
    """p99 of the many calls over p99 of the few, evenly mixed in one burst."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        methods = {name: channel.unary_unary(f"/{SERVICE}/{name}") for name in ("Many", "Few")}

        async def call(name: str) -> tuple[str, float]:
            started = time.perf_counter()
            await methods[name](b"x" * 64, timeout=60)
            return name, time.perf_counter() - started

        every = (many + few) // few
        names = ["Few" if i % every == every - 1 else "Many" for i in range(many + few)]
        done = await asyncio.gather(*(call(name) for name in names))
    p99 = {name: percentile([s for n, s in done if n == name], 99) for name in ("Many", "Few")}
    return p99["Many"] / p99["Few"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(registered: bool, many: int, few: int, rounds: int) -> list[float]:
    port, ready = free_port(), multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, registered, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the server did not start")
        asyncio.run(one_burst(port, many, few))  # warm-up
        return [asyncio.run(one_burst(port, many, few)) for _ in range(rounds)]
    finally:
        server.kill()
        server.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--many", type=int, default=768)
    parser.add_argument("--few", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU {cpu_name()} ({' '.join(cpu_flags())}), grpcio {grpc.__version__}; p99 of {args.many} calls of one "
          f"method over p99 of {args.few} of another, in one burst:")
    for registered in (False, True):
        ratios = measure(registered, args.many, args.few, args.rounds)
        print(f"  {'registered methods' if registered else 'generic handlers  '}  "
              + ", ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
