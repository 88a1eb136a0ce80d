"""One model group's scheduling state: admission, dispatch, leases, recovery (pure, no I/O)."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.schemas import (
    ErrorCode,
    ErrorInfo,
    Job,
    QueueTelemetry,
    WorkerHeartbeat,
    WorkerRef,
)
from services.scheduler.request_queue import QueuedRequest, RequestQueue

_COMPLETED_MEMORY = 50_000


class JobStatus(StrEnum):
    """Where an accepted job is."""

    QUEUED = "queued"
    RUNNING = "running"
    RECOVERING = "recovering"


@dataclass
class JobState:
    """An accepted, unfinished job."""

    job: Job
    status: JobStatus
    worker_id: str | None = None
    dispatched_at_s: float | None = None
    emitted_tokens: int = 0


@dataclass
class WorkerState:
    """What the scheduler knows of one worker."""

    worker_id: str
    node: str
    gpu: int
    models: frozenset[str]
    slots: int
    last_seen_s: float
    running: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Failure:
    """A job the scheduler gives up on: the client gets this error, JetStream gets the ack."""

    job: Job
    error: ErrorInfo


@dataclass(frozen=True)
class ExpireResult:
    """What changed when leases and deadlines were checked."""

    requeued: list[str]
    failed: list[Failure]
    lost_workers: list[str]


def remaining_work_ms(state: JobState, now_s: float) -> tuple[float, bool]:
    """Predicted work left of a running job (revised up once it outlives its prediction), and if it did."""
    job = state.job
    if job.generate is None or job.ms_per_token <= 0:
        # No token progress to go by (single-shot models): predicted time minus time spent.
        elapsed_ms = (now_s - (state.dispatched_at_s or now_s)) * 1000.0
        return max(job.predicted_exec_ms - elapsed_ms, 0.0), False
    done = state.emitted_tokens
    left = job.predicted_tokens - done
    outlived = left <= 0
    if outlived:
        # Past its prediction: assume as much again is left (the usual rule for heavy-tailed lengths).
        left = max(done, 1)
    left = min(left, job.generate.max_tokens - done)
    return max(left, 0.0) * job.ms_per_token, outlived


def solo_exec_ms(job: Job, tokens: float) -> float:
    """The scheduler's estimate of a job's exec time alone at max clock for an answer of `tokens` tokens."""
    if job.generate is None or job.ms_per_token <= 0:
        return job.predicted_exec_ms
    const_ms = max(job.predicted_exec_ms - job.ms_per_token * job.predicted_tokens, 0.0)
    return const_ms + job.ms_per_token * max(tokens, 0.0)


def slack_slowdown(state: JobState, now_s: float, slo_scale: float) -> float | None:
    """Time left to a job's SLO deadline over its predicted work left (the slowdown it can absorb)."""
    job = state.job
    if state.status is not JobStatus.RUNNING:
        exec_ms = max(job.predicted_exec_ms, 1e-6)
        due_s = job.accepted_at_s + slo_scale * exec_ms / 1000.0
        return (due_s - now_s) * 1000.0 / exec_ms
    left_ms, outlived = remaining_work_ms(state, now_s)
    if left_ms <= 0.0:
        return None  # finishing: nothing left to slow down
    total_ms = job.predicted_exec_ms
    if outlived and job.ms_per_token > 0:
        # Past its prediction: its SLO grows with the length the scheduler now expects.
        total_ms = solo_exec_ms(job, state.emitted_tokens + left_ms / job.ms_per_token)
    due_s = job.accepted_at_s + slo_scale * total_ms / 1000.0
    return (due_s - now_s) * 1000.0 / left_ms


