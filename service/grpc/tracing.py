"""OpenTelemetry tracing (the optional `otel` extra): one span per chat.v1 RPC from opentelemetry-instrumentation-grpc's
aio server interceptor, continuing the caller's trace context from the metadata, with the request's id, token
counts, time to first token and finish reason as attributes.

Off unless --otlp-endpoint is set; this module (and so OpenTelemetry) is imported only then.
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from service.core.record import RequestRecord

TRACED_SERVICE = "chat.v1.ChatService"  # health checks and reflection are not traced


class Tracing:
    """A tracer provider of this server's own (not the global one) and the interceptor that uses it."""

    def __init__(self, endpoint: str = "", *, exporter: SpanExporter | None = None, service_name: str = "chat-server"):
        """Export to the OTLP/gRPC `endpoint` in batches, or to `exporter` span by span (tests)."""
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return aio_server_interceptor(tracer_provider=self.provider, filter_=filters.service_name(TRACED_SERVICE))

    @staticmethod
    def annotate(request_id: str, record: RequestRecord) -> None:
        """Put what is known of the request on the RPC's span (the current one in the handler's task)."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute("chat.request_id", request_id)
        span.set_attribute("chat.status", record.code.name)
        span.set_attribute("chat.prompt_tokens", record.prompt_tokens)
        span.set_attribute("chat.cached_prompt_tokens", record.cached_prompt_tokens)
        span.set_attribute("chat.completion_tokens", record.completion_tokens)
        if record.finish_reason:
            span.set_attribute("chat.finish_reason", record.finish_reason)
        if record.ttft is not None:
            span.set_attribute("chat.time_to_first_token_s", record.ttft)

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting."""
        self.provider.shutdown()
