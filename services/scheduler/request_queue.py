"""Request queues: FCFS and speculative shortest-job-first with an aging bound (pure, no I/O)."""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class SchedulingPolicy(StrEnum):
    """Queue orderings a model group can use."""

    FCFS = "fcfs"
    SSJF = "ssjf"
    ORACLE = "oracle"  # SJF on true lengths: a benchmark baseline, never for production


@dataclass(eq=False)
class QueuedRequest:
    """A request waiting for a worker slot; ordering keys live here."""

    request_id: str
    arrival_s: float
    predicted_exec_ms: float
    payload: Any = None
    # The finer (continuous) exec estimate when there is one: it orders the queue and sets the aging
    # bound; predicted_exec_ms (the length class's typical exec) still drives the work sums.
    rank_ms: float | None = None
    # Insertion order, assigned by the queue on first add; kept when a request is put back.
    seq: int = field(default=-1, compare=False)

    def estimate_ms(self) -> float:
        """The finest predicted exec time at hand."""
        return self.predicted_exec_ms if self.rank_ms is None else self.rank_ms

    def sjf_key(self) -> tuple[float, float, int]:
        """Shortest predicted first; ties by arrival."""
        return (self.estimate_ms(), self.arrival_s, self.seq)

    def fcfs_key(self) -> tuple[float, int]:
        """Earliest arrival first."""
        return (self.arrival_s, self.seq)


class _LazyHeap:
    """A heap whose entries can be deleted in O(1) by forgetting them in the owner's index."""

    def __init__(self) -> None:
        # (key, push counter, request): the counter breaks ties, so requests are never compared.
        self._heap: list[tuple[Any, int, QueuedRequest]] = []
        self._pushes = itertools.count()

    def push(self, key: Any, req: QueuedRequest) -> None:
        heapq.heappush(self._heap, (key, next(self._pushes), req))

    def top(self, alive: dict[str, QueuedRequest]) -> tuple[Any, QueuedRequest] | None:
        # Drop entries whose request left the queue (or was re-added as a new object).
        while self._heap:
            key, _, req = self._heap[0]
            if alive.get(req.request_id) is req:
                return key, req
            heapq.heappop(self._heap)
        return None

    def clear(self) -> None:
        self._heap.clear()


