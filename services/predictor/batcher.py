"""Opportunistic micro-batching in front of a LengthPredictor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor

from services.common.schemas import Prediction, PredictItem
from services.predictor.base import LengthPredictor

Entry = tuple[Sequence[PredictItem], "asyncio.Future[list[Prediction]]"]
# Weight of the newest batch in the running estimate of the predictor's time per item.
COST_EWMA = 0.3
# The busy-share bucket holds at most this much time: an idle service absorbs a short burst whole.
BUDGET_CAP_S = 1.0


class MicroBatcher:
    """Runs the predictor at once when idle and batches what arrives while it is busy (or within a window).

    With an overflow predictor, calls that would wait longer than max_wait_ms for the main one (judged
    by its measured time per item) are answered by the overflow at once, and the main one may keep
    the CPU busy for at most max_busy_share of the time (a token bucket): under a burst the service
    degrades to the cheaper predictor instead of falling behind or starving its neighbours.
    """

    def __init__(
        self,
        predictor: LengthPredictor,
        *,
        window_ms: float = 0.0,
        max_batch: int = 64,
        executor: Executor | None = None,
        overflow: LengthPredictor | None = None,
        max_wait_ms: float = 250.0,
        max_busy_share: float = 1.0,
    ) -> None:
        if not 0.0 < max_busy_share <= 1.0:
            raise ValueError(f"max_busy_share must be in (0, 1], got {max_busy_share}")
        self.predictor = predictor
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        # Heavy models run on an executor (one thread for torch) so the loop keeps receiving requests.
        self.executor = executor
        self.overflow = overflow
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_busy_share = max_busy_share
        # Seconds of main-predictor time available now; refills at max_busy_share per second.
        self._budget_s = BUDGET_CAP_S
        self._budget_at = time.monotonic()
        self._pending: list[Entry] = []
        self._running = False
        self._s_per_item: float | None = None
        self.batches = 0
        self.items = 0
        self.shed = 0  # items the overflow predictor answered

    async def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """Queue items and wait for their predictions."""
        fut: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _run(
        self, predictor: LengthPredictor, flat: list[PredictItem]
    ) -> tuple[list[Prediction], float]:
        """Predictions and the CPU seconds they took on the thread that ran them (torch with one thread
        computes on it), which is what the busy share bounds: wall time would count waiting for a core."""

        def timed() -> tuple[list[Prediction], float]:
            t0 = time.thread_time()
            preds = predictor.predict(flat)
            return preds, time.thread_time() - t0

        if self.executor is not None:
            return await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        return timed()

    def _late(self, ahead_items: int) -> list[Entry]:
        """Pending calls that could not start within max_wait behind ahead_items items (taken out)."""
        if self.overflow is None or self._s_per_item is None:
            return []
        keep: list[Entry] = []
        late: list[Entry] = []
        cost_s = ahead_items * self._s_per_item
        for entry in self._pending:
            (late if cost_s > self.max_wait_s else keep).append(entry)
            if cost_s <= self.max_wait_s:
                cost_s += len(entry[0]) * self._s_per_item
        self._pending = keep
        return late

    async def _answer(self, predictor: LengthPredictor, batch: list[Entry]) -> float | None:
        """Run one batch and hand each caller its slice (returns its CPU seconds; None if it failed:
        the error reaches every caller of the batch)."""
        flat = [item for items, _ in batch for item in items]
        try:
            preds, cpu_s = await self._run(predictor, flat)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return None
        i = 0
        for items, fut in batch:
            if not fut.done():
                fut.set_result(preds[i : i + len(items)])
            i += len(items)
        return cpu_s

    def _main_allowed(self) -> bool:
        """Whether the busy-share budget lets the main predictor run the next batch."""
        if self.overflow is None or self.max_busy_share >= 1.0:
            return True
        now = time.monotonic()
        self._budget_s = min(BUDGET_CAP_S, self._budget_s + (now - self._budget_at) * self.max_busy_share)
        self._budget_at = now
        return self._budget_s > 0.0

    async def _drain(self) -> None:
        try:
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while self._pending:
                batch: list[Entry] = []
                n = 0
                limit = self.max_batch
                if self.overflow is not None and self._s_per_item:
                    # A batch's callers all wait for its end: no bigger than max_wait allows.
                    limit = min(limit, max(1, int(self.max_wait_s / self._s_per_item)))
                while self._pending and (not batch or n + len(self._pending[0][0]) <= limit):
                    entry = self._pending.pop(0)
                    batch.append(entry)
                    n += len(entry[0])
                late = self._late(n)
                if not self._main_allowed():
                    late, batch = batch + late, []
                if late and self.overflow is not None and await self._answer(self.overflow, late) is not None:
                    self.shed += sum(len(items) for items, _ in late)
                if batch:
                    t0 = time.perf_counter()
                    cpu_s = await self._answer(self.predictor, batch)
                    wall_s = time.perf_counter() - t0
                    self._budget_s -= wall_s if cpu_s is None else cpu_s
                    if cpu_s is not None:
                        # Waits are wall time: a busy CPU makes every batch take longer.
                        per_item = wall_s / max(n, 1)
                        prev = self._s_per_item
                        self._s_per_item = per_item if prev is None else prev + COST_EWMA * (per_item - prev)
                        self.batches += 1
                        self.items += n
                # Let requests that arrived during this batch join the next one.
                await asyncio.sleep(0)
        finally:
            self._running = False
