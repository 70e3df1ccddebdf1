"""Prometheus metrics of one server: request and engine metrics (`chat_*`, named after vLLM's) and gRPC server
metrics (`grpc_server_*`, named as by the Go and Java interceptors), in a registry of its own.

Nothing here runs per token: requests are recorded once when they end, and the engine's gauges and prefix
counters are read from `EngineStats` when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from service.core.record import RequestRecord
from service.failures import Status

__all__ = ["CONTENT_TYPE_LATEST", "EngineView", "GrpcMetrics", "Metrics"]

# Buckets like vLLM's (vllm/v1/metrics/loggers.py), with a few shorter ones for a small model on a CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
GRPC_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                        600.0)


def token_buckets(max_tokens: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_tokens (vLLM's build_1_2_5_buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_tokens:
                return tuple(buckets)
            buckets.append(float(value))
        exponent += 1


@dataclass(frozen=True)
class EngineView:
    """What the engine collector reads at scrape time."""

    model: str
    running: int
    waiting: int
    kv_tokens: int
    kv_capacity: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    preemptions: int = 0
    kv_blocks_held: int = 0
    kv_blocks_cached: int = 0
    masked_rows: int = 0
    mask_seconds: float = 0.0


class EngineCollector:
    """Gauges and prefix-cache counters read from the engine when scraped (nothing to record per step)."""

    def __init__(self, read: Callable[[], EngineView | None]):
        self._read = read

    def collect(self):
        view = self._read()
        running = GaugeMetricFamily("chat_requests_running", "Requests in the running batch.", labels=["model"])
        waiting = GaugeMetricFamily("chat_requests_waiting", "Requests admitted and waiting for the batch.",
                                    labels=["model"])
        usage = GaugeMetricFamily("chat_kv_cache_usage_ratio",
                                  "KV positions running requests have computed, as a fraction of the pool.",
                                  labels=["model"])
        queries = CounterMetricFamily("chat_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels=["model"])
        hits = CounterMetricFamily("chat_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.",
                                   labels=["model"])
        preempted = CounterMetricFamily("chat_engine_preemptions", "Times a running request gave its KV blocks "
                                        "back to wait and be recomputed.", labels=["model"])
        blocks = GaugeMetricFamily("chat_kv_blocks", "KV blocks by state: held by running requests, or free and "
                                   "keeping a cached prefix.", labels=["model", "state"])
        masked = CounterMetricFamily("chat_constraint_masked_rows", "Row-steps sampled under a structured-output "
                                     "constraint's token mask.", labels=["model"])
        mask_time = CounterMetricFamily("chat_constraint_mask_seconds", "Time spent computing and applying the "
                                        "constraints' token masks.", labels=["model"])
        if view is not None:
            masked.add_metric([view.model], view.masked_rows)
            mask_time.add_metric([view.model], view.mask_seconds)
            running.add_metric([view.model], view.running)
            waiting.add_metric([view.model], view.waiting)
            usage.add_metric([view.model], view.kv_tokens / view.kv_capacity if view.kv_capacity else 0.0)
            queries.add_metric([view.model], view.prefix_queried_tokens)
            hits.add_metric([view.model], view.prefix_hit_tokens)
            preempted.add_metric([view.model], view.preemptions)
            blocks.add_metric([view.model, "held"], view.kv_blocks_held)
            blocks.add_metric([view.model, "cached"], view.kv_blocks_cached)
        return [running, waiting, usage, queries, hits, preempted, blocks, masked, mask_time]


class Metrics:
    """Request metrics of one server, in its own registry (several servers may share a process)."""

    def __init__(self, context_length: int = 32768):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens of requests that reached the engine.",
                                     ["model"], registry=r)
        self.prompt_cached_tokens = Counter("chat_prompt_cached_tokens",
                                            "Prompt tokens whose KV came from the prefix cache, of requests that "
                                            "reached their last chunk.", ["model"], registry=r)
        self.generation_tokens = Counter("chat_generation_tokens", "Tokens generated (sent or not).", ["model"],
                                         registry=r)
        self.success = Counter("chat_request_success", "Requests answered, by finish reason.",
                               ["model", "finish_reason"], registry=r)
        self.failure = Counter("chat_request_failure", "Requests that ended without an answer, by status code.",
                               ["model", "code"], registry=r)
        self.ttft = Histogram("chat_time_to_first_token_seconds", "From arrival to the first token.", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("chat_inter_token_latency_seconds",
                             "Each request's mean gap between tokens after the first (one sample per request).",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("chat_e2e_request_latency_seconds", "From arrival to the end of the request.", ["model"],
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("chat_request_queue_time_seconds", "From submission to the engine's prefill.",
                                    ["model"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        tokens = token_buckets(context_length)
        self._children: dict[str, tuple] = {}
        self._outcomes: dict[tuple[str, str, str | None], Counter] = {}
        self.request_prompt_tokens = Histogram("chat_request_prompt_tokens", "Prompt tokens per request.", ["model"],
                                               buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram("chat_request_generation_tokens", "Generated tokens per request.",
                                                   ["model"], buckets=tokens, registry=r)

    def watch_engine(self, read: Callable[[], EngineView | None]) -> None:
        """Read the engine's gauges and prefix counters from `read()` at every scrape."""
        self.registry.register(EngineCollector(read))

    def _per_model(self, model: str) -> tuple:
        """The model's labelled children, looked up once (labels() costs more than the update itself)."""
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = tuple(metric.labels(model) for metric in (
                self.prompt_tokens, self.prompt_cached_tokens, self.generation_tokens, self.request_prompt_tokens,
                self.request_generation_tokens, self.e2e, self.queue_time, self.ttft, self.itl))
        return children

    def _outcome(self, model: str, code: Status, finish_reason: str | None):
        key = (model, code, finish_reason)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = (self.success.labels(model, finish_reason) if code is Status.OK
                                           else self.failure.labels(model, code.name))
        return child

    def record(self, r: RequestRecord) -> None:
        """One request has ended. Called once per request, on the event loop."""
        self._outcome(r.model, r.code, r.finish_reason).inc()
        if not r.admitted:
            return
        prompt, cached, generation, prompt_hist, generation_hist, e2e, queue_time, ttft, itl = self._per_model(r.model)
        prompt.inc(r.prompt_tokens)
        cached.inc(r.cached_prompt_tokens)
        generation.inc(r.completion_tokens)
        prompt_hist.observe(r.prompt_tokens)
        generation_hist.observe(r.completion_tokens)
        e2e.observe(r.e2e or 0.0)
        if r.queue_time is not None:
            queue_time.observe(r.queue_time)
        if r.ttft is not None:
            ttft.observe(r.ttft)
        if r.itl is not None:
            itl.observe(r.itl)

    def exposition(self) -> bytes:
        """Everything in the Prometheus text format."""
        return generate_latest(self.registry)


class GrpcMetrics:
    """grpc_server_started_total, grpc_server_handled_total and grpc_server_handling_seconds, labelled as by
    go-grpc-prometheus (grpc_type, grpc_service, grpc_method, and grpc_code on handled)."""

    LABELS = ("grpc_type", "grpc_service", "grpc_method")

    def __init__(self, registry: CollectorRegistry):
        self.started = Counter("grpc_server_started", "RPCs started on the server.", self.LABELS, registry=registry)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, whatever their status.",
                               (*self.LABELS, "grpc_code"), registry=registry)
        self.handling = Histogram("grpc_server_handling_seconds", "Time from the start of an RPC to its end.",
                                  self.LABELS, buckets=GRPC_LATENCY_BUCKETS, registry=registry)