class RequestQueue(ABC):
    """A model group's waiting requests."""

    policy: SchedulingPolicy

    def __init__(self) -> None:
        self._alive: dict[str, QueuedRequest] = {}
        self._by_arrival = _LazyHeap()
        self._seq = itertools.count()
        self._work_ms = 0.0

    def add(self, req: QueuedRequest) -> None:
        """Enqueue (a request id already queued is replaced); a request put back keeps its place."""
        self.remove(req.request_id)
        if req.seq < 0:
            req.seq = next(self._seq)
        self._alive[req.request_id] = req
        self._work_ms += req.predicted_exec_ms
        self._by_arrival.push(req.fcfs_key(), req)
        self._push(req)

    def pop(self, now_s: float) -> QueuedRequest | None:
        """Take the next request to serve, or None when empty."""
        req = self.peek(now_s)
        if req is not None:
            self._forget(req)
        return req

    def reprioritize(self, request_id: str, predicted_exec_ms: float, rank_ms: float | None = None) -> bool:
        """Re-key a queued request whose estimate changed (a late prediction); it keeps its arrival
        and insertion order. False if it is not queued."""
        req = self._alive.get(request_id)
        if req is None:
            return False
        self._forget(req)
        self.add(replace(req, predicted_exec_ms=predicted_exec_ms, rank_ms=rank_ms))
        return True

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Take a specific request out (cancel, timeout)."""
        req = self._alive.get(request_id)
        if req is not None:
            self._forget(req)
        return req

    def _forget(self, req: QueuedRequest) -> None:
        del self._alive[req.request_id]
        self._work_ms -= req.predicted_exec_ms
        if not self._alive:
            self._work_ms = 0.0  # no float drift when empty
            self._by_arrival.clear()
            self._clear()

    @abstractmethod
    def peek(self, now_s: float) -> QueuedRequest | None:
        """The request pop() would return now."""

    @abstractmethod
    def _push(self, req: QueuedRequest) -> None: ...

    @abstractmethod
    def _clear(self) -> None: ...

    def oldest_arrival_s(self) -> float | None:
        """Arrival time of the longest-waiting request."""
        top = self._by_arrival.top(self._alive)
        return None if top is None else top[1].arrival_s

    @property
    def predicted_work_ms(self) -> float:
        """Sum of predicted exec times of everything queued."""
        return max(self._work_ms, 0.0)

    def __len__(self) -> int:
        return len(self._alive)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._alive

    def __iter__(self) -> Iterator[QueuedRequest]:
        return iter(list(self._alive.values()))


class FCFSQueue(RequestQueue):
    """First come, first served."""

    policy = SchedulingPolicy.FCFS

    def peek(self, now_s: float) -> QueuedRequest | None:
        """Earliest arrival."""
        top = self._by_arrival.top(self._alive)
        return None if top is None else top[1]

    def _push(self, req: QueuedRequest) -> None:
        pass  # the arrival heap of the base class is the order

    def _clear(self) -> None:
        pass


class SSJFQueue(RequestQueue):
    """Shortest predicted job first; a request waiting past its aging bound is served first."""

    policy = SchedulingPolicy.SSJF

    def __init__(self, aging_factor: float = 8.0, max_wait_ms: float = 60_000.0) -> None:
        super().__init__()
        if aging_factor <= 0 or max_wait_ms <= 0:
            raise ValueError("aging_factor and max_wait_ms must be positive")
        self.aging_factor = aging_factor
        self.max_wait_ms = max_wait_ms
        self._by_size = _LazyHeap()
        self._by_deadline = _LazyHeap()

    def promote_at_s(self, req: QueuedRequest) -> float:
        """When a request is promoted: bound from its predicted (never true) exec time.

        Promoted requests are served earliest deadline first, so the finer estimate matters here too:
        with only class-level estimates, a loaded queue (where most requests pass their bound) would
        serve every request of a class in arrival order, i.e. FCFS.
        """
        bound_ms = min(self.aging_factor * req.estimate_ms(), self.max_wait_ms)
        return req.arrival_s + bound_ms / 1000.0

    def peek(self, now_s: float) -> QueuedRequest | None:
        """The most overdue promoted request, else the shortest predicted one."""
        due = self._by_deadline.top(self._alive)
        if due is not None and due[0][0] <= now_s:
            return due[1]
        top = self._by_size.top(self._alive)
        return None if top is None else top[1]

    def _push(self, req: QueuedRequest) -> None:
        self._by_size.push(req.sjf_key(), req)
        self._by_deadline.push((self.promote_at_s(req), req.seq), req)

    def _clear(self) -> None:
        self._by_size.clear()
        self._by_deadline.clear()


class OracleSJFQueue(SSJFQueue):
    """SSJF's mechanics on exec times the scheduler computed from true lengths (replay benchmarks only)."""

    policy = SchedulingPolicy.ORACLE


def make_request_queue(policy: str | SchedulingPolicy, **kwargs: float) -> RequestQueue:
    """Build the queue for a policy name; unknown names are rejected."""
    try:
        kind = SchedulingPolicy(policy)
    except ValueError:
        valid = ", ".join(p.value for p in SchedulingPolicy)
        raise ValueError(f"unknown scheduling policy {policy!r}; choose one of: {valid}") from None
    if kind is SchedulingPolicy.FCFS:
        return FCFSQueue()
    if kind is SchedulingPolicy.ORACLE:
        return OracleSJFQueue(**kwargs)
    return SSJFQueue(**kwargs)
