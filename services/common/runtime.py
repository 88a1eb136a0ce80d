"""Process boilerplate shared by every service: logging, event loop, signals, discovery."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client

from services import __version__
from services.common import subjects, tracing
from services.common.nats_conn import close_nats, connect
from services.common.settings import Settings

log = logging.getLogger(__name__)


def setup_logging(service: str, level: str = "INFO") -> None:
    """One line per record, tagged with the service name (many processes share one terminal)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname).1s [{service}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("nats", "httpx", "urllib3", "opentelemetry"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers warns about tensor-parallel sharding and shows progress bars on every load.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run main(stop_event) on uvloop when available; SIGTERM/SIGINT set the stop event."""
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    runner(wrapper())


def settle() -> None:
    """After start-up: move long-lived objects out of the GC's way (fewer, shorter pauses = better p99)."""
    gc.collect()
    gc.freeze()


async def register_discovery(
    nc: Client, service: str, info: Callable[[], dict[str, Any]], description: str = ""
) -> Any:
    """Answer the NATS micro protocol ($SRV.PING/INFO/STATS) plus a JSON status endpoint."""
    from nats.micro import add_service
    from nats.micro.request import Request

    svc = await add_service(
        nc,
        name=f"muserve-{service}",
        version=__version__,
        description=description or f"muserve {service}",
        metadata={"pid": str(os.getpid())},
    )

    async def status(req: Request) -> None:
        await req.respond(json.dumps(info()).encode())

    await svc.add_endpoint(name="status", subject=subjects.status(service), handler=status)
    return svc


ServeFn = Callable[[Settings, Client, asyncio.Event], Coroutine[Any, Any, None]]


def service_main(name: str, serve: ServeFn) -> None:
    """Entry point of `muserve <name>`: settings, logging, tracing and NATS around serve(), until SIGTERM."""
    settings = Settings()
    setup_logging(name, settings.log_level)

    async def main(stop: asyncio.Event) -> None:
        tracing.setup_tracing(name, settings.otel)
        nc = await connect(settings.nats_url, f"muserve-{name}")
        try:
            await serve(settings, nc, stop)
        finally:
            await close_nats(nc)
            tracing.shutdown_tracing()

    run_service(main)
