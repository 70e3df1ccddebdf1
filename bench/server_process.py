"""Start `chat-server` as a subprocess and wait until it serves: the one helper that tests/, bench/ and
scripts/ share, so only one place parses the server's log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (?:[\d.]+|\[[0-9a-f:]+\]|[\w.-]+):(\d+)")
HTTP_LISTENING = re.compile(r"http listening on (?:[\d.]+|\[[0-9a-f:]+\]|[\w.-]+):(\d+)")
SERVING = re.compile(r": (serving .*)$")  # the start-up line: model, context, device, dtype, limits
ENGINE_AT_STOP = "engine at stop:"
COUNTER = re.compile(r"(\w+)=(\d+)")


class ServerProcess:
    """`python -m service.main --port 0 --http-port 0 ARGS...`; its log lines are kept in `lines`, its ports read
    from them (ARGS may set others: the last flag wins). `http=False` leaves `--http-port` out, for a chat-server
    from an older commit (`cwd`) that has no HTTP listener."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, http: bool = True):
        ports = ["--port", "0", *(["--http-port", "0"] if http else [])]
        self.proc = subprocess.Popen([sys.executable, "-m", "service.main", *ports, *args],
                                     stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        self.http_port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            http = HTTP_LISTENING.search(line)
            if http:
                self.http_port = int(http.group(1))
                continue
            found = LISTENING.search(line)
            if found and self.port is None:
                self.port = int(found.group(1))
                self._ready.set()
        self._ready.set()  # the process ended: nobody waits forever

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def serving_line(self) -> str:
        return serving_line(self.lines)

    def engine_counters(self) -> dict[str, int]:
        return engine_counters(self.lines)

    def wait_listening(self, timeout: float = 180) -> None:
        if not self._ready.wait(timeout) or self.port is None:
            raise AssertionError(f"chat-server never listened (exit {self.proc.poll()}):\n{self.log}")

    def wait_serving(self, timeout: float = 180, service: str = "chat.v1.ChatService") -> float:
        """Block until health says SERVING (by default readiness: the model is loaded and warmed up); returns the
        seconds waited."""
        started = time.monotonic()
        self.wait_listening(timeout)
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = started + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"chat-server exited with {self.proc.returncode}:\n{self.log}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
                time.sleep(0.1)
        raise AssertionError("never SERVING:\n" + self.log)

    @classmethod
    def serving(cls, *args: str, timeout: float = 600, **kwargs) -> ServerProcess:
        """A started chat-server, once it is SERVING; stopped again if it never gets there."""
        server = cls(*args, **kwargs)
        try:
            server.wait_serving(timeout=timeout)
        except AssertionError:
            server.stop()
            raise
        return server

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Wait for exit; returns the exit code (the reader thread has then seen every log line)."""
        code = self.proc.wait(timeout)
        time.sleep(0.05)
        return code

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serving_line(lines: list[str]) -> str:
    """The start-up line's message (`serving <model> (context N tokens) on <device> as <dtype>; ...`), or ""
    before the server has said it."""
    for line in lines:
        found = SERVING.search(line)
        if found:
            return found.group(1).strip()
    return ""


def engine_counters(lines: list[str]) -> dict[str, int]:
    """The engine's counters from its last `engine at stop: created=... kv_tokens=...` line ({} until it stopped)."""
    counters: dict[str, int] = {}
    for line in lines:
        if ENGINE_AT_STOP in line:
            counters = {k: int(v) for k, v in COUNTER.findall(line.split(ENGINE_AT_STOP, 1)[1])}
    return counters
