"""Opportunistic micro-batching in front of a LengthPredictor."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

from services.common.schemas import Prediction, PredictItem
from services.predictor.base import LengthPredictor


class MicroBatcher:
    """Runs the predictor at once when idle and batches what arrives while it is busy (or within a window)."""

    def __init__(
        self,
        predictor: LengthPredictor,
        *,
        window_ms: float = 0.0,
        max_batch: int = 64,
        executor: Executor | None = None,
    ) -> None:
        self.predictor = predictor
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        # Heavy models run on an executor (one thread for torch) so the loop keeps receiving requests.
        self.executor = executor
        self._pending: list[tuple[Sequence[PredictItem], asyncio.Future[list[Prediction]]]] = []
        self._running = False
        self.batches = 0
        self.items = 0

    async def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """Queue items and wait for their predictions."""
        fut: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            while self._pending:
                batch: list[tuple[Sequence[PredictItem], asyncio.Future[list[Prediction]]]] = []
                n = 0
                while self._pending and (not batch or n + len(self._pending[0][0]) <= self.max_batch):
                    entry = self._pending.pop(0)
                    batch.append(entry)
                    n += len(entry[0])
                flat = [item for items, _ in batch for item in items]
                try:
                    if self.executor is not None:
                        loop = asyncio.get_running_loop()
                        preds = await loop.run_in_executor(self.executor, self.predictor.predict, flat)
                    else:
                        preds = self.predictor.predict(flat)
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                self.items += len(flat)
                i = 0
                for items, fut in batch:
                    if not fut.done():
                        fut.set_result(preds[i : i + len(items)])
                    i += len(items)
                # Let requests that arrived during this batch join the next one.
                await asyncio.sleep(0)
        finally:
            self._running = False