class GroupCore:
    """Scheduling state of one model group; the scheduler service is a thin async shell around it."""

    def __init__(
        self,
        group: str,
        queue: RequestQueue,
        *,
        max_queue: int,
        worker_lease_s: float,
        max_attempts: int = 3,
        recovery_until_s: float = 0.0,
        slo_scale: float | None = None,
        rate_window_s: float = 20.0,
        slo_window_s: float = 60.0,
    ) -> None:
        self.group = group
        self.queue = queue
        self.max_queue = max_queue
        self.worker_lease_s = worker_lease_s
        self.max_attempts = max_attempts
        self.recovery_until_s = recovery_until_s
        self.jobs: dict[str, JobState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.completed: OrderedDict[str, None] = OrderedDict()
        self.arrivals = 0
        self.completions = 0
        self.slo_scale = slo_scale
        self.rate_window_s = rate_window_s
        self.slo_window_s = slo_window_s
        self._recent_arrivals: deque[tuple[float, Job]] = deque()  # (accepted at, job) in the window
        # (completed at, met its SLO, missed only because of the clock) of recent completions.
        self._outcomes: deque[tuple[float, bool, bool]] = deque()
        self._telemetry_since_s: float | None = None

    # -- admission -------------------------------------------------------------------------------
    def in_recovery(self, now_s: float) -> bool:
        """True shortly after a restart, while workers re-announce what they run."""
        return now_s < self.recovery_until_s

    def live_workers(self, now_s: float, model: str | None = None) -> list[WorkerState]:
        """Workers whose lease holds (optionally only those serving a model)."""
        return [
            w
            for w in self.workers.values()
            if now_s - w.last_seen_s <= self.worker_lease_s and (model is None or model in w.models)
        ]

    def check_admission(
        self, request_id: str, model: str, now_s: float, admitting: int = 0
    ) -> ErrorInfo | None:
        """Why a new request cannot be accepted now, or None (admitting: accepted but not yet queued)."""
        if request_id in self.jobs or request_id in self.completed:
            return ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"request_id {request_id!r} was already submitted",
                param="request_id",
            )
        recovering = sum(1 for st in self.jobs.values() if st.status is JobStatus.RECOVERING)
        if len(self.queue) + recovering + admitting >= self.max_queue:
            return ErrorInfo(
                code=ErrorCode.QUEUE_FULL,
                message=f"group {self.group!r} has {len(self.queue)} queued and {admitting} arriving "
                f"requests (bound {self.max_queue}); retry later",
            )
        if not self.in_recovery(now_s) and not self.live_workers(now_s, model):
            return ErrorInfo(code=ErrorCode.NO_WORKER, message=f"no live worker serves model {model!r}")
        return None

    def enqueue(self, job: Job, now_s: float) -> None:
        """Queue an accepted job."""
        self.arrivals += 1
        self._recent_arrivals.append((now_s, job))
        self.jobs[job.request_id] = JobState(job=job, status=JobStatus.QUEUED)
        self.queue.add(self._queued(job))

    def reestimate(self, request_id: str) -> bool:
        """A queued job's prediction changed: re-key it in the queue (False if it is not queued)."""
        state = self.jobs.get(request_id)
        if state is None or state.status is not JobStatus.QUEUED:
            return False
        job = state.job
        return self.queue.reprioritize(request_id, job.predicted_exec_ms, job.rank_exec_ms)

    @staticmethod
    def _queued(job: Job) -> QueuedRequest:
        return QueuedRequest(
            request_id=job.request_id,
            arrival_s=job.accepted_at_s,
            predicted_exec_ms=job.predicted_exec_ms,
            payload=job,
            rank_ms=job.rank_exec_ms,
        )

    # -- dispatch ------------------------------------------------------------------------------
    def take(self, worker_id: str, free_slots: int, now_s: float) -> list[Job]:
        """Hand up to free_slots queued jobs this worker can serve to it."""
        worker = self.workers.get(worker_id)
        if worker is None or free_slots <= 0:
            return []
        taken: list[Job] = []
        skipped: list[QueuedRequest] = []
        while len(taken) < free_slots:
            req = self.queue.pop(now_s)
            if req is None:
                break
            job: Job = req.payload
            if job.model not in worker.models:
                skipped.append(req)  # another worker of the group serves it
                continue
            state = self.jobs[job.request_id]
            state.status = JobStatus.RUNNING
            state.worker_id = worker_id
            state.dispatched_at_s = now_s
            state.emitted_tokens = 0
            job.dispatched_at_s = now_s
            worker.running.add(job.request_id)
            taken.append(job)
        for req in skipped:
            self.queue.add(req)
        return taken

    def has_work_for(self, worker_id: str) -> bool:
        """Whether a queued job could go to this worker."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        return any(r.payload.model in worker.models for r in self.queue)

    # -- worker reports --------------------------------------------------------------------------
    def on_heartbeat(self, hb: WorkerHeartbeat, now_s: float) -> list[str]:
        """Refresh a worker's lease and reconcile its in-flight set; returns ids it already finished."""
        w = self.workers.get(hb.worker_id)
        if w is None:
            w = WorkerState(
                worker_id=hb.worker_id,
                node=hb.node,
                gpu=hb.gpu,
                models=frozenset(hb.models),
                slots=hb.slots,
                last_seen_s=now_s,
            )
            self.workers[hb.worker_id] = w
        w.last_seen_s = now_s
        w.slots = hb.slots
        w.models = frozenset(hb.models)
        listed = {i.request_id for i in hb.inflight}
        for info in hb.inflight:
            state = self.jobs.get(info.request_id)
            if state is None:
                continue
            if state.status is not JobStatus.RUNNING or state.worker_id != hb.worker_id:
                # Recovered after a scheduler restart, or re-dispatched too eagerly: the worker has it.
                self._unqueue(state)
                state.status = JobStatus.RUNNING
                state.worker_id = hb.worker_id
                state.dispatched_at_s = state.dispatched_at_s or now_s
                w.running.add(info.request_id)
            state.emitted_tokens = info.emitted_tokens
        # A dispatch the worker never received (lost reply) goes back to the queue.
        for rid in list(w.running):
            state = self.jobs.get(rid)
            if state is None or state.worker_id != hb.worker_id:
                w.running.discard(rid)
                continue
            dispatched = state.dispatched_at_s or now_s
            if (
                rid not in listed
                and rid not in hb.unconfirmed_done
                and now_s - dispatched > self.worker_lease_s
            ):
                w.running.discard(rid)
                self._requeue(state)
        return [rid for rid in hb.unconfirmed_done if rid in self.jobs]

    def on_done(self, request_id: str) -> Job | None:
        """A worker finished a job; returns it if it was still open (idempotent)."""
        state = self.jobs.pop(request_id, None)
        self._remember_completed(request_id)
        if state is None:
            return None
        self._unqueue(state)
        if state.worker_id is not None and state.worker_id in self.workers:
            self.workers[state.worker_id].running.discard(request_id)
        self.completions += 1
        return state.job

    def observe_completion(
        self, job: Job, now_s: float, completion_tokens: int, stretch_ms: float = 0.0
    ) -> bool | None:
        """Record whether a finished job met its SLO (JCT vs slo_scale x its solo time); None: no SLO.

        stretch_ms is what a lowered clock added to its steps: a miss that would have met the SLO
        without it counts against the clock.
        """
        if self.slo_scale is None:
            return None
        jct_ms = (now_s - job.accepted_at_s) * 1000.0
        budget_ms = self.slo_scale * solo_exec_ms(job, completion_tokens)
        met = jct_ms <= budget_ms
        clock_miss = not met and jct_ms - max(stretch_ms, 0.0) <= budget_ms
        self._outcomes.append((now_s, met, clock_miss))
        return met

    def is_completed(self, request_id: str) -> bool:
        """Finished recently (its JetStream message may still need an ack)."""
        return request_id in self.completed

    def _remember_completed(self, request_id: str) -> None:
        self.completed[request_id] = None
        self.completed.move_to_end(request_id)
        while len(self.completed) > _COMPLETED_MEMORY:
            self.completed.popitem(last=False)

    def _unqueue(self, state: JobState) -> None:
        if state.status is JobStatus.QUEUED:
            self.queue.remove(state.job.request_id)

    def _requeue(self, state: JobState) -> None:
        state.status = JobStatus.QUEUED
        state.worker_id = None
        state.dispatched_at_s = None
        state.job.attempt += 1
        self.queue.add(self._queued(state.job))

    # -- cancellation, recovery, expiry ------------------------------------------------------------
    def cancel(self, request_id: str) -> tuple[Job | None, str | None]:
        """Drop a queued job (returned) or name the worker running it (to forward the cancel)."""
        state = self.jobs.get(request_id)
        if state is None:
            return None, None
        if state.status is JobStatus.RUNNING:
            return None, state.worker_id
        self.on_done(request_id)
        return state.job, None

    def recover(self, job: Job) -> None:
        """A job redelivered by JetStream that this process did not admit (it restarted)."""
        if job.request_id in self.jobs:
            return
        self.arrivals += 1
        self.jobs[job.request_id] = JobState(job=job, status=JobStatus.RECOVERING)

    def release_recovered(self) -> int:
        """After the grace period: recovered jobs no worker claimed go back to the queue."""
        n = 0
        for state in self.jobs.values():
            if state.status is JobStatus.RECOVERING:
                state.status = JobStatus.QUEUED
                self.queue.add(self._queued(state.job))
                n += 1
        return n

    def expire(self, now_s: float) -> ExpireResult:
        """Handle lost workers (re-dispatch or fail their jobs), jobs past their deadline or attempts."""
        requeued: list[str] = []
        failed: list[Failure] = []

        def fail(job: Job, code: ErrorCode, message: str) -> None:
            self.on_done(job.request_id)
            failed.append(Failure(job=job, error=ErrorInfo(code=code, message=message)))

        lost = [w for w in self.workers.values() if now_s - w.last_seen_s > self.worker_lease_s]
        for w in lost:
            del self.workers[w.worker_id]
            for rid in sorted(w.running):
                state = self.jobs.get(rid)
                if state is None or state.worker_id != w.worker_id:
                    continue
                job = state.job
                streamed = job.generate is not None and job.generate.stream and state.emitted_tokens > 0
                if job.deadline_s is not None and now_s > job.deadline_s:
                    fail(job, ErrorCode.TIMEOUT, "request timed out (its worker was lost)")
                elif streamed:
                    fail(
                        job,
                        ErrorCode.WORKER_LOST,
                        f"worker {w.worker_id} was lost after streaming {state.emitted_tokens} tokens; retry",
                    )
                elif job.attempt >= self.max_attempts:
                    fail(
                        job,
                        ErrorCode.WORKER_LOST,
                        f"worker {w.worker_id} was lost; gave up after {job.attempt} attempts",
                    )
                else:
                    self._requeue(state)
                    requeued.append(rid)
        for state in list(self.jobs.values()):
            if state.status is JobStatus.RUNNING:
                continue
            job = state.job
            if job.deadline_s is not None and now_s > job.deadline_s:
                fail(job, ErrorCode.TIMEOUT, "request timed out while queued")
            elif job.attempt > self.max_attempts:
                # Re-queued by lost dispatches (on_heartbeat) more often than allowed.
                fail(job, ErrorCode.WORKER_LOST, f"dispatched {job.attempt - 1} times without result")
        return ExpireResult(requeued=requeued, failed=failed, lost_workers=[w.worker_id for w in lost])

    # -- telemetry -------------------------------------------------------------------------------
    def telemetry(self, now_s: float, interval_s: float, arrivals: int, completions: int) -> QueueTelemetry:
        """A snapshot for powerd and dashboards."""
        oldest = self.queue.oldest_arrival_s()
        running = [s for s in self.jobs.values() if s.status is JobStatus.RUNNING]
        running_work_ms = 0.0
        mispredicted = 0
        for s in running:
            work_ms, outlived = remaining_work_ms(s, now_s)
            running_work_ms += work_ms
            mispredicted += outlived
        recovering = sum(1 for s in self.jobs.values() if s.status is JobStatus.RECOVERING)
        slo = self._slo_telemetry(now_s, interval_s)
        return QueueTelemetry(
            group=self.group,
            ts_s=now_s,
            depth=len(self.queue) + recovering,
            running=len(running),
            predicted_work_ms=self.queue.predicted_work_ms,
            running_work_ms=running_work_ms,
            mispredicted=mispredicted,
            oldest_wait_ms=0.0 if oldest is None else max(now_s - oldest, 0.0) * 1000.0,
            arrivals_per_s=arrivals / interval_s if interval_s > 0 else 0.0,
            completions_per_s=completions / interval_s if interval_s > 0 else 0.0,
            workers=[
                WorkerRef(worker_id=w.worker_id, node=w.node, gpu=w.gpu, slots=w.slots)
                for w in self.live_workers(now_s)
            ],
            policy=self.queue.policy.value,
            **slo,
        )

    def _slo_telemetry(self, now_s: float, interval_s: float) -> dict[str, float | int | None]:
        """Smoothed arrival rate and exec time, the tightest SLO slack, and recent SLO attainment."""
        if self._telemetry_since_s is None:
            self._telemetry_since_s = now_s - max(interval_s, 0.0)
        horizon = now_s - self.rate_window_s
        while self._recent_arrivals and self._recent_arrivals[0][0] < horizon:
            self._recent_arrivals.popleft()
        # A young scheduler has seen less than a window: divide by what it has seen.
        window_s = min(self.rate_window_s, max(now_s - self._telemetry_since_s, interval_s, 1e-3))
        recent = [j for t, j in self._recent_arrivals if t <= now_s]
        mean_exec = sum(j.predicted_exec_ms for j in recent) / len(recent) if recent else None
        out: dict[str, float | int | None] = {
            "window_s": window_s,
            "mean_arrivals_per_s": len(recent) / window_s,
            "mean_exec_ms": mean_exec,
            "slo_scale": self.slo_scale,
        }
        if self.slo_scale is None:
            return out
        slacks = [
            x
            for st in self.jobs.values()
            if st.status is not JobStatus.RECOVERING
            and (x := slack_slowdown(st, now_s, self.slo_scale)) is not None
        ]
        out["slack_slowdown"] = min(slacks) if slacks else None
        while self._outcomes and self._outcomes[0][0] < now_s - self.slo_window_s:
            self._outcomes.popleft()
        n = len(self._outcomes)
        met = sum(1 for _, ok, _ in self._outcomes if ok)
        clock_misses = sum(1 for _, _, by_clock in self._outcomes if by_clock)
        out["slo_attainment"] = met / n if n else None
        out["clock_slo_attainment"] = 1.0 - clock_misses / n if n else None
        out["slo_completions"] = len(self._outcomes)
        out["slo_window_s"] = self.slo_window_s
        return out
