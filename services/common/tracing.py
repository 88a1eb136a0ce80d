"""OpenTelemetry set-up, and W3C trace context carried in NATS headers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import default_getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.settings import OtelSettings

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_provider_set = False


def setup_tracing(service: str, settings: OtelSettings) -> None:
    """Install a tracer provider for this process; exporter 'none' keeps the zero-cost no-op API."""
    global _provider_set
    if settings.exporter == "none" or _provider_set:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanExporter,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": f"muserve-{service}"}))
    if settings.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter(endpoint=settings.endpoint)
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=settings.export_delay_ms)
        )
    trace.set_tracer_provider(provider)
    _provider_set = True
    log.info("tracing on: exporter=%s", settings.exporter)


def shutdown_tracing() -> None:
    """Flush and stop the exporter (spans of the last requests must not be lost on exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def enabled() -> bool:
    """Whether this process exports traces (when not, tracing calls cost nothing on hot paths)."""
    return _provider_set


def tracer(name: str) -> trace.Tracer:
    """A tracer for one module."""
    return trace.get_tracer(name)


def span(
    tr: trace.Tracer,
    name: str,
    *,
    context: otel_context.Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
) -> AbstractContextManager[trace.Span]:
    """A current span, or a no-op one when tracing is off (skips the API's per-call overhead)."""
    if not _provider_set:
        return nullcontext(trace.INVALID_SPAN)
    return tr.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def start_span(
    tr: trace.Tracer,
    name: str,
    *,
    context: otel_context.Context | None = None,
    attributes: dict[str, Any] | None = None,
) -> trace.Span:
    """A span ended by the caller (queue wait, prefill), or a no-op one when tracing is off."""
    if not _provider_set:
        return trace.INVALID_SPAN
    return tr.start_span(name, context=context, attributes=attributes)


def inject(headers: dict[str, str] | None = None, ctx: otel_context.Context | None = None) -> dict[str, str]:
    """Write the (current or given) span context into NATS headers as W3C traceparent."""
    out = headers if headers is not None else {}
    if _provider_set:
        _PROPAGATOR.inject(out, context=ctx)
    return out


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """Read the parent span context from NATS (or HTTP) headers; None when absent or tracing is off."""
    if not _provider_set or not headers:
        return None
    return _PROPAGATOR.extract(headers, getter=default_getter)
