"""Real clusters for integration tests: nats-server plus service processes, and an OTLP trace sink."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.launcher import Cluster, RunningService, ServiceSpec, free_port

# Small, fast settings: 2 real SmolLM2 layers (nonsense text, real cost shape), quick heartbeats.
FAST_ENV = {
    "MUSERVE_WORKER__NUM_HIDDEN_LAYERS": "2",
    "MUSERVE_WORKER__DTYPE": "float32",
    "MUSERVE_WORKER__HEARTBEAT_MS": "300",
    "MUSERVE_WORKER__PULL_WAIT_MS": "500",
    "MUSERVE_SCHEDULER__WORKER_LEASE_MS": "1500",
    "MUSERVE_SCHEDULER__TELEMETRY_INTERVAL_MS": "200",
    "MUSERVE_SCHEDULER__RECOVERY_GRACE_MS": "1000",
    "MUSERVE_POWERD__INTERVAL_MS": "200",
    "MUSERVE_LOG_LEVEL": "INFO",
}


class OtlpSink:
    """A tiny OTLP/HTTP receiver: services export real protobuf spans to it."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with sink.lock:
                    for rs in req.resource_spans:
                        service = next(
                            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                            "",
                        )
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                attrs = {
                                    a.key: a.value.string_value or a.value.int_value for a in sp.attributes
                                }
                                sink.spans.append(
                                    {
                                        "service": service,
                                        "name": sp.name,
                                        "trace_id": sp.trace_id.hex(),
                                        "span_id": sp.span_id.hex(),
                                        "parent": sp.parent_span_id.hex(),
                                        "attrs": attrs,
                                    }
                                )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        """OTLP traces URL."""
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def spans_of(self, trace_id: str) -> list[dict[str, Any]]:
        """All spans received for one trace."""
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        """Stop the server."""
        self.server.shutdown()


@dataclass
class LiveCluster:
    """A running cluster and how to reach it."""

    cluster: Cluster
    gateway: str
    nats_url: str
    logs: Path
    env: dict[str, str]
    workers: list[RunningService] = field(default_factory=list)

    def service(self, name: str) -> RunningService:
        """The first running service of a kind."""
        return next(s for s in self.cluster.services if s.spec.name == name and s.proc.poll() is None)

    def add_worker(self, env: dict[str, str] | None = None) -> RunningService:
        """Start another worker process."""
        rs = self.cluster.start_service(ServiceSpec("worker", env=env or {}))
        self.workers.append(rs)
        return rs

    def logs_tail(self, lines: int = 60) -> str:
        """The end of every service log (for assertion messages)."""
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def start_cluster(
    tmp: Path, specs: list[ServiceSpec], env: dict[str, str], models: list[str], timeout_s: float = 240.0
) -> Iterator[LiveCluster]:
    """Start, wait ready, yield, stop (a generator for fixtures)."""
    port = free_port()
    full_env = {**FAST_ENV, **env, "MUSERVE_GATEWAY__PORT": str(port), "MUSERVE_DATA_DIR": str(tmp)}
    logs = tmp / "logs"
    cluster = Cluster(full_env, data_dir=tmp, log_dir=logs, echo=lambda s: None)
    try:
        cluster.start(specs)
        gateway = f"http://127.0.0.1:{port}"
        try:
            cluster.wait_ready(gateway, models, timeout_s=timeout_s)
        except Exception as exc:
            raise RuntimeError(f"cluster not ready: {exc}\n{_tail(logs)}") from exc
        assert cluster.nats_url is not None
        yield LiveCluster(cluster, gateway, cluster.nats_url, logs, full_env)
    finally:
        cluster.stop()


def _tail(logs: Path) -> str:
    return "\n".join(
        f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:])
        for f in logs.glob("*.log")
    )


def wait_until(pred: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll pred() until truthy; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def sse_events(raw: bytes) -> list[Any]:
    """Parse an SSE body into JSON objects (and the string "[DONE]")."""
    out: list[Any] = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
