"""The shared chat-server subprocess helper reads the server's start-up and stop lines."""

from __future__ import annotations

from bench.server_process import engine_counters, serving_line

LOG = [
    "2026-11-25 18:00:00,000 INFO service.grpc.server: listening on 127.0.0.1:40123\n",
    "2026-11-25 18:00:05,000 INFO service.runtime: serving SmolLM2-135M-Instruct (context 8192 tokens) on cpu as "
    "torch.float32; max batch 32, max queued 256, KV cache 65536 tokens, torch threads 2\n",
    "2026-11-25 18:01:00,000 INFO service.runtime: engine at stop: created=21 released=21 running=0 waiting=0 "
    "kv_tokens=0 prefilled=21 cancelled_in_queue=1 expired_in_queue=0 dropped_running=2 failed_steps=0\n",
]


def test_serving_line_is_the_start_up_message():
    assert serving_line(LOG) == ("serving SmolLM2-135M-Instruct (context 8192 tokens) on cpu as torch.float32; "
                                 "max batch 32, max queued 256, KV cache 65536 tokens, torch threads 2")
    assert serving_line(LOG[:1]) == ""


def test_engine_counters_come_from_the_stop_line():
    counters = engine_counters(LOG)
    assert counters == {"created": 21, "released": 21, "running": 0, "waiting": 0, "kv_tokens": 0,
                        "prefilled": 21, "cancelled_in_queue": 1, "expired_in_queue": 0, "dropped_running": 2,
                        "failed_steps": 0}
    assert engine_counters(LOG[:2]) == {}
