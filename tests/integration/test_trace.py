"""One request, one trace: gateway -> scheduler -> predictor -> queue wait -> worker prefill/decode."""

from __future__ import annotations

import json
import urllib.request

from services.common.settings import DEFAULT_CHAT_MODEL
from tests.integration.harness import LiveCluster, OtlpSink, wait_until

TRACEPARENT = "00-{trace}-{span}-01"


def test_single_trace_spans_every_service(live: LiveCluster, otlp_sink: OtlpSink) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = json.dumps(
        {"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4}
    ).encode()
    req = urllib.request.Request(
        f"{live.gateway}/v1/chat/completions",
        data=body,
        headers={
            "Content-Type": "application/json",
            "traceparent": TRACEPARENT.format(trace=trace_id, span="00f067aa0ba902b7"),
        },
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200

    wanted = {"muserve-gateway", "muserve-scheduler", "muserve-predictor", "muserve-worker"}

    def services() -> set[str]:
        return {s["service"] for s in otlp_sink.spans_of(trace_id)}

    wait_until(lambda: wanted <= services(), 15, f"spans from {wanted} (got {services()})")
    spans = otlp_sink.spans_of(trace_id)
    names = {s["name"] for s in spans}
    assert {
        "scheduler.admit",
        "predictor.predict",
        "scheduler.queue",
        "worker.prefill",
        "worker.decode",
    } <= names
    # Parent links hold the trace together: every span's parent is in the trace (or the client's span).
    ids = {s["span_id"] for s in spans} | {"00f067aa0ba902b7"}
    assert all(s["parent"] in ids for s in spans), spans
