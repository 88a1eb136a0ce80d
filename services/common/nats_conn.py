"""NATS connection with reconnect, plus small helpers every service uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

log = logging.getLogger(__name__)


# Clients being shut down on purpose: their disconnect is not worth a warning.
_closing: weakref.WeakSet[Client] = weakref.WeakSet()


async def connect(url: str, name: str, *, connect_timeout_s: float = 10.0) -> Client:
    """Connect with unlimited reconnects; retries the first connect until connect_timeout_s."""
    holder: list[Client] = []

    async def on_error(exc: Exception) -> None:
        log.warning("nats error (%s): %s", name, exc)

    async def on_disconnect() -> None:
        if not holder or holder[0] not in _closing:
            log.warning("nats disconnected (%s)", name)

    async def on_reconnect() -> None:
        log.info("nats reconnected (%s)", name)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout_s
    while True:
        try:
            nc = await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                connect_timeout=2,
                ping_interval=10,
                max_outstanding_pings=3,
                # Keep publishing while reconnecting; buffered writes go out afterwards.
                pending_size=64 * 1024 * 1024,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
            holder.append(nc)
            return nc
        except Exception as exc:
            if loop.time() > deadline:
                raise ConnectionError(f"cannot connect to NATS at {url}: {exc}") from exc
            await asyncio.sleep(0.25)


async def close_nats(nc: Client, drain_timeout_s: float = 2.0) -> None:
    """Drain (let handlers finish) for a bounded time, then close."""
    _closing.add(nc)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), drain_timeout_s)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await nc.close()


class TaskSet:
    """Spawns a task per message (nats-py runs one subscription's callbacks one at a time)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run coro in the background, keeping a reference and logging its failure."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel and await every task."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def concurrent(tasks: TaskSet, handler: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """Wrap a handler so each message runs in its own task."""

    async def cb(msg: Msg) -> None:
        tasks.spawn(handler(msg))  # type: ignore[arg-type]

    return cb


def is_no_responders(msg: Msg) -> bool:
    """True for the server's 503 status reply that says no one subscribes to the subject."""
    return bool(msg.headers) and msg.headers.get("Status") == "503" and not msg.data
