"""Three replicas as real `chat-server` processes on loopback, and one round_robin client across them (an address
list, with the default retry policy and client-side health checking). The tests run in order, as one story:
all three share the calls; SIGTERM one under load (0 unary calls fail); SIGKILL another under load (the unary
calls and the streams that had not started are retried on the survivor; the streams that had begun end with
UNAVAILABLE).

What makes it deterministic:
- every replica runs `--max-batch-size 4`, so streams beyond four per replica wait in its queue, where nothing
  has been sent back yet: such a call is not committed, so gRPC may retry it (gRFC A6);
- streams are opened on an otherwise idle channel, so round_robin alternates them over the replicas;
- the client watches each replica's health (`chat.v1.ChatService`), and SIGTERM turns it NOT_SERVING, so a
  draining replica stops getting calls (with `--drain-delay-seconds`, before it refuses any); a refusal that
  slips through first is a Trailers-Only UNAVAILABLE, retried on the next replica (up to 5 attempts, within
  each call's deadline), and a call that races the GOAWAY is retried by gRPC itself;
- no call waits on an unbounded thing: every call has the client's 120 s deadline, each stream is read to its
  end on its own thread, and the load threads are joined with a bound;
- a replica's share is read from its `GET /metrics` (grpc_server_handled_total) when it serves HTTP, else from
  its per-request log lines, which are written before the answer goes out.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from chat.v1 import chat_pb2

from bench.server_process import ServerProcess
from client.chat_client import ChatClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BATCH = 4
REPLICA_ARGS = ("--threads", "1", "--http-port", "0", "--max-batch-size", str(BATCH), "--grace-seconds", "20",
                "--drain-delay-seconds", "1")
PROMPT = "Count slowly from one to one hundred."
UNARY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    """Three chat-server processes, each loading the default model; started together so they load in parallel."""
    started = [ServerProcess(*REPLICA_ARGS) for _ in range(3)]
    try:
        for replica in started:
            replica.wait_serving(timeout=600, service="chat.v1.ChatService")
        yield started
    finally:
        for replica in started:
            if replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait()


@pytest.fixture(scope="module")
def client(replicas) -> Iterator[ChatClient]:
    with ChatClient(",".join(r.address for r in replicas), timeout=120) as c:
        yield c


def scrape(replica: ServerProcess) -> dict[tuple[str, tuple], float] | None:
    """The replica's metrics as {(sample name, sorted labels): value}, or None when it serves no HTTP."""
    if not replica.http_port:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{replica.http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rpc_count(samples: dict, name: str, method: str, code: str | None = None) -> float:
    """Sum of `name` (grpc_server_started_total / grpc_server_handled_total) for one method (and code)."""
    def wanted(labels: dict) -> bool:
        return labels.get("grpc_method") == method and (code is None or labels.get("grpc_code") == code)

    return sum(value for (sample, labels), value in samples.items() if sample == name and wanted(dict(labels)))


def source(replica: ServerProcess) -> str:
    return "GET /metrics" if replica.http_port else "the per-request log lines"


def served(replica: ServerProcess, request_prefix: str = "u-") -> int:
    """Chat calls the replica has answered with OK: from its /metrics, else from its log lines."""
    samples = scrape(replica)
    if samples is not None:
        return int(rpc_count(samples, "grpc_server_handled_total", "Chat", "OK"))
    pattern = re.compile(rf"request id={re.escape(request_prefix)}\S* status=OK")
    return sum(1 for line in list(replica.lines) if pattern.search(line))


def in_flight(replica: ServerProcess, method: str) -> int | None:
    """Calls of `method` the replica has started and not ended (None without metrics)."""
    samples = scrape(replica)
    if samples is None:
        return None
    return int(rpc_count(samples, "grpc_server_started_total", method)
               - rpc_count(samples, "grpc_server_handled_total", method))


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


class UnaryLoad:
    """`workers` threads calling Chat back to back until the block ends; every outcome is counted."""

    def __init__(self, client: ChatClient, workers: int, tag: str):
        self.client, self.tag = client, tag
        self.ok = 0
        self.failures: list[tuple[grpc.StatusCode, str]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of every call that succeeded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in range(workers)]

    def _loop(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.client.chat_response(PROMPT, request_id=f"u-{self.tag}-{worker}-{n}", **UNARY)
                with self._lock:
                    self.ok += 1
                    self.spans.append((started, time.monotonic()))
            except grpc.RpcError as err:
                with self._lock:
                    self.failures.append((err.code(), err.details()))
            n += 1

    def spanning(self, moment: float) -> int:
        """Successful calls that were in flight at `moment`."""
        return sum(1 for start, end in self.spans if start < moment < end)

    def __enter__(self) -> UnaryLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)
        assert not any(t.is_alive() for t in self._threads), "a unary call hung"


def test_round_robin_spreads_unary_calls_over_every_replica(replicas, client):
    start = [served(r) for r in replicas]
    for _ in range(30):  # until every subchannel is connected and SERVING, and has answered a call
        if all(served(r) > s for r, s in zip(replicas, start, strict=True)):
            break
        client.chat_response(PROMPT, request_id="u-warm", **UNARY)
    assert all(served(r) > s for r, s in zip(replicas, start, strict=True)), "some replica never got a call"
    before = [served(r) for r in replicas]
    for i in range(30):
        client.chat_response(PROMPT, request_id=f"u-rr-{i}", **UNARY)
    def shares() -> list[int]:
        return [served(r) - b for r, b in zip(replicas, before, strict=True)]

    wait_for(lambda: sum(shares()) >= 30, timeout=10)  # the last log lines may still be in the pipe
    assert shares() == [10, 10, 10], shares()
    print(f"\nround_robin shares of 30 unary calls: {shares()} (counted from {source(replicas[0])})")


def test_sigterm_under_load_fails_no_unary_call(replicas, client):
    leaving, staying = replicas[0], replicas[1:]
    with UnaryLoad(client, 6, "term") as load:
        at_start = served(leaving)
        assert wait_for(lambda: served(leaving) >= at_start + 2, timeout=120), "the leaving replica got no calls"
        leaving.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert leaving.wait(60) == 0
        exited = time.monotonic()
        after_exit = [served(r) for r in staying]
        assert wait_for(lambda: all(served(r) >= c + 2 for r, c in zip(staying, after_exit, strict=True)),
                        timeout=120), "the staying replicas stopped getting calls"
    assert load.failures == [], load.failures[:5]
    assert load.ok > 0
    assert "draining:" in leaving.log and "stopped" in leaving.log, leaving.log[-3000:]
    draining = re.search(r"draining: (\d+) requests in flight", leaving.log)
    print(f"\nSIGTERM: {load.ok} unary calls OK, {len(load.failures)} failed; {load.spanning(signalled)} in flight at "
          f"the signal; the replica drained {draining.group(1) if draining else '?'} and exited 0 after "
          f"{exited - signalled:.1f} s")


def read_rest(stream) -> tuple[list | grpc.RpcError, float]:
    """The rest of a stream (or the error that ended it), and when it ended."""
    try:
        result: list | grpc.RpcError = list(stream)
    except grpc.RpcError as err:
        result = err
    return result, time.monotonic()


def test_sigkill_under_load_retries_what_had_not_started(replicas, client):
    """After the SIGTERM test, two replicas are left; SIGKILL one of them. Before the kill, on an idle channel:
    2 x BATCH long streams, all begun (round_robin gives each replica BATCH, filling its batch), then 4 short
    streams that wait in the queues, then unary calls under load (also queued). After it: 0 unary calls fail,
    every queued stream completes, and each begun stream either completes (survivor) or ends with UNAVAILABLE
    within seconds (killed): never a hang."""
    killed, survivor = replicas[1], replicas[2]
    assert replicas[0].proc.poll() is not None, "run the module in order: the SIGTERM test stops replica 0"
    long_tokens, short_tokens = 64, 8
    begun = [client.stream_chunks(f"{PROMPT} Stream {i}.", request_id=f"s-begun-{i}", temperature=0.0,
                                  max_new_tokens=long_tokens, ignore_eos=True) for i in range(2 * BATCH)]
    firsts = [next(stream) for stream in begun]  # every one has sent text: no longer retryable
    queued = [client.stream_chunks(f"{PROMPT} Queued {i}.", request_id=f"s-queued-{i}", temperature=0.0,
                                   max_new_tokens=short_tokens, ignore_eos=True) for i in range(4)]
    with UnaryLoad(client, 4, "kill") as load, concurrent.futures.ThreadPoolExecutor(len(begun) + len(queued)) as pool:
        readers = [pool.submit(read_rest, stream) for stream in begun + queued]
        measured = in_flight(killed, "Chat") is not None
        if measured:  # what the killed replica holds just before the kill, from its own metrics
            assert wait_for(lambda: in_flight(killed, "Chat") >= 1, timeout=60)
            unary_on_killed, streams_on_killed = in_flight(killed, "Chat"), in_flight(killed, "StreamChat")
        else:
            time.sleep(2.0)
        served_before = served(survivor)
        killed.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        results = [reader.result(timeout=150) for reader in readers]
        assert wait_for(lambda: served(survivor) >= served_before + 4, timeout=120)
    assert load.failures == [], load.failures[:5]
    assert load.spanning(killed_at) >= 1  # unary calls were in flight at the kill, and they succeeded
    assert killed.wait(10) == -signal.SIGKILL

    ended: list[tuple[float, str]] = []  # (seconds after the kill, details) of the begun streams that failed
    for first, (result, ended_at) in zip(firsts, results[:len(begun)], strict=True):
        if isinstance(result, grpc.RpcError):
            assert result.code() == grpc.StatusCode.UNAVAILABLE, (result.code(), result.details())
            assert ended_at - killed_at < 15, "a begun stream took too long to end"
            ended.append((ended_at - killed_at, result.details()))
        else:
            assert result[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
            assert first.token_count + sum(c.token_count for c in result) == long_tokens
    assert 1 <= len(ended) < len(begun), ended  # both replicas had begun streams
    for result, _ in results[len(begun):]:
        assert not isinstance(result, grpc.RpcError), (result.code(), result.details())
        assert sum(c.token_count for c in result) == short_tokens and result[-1].finish_reason == \
            chat_pb2.FINISH_REASON_LENGTH
    if measured:  # beyond its begun streams, the killed replica held streams that had sent nothing: retried
        assert unary_on_killed >= 1 and streams_on_killed - len(ended) >= 1, (unary_on_killed, streams_on_killed)
    print(f"\nSIGKILL: {load.ok} unary calls OK, {len(load.failures)} failed, {load.spanning(killed_at)} of them in "
          f"flight at the kill; begun streams: {len(begun) - len(ended)} completed, {len(ended)} UNAVAILABLE within "
          f"{max(t for t, _ in ended):.2f} s ({ended[0][1]!r}); queued streams: {len(queued)} of {len(queued)} "
          f"completed; on the killed replica before the kill: "
          + (f"{unary_on_killed} unary and {streams_on_killed} streams in flight" if measured else "not measured "
             "(no HTTP listener: counted from logs)"))
