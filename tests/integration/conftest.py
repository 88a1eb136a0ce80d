"""The shared full cluster (every service as a real process) used by most integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL
from services.launcher import default_topology
from tests.integration.harness import LiveCluster, OtlpSink, start_cluster


@pytest.fixture(scope="session")
def otlp_sink() -> Iterator[OtlpSink]:
    sink = OtlpSink()
    yield sink
    sink.close()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory, otlp_sink: OtlpSink) -> Iterator[LiveCluster]:
    """nats-server, scheduler, predictor, gateway, powerd, a SmolLM2 worker and a MiniLM worker."""
    env = {
        "MUSERVE_OTEL__EXPORTER": "otlp",
        "MUSERVE_OTEL__ENDPOINT": otlp_sink.endpoint,
        "MUSERVE_OTEL__EXPORT_DELAY_MS": "100",
    }
    yield from start_cluster(
        tmp_path_factory.mktemp("live"), default_topology(env), env, [DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL]
    )
