"""The Grafana dashboard under deploy/grafana/ asks only for metrics (and labels) that the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.core.record import RequestRecord
from service.failures import Status
from service.metrics import EngineView, GrpcMetrics, Metrics

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana").glob("*.json"))
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "max", "min", "avg", "le", "without", "irate",
                "increase", "on", "ignoring", "label_values"}


def exported() -> tuple[set[str], set[str]]:
    """Sample names and label names of a server's /metrics, with every metric family present."""
    metrics = Metrics()
    grpc_metrics, rpc = GrpcMetrics(metrics.registry), ("unary", "chat.v1.ChatService", "Chat")
    grpc_metrics.started.labels(*rpc).inc()
    grpc_metrics.handled.labels(*rpc, "OK").inc()
    grpc_metrics.handling.labels(*rpc).observe(0.1)
    metrics.watch_engine(lambda: EngineView("m", 1, 2, 30, 100, 50, 20))
    metrics.record(RequestRecord(model="m", code=Status.OK, finish_reason="STOP", prompt_tokens=5, completion_tokens=3,
                                 admitted=True, e2e=1.0, queue_time=0.1, ttft=0.2, itl=0.05))
    metrics.record(RequestRecord(model="m", code=Status.RESOURCE_EXHAUSTED))
    names, labels = set(), set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def targets(dashboard: dict):
    for panel in dashboard["panels"]:
        yield from ((panel["title"], t["expr"]) for t in panel.get("targets", []))
        for inner in panel.get("panels", []):  # rows
            yield from ((inner["title"], t["expr"]) for t in inner.get("targets", []))


def test_there_is_a_dashboard():
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_exported_metrics(path):
    names, labels = exported()
    dashboard = json.loads(path.read_text())
    queries = list(targets(dashboard))
    assert len(queries) >= 10
    titles = " ".join(title.lower() for title, _ in queries)
    for topic in ("throughput", "first token", "inter-token", "queue", "kv", "error"):
        assert topic in titles, topic
    for title, expr in queries:
        expr_no_strings = re.sub(r'"[^"]*"', '""', expr)
        words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr_no_strings))
        metrics = {w for w in words if w.startswith(("chat_", "grpc_server_"))}
        assert metrics, f"{title}: {expr} names no server metric"
        assert metrics <= names, f"{title}: not exported: {sorted(metrics - names)}"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used = {label.strip() for label in group.split(",")}
            assert used <= labels | {"le"}, f"{title}: unknown labels {sorted(used - labels)}"
        for matcher in re.findall(r"\{([^}]*)\}", expr):
            used = {m.group(1) for m in re.finditer(r"(\w+)\s*[!=]~?", matcher)}
            assert used <= labels, f"{title}: unknown labels {sorted(used - labels)}"
    variables = dashboard["templating"]["list"]
    for variable in variables:
        definition = variable.get("definition", "")
        for metric in re.findall(r"label_values\((\w+)", definition):
            assert metric in names, metric
