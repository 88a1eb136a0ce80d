"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher import EmbeddedNats, free_port


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The model cache (SmolLM2 is converted there once per machine)."""
    return Path(os.environ.get("MUSERVE_CACHE") or Path.home() / ".cache" / "muserve").expanduser()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A private nats-server with JetStream on a free port (never the machine's 4222)."""
    server = EmbeddedNats(free_port(), tmp_path_factory.mktemp("nats-js"))
    server.start()
    yield server
    server.stop()
