"""GroupCore: admission, dispatch, heartbeats, leases, expiry, cancellation, recovery, telemetry."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.common.schemas import (
    ErrorCode,
    GenerateRequest,
    InflightInfo,
    Job,
    JobKind,
    WorkerHeartbeat,
    WorkerRef,
)
from services.scheduler.core import GroupCore, JobStatus
from services.scheduler.request_queue import make_request_queue

LEASE_S = 3.0


def make_core(
    policy: str = "fcfs",
    *,
    max_queue: int = 8,
    max_attempts: int = 3,
    recovery_until_s: float = 0.0,
) -> GroupCore:
    """A group core with a 3 s worker lease."""
    return GroupCore(
        "chat",
        make_request_queue(policy),
        max_queue=max_queue,
        worker_lease_s=LEASE_S,
        max_attempts=max_attempts,
        recovery_until_s=recovery_until_s,
    )


def make_job(
    rid: str,
    model: str = "m1",
    *,
    accepted_at_s: float = 0.0,
    predicted_exec_ms: float = 100.0,
    stream: bool = False,
    deadline_s: float | None = None,
    attempt: int = 1,
) -> Job:
    """An accepted generate job."""
    return Job(
        request_id=rid,
        kind=JobKind.GENERATE,
        model=model,
        group="chat",
        reply_to=f"_INBOX.{rid}",
        generate=GenerateRequest(request_id=rid, model=model, prompt="hello", stream=stream),
        predicted_exec_ms=predicted_exec_ms,
        accepted_at_s=accepted_at_s,
        deadline_s=deadline_s,
        attempt=attempt,
    )


def make_hb(
    worker_id: str = "w1",
    models: Sequence[str] = ("m1",),
    *,
    inflight: Sequence[tuple[str, int]] = (),
    unconfirmed_done: Sequence[str] = (),
    slots: int = 4,
    ts_s: float = 0.0,
) -> WorkerHeartbeat:
    """A heartbeat; inflight as (request_id, emitted_tokens) pairs."""
    return WorkerHeartbeat(
        worker_id=worker_id,
        group="chat",
        node="node-a",
        gpu=0,
        models=list(models),
        kind="chat",
        slots=slots,
        free_slots=max(slots - len(inflight), 0),
        inflight=[InflightInfo(request_id=r, emitted_tokens=n) for r, n in inflight],
        unconfirmed_done=list(unconfirmed_done),
        ts_s=ts_s,
    )


def queued_ids(core: GroupCore) -> list[str]:
    """Ids still queued, in arrival order (without popping them)."""
    return [r.request_id for r in sorted(core.queue, key=lambda r: r.fcfs_key())]


def ids(jobs: Sequence[Job]) -> list[str]:
    """Request ids of jobs, in order."""
    return [j.request_id for j in jobs]


# -- admission -------------------------------------------------------------------------------------


def test_admission_accepts_when_a_live_worker_serves_the_model() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    assert core.check_admission("a", "m1", 1.0) is None


def test_admission_rejects_duplicate_ids_open_or_completed() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    err = core.check_admission("a", "m1", 0.0)
    assert err is not None
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == "request_id" and err.http_status == 400
    core.on_done("a")
    err = core.check_admission("a", "m1", 0.0)
    assert err is not None and err.code is ErrorCode.INVALID_REQUEST and err.param == "request_id"
    assert core.check_admission("b", "m1", 0.0) is None


def test_admission_queue_bound_counts_requests_being_admitted() -> None:
    core = make_core(max_queue=2)
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    assert core.check_admission("b", "m1", 0.0) is None
    full = core.check_admission("b", "m1", 0.0, admitting=1)
    assert full is not None and full.code is ErrorCode.QUEUE_FULL and full.http_status == 429
    core.enqueue(make_job("b"), 0.0)
    full = core.check_admission("c", "m1", 0.0)
    assert full is not None and full.code is ErrorCode.QUEUE_FULL
    assert "bound 2" in full.message


def test_admission_needs_a_live_worker_for_that_model() -> None:
    core = make_core()
    err = core.check_admission("a", "m1", 0.0)
    assert err is not None and err.code is ErrorCode.NO_WORKER and err.http_status == 503
    core.on_heartbeat(make_hb(models=["m2"]), 0.0)
    err = core.check_admission("a", "m1", 0.0)
    assert err is not None and err.code is ErrorCode.NO_WORKER
    assert core.check_admission("a", "m2", 0.0) is None


def test_admission_ignores_a_worker_whose_lease_expired() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 10.0)
    assert core.check_admission("a", "m1", 10.0 + LEASE_S) is None  # lease holds up to and incl. 3 s
    err = core.check_admission("a", "m1", 10.0 + LEASE_S + 0.01)
    assert err is not None and err.code is ErrorCode.NO_WORKER
    assert core.live_workers(10.0 + LEASE_S + 0.01) == []


def test_admission_accepts_without_workers_during_recovery() -> None:
    core = make_core(recovery_until_s=5.0)
    assert core.in_recovery(4.99)
    assert core.check_admission("a", "m1", 4.99) is None
    assert not core.in_recovery(5.0)
    err = core.check_admission("a", "m1", 5.0)
    assert err is not None and err.code is ErrorCode.NO_WORKER


def test_admission_checks_duplicates_and_bound_even_during_recovery() -> None:
    core = make_core(max_queue=1, recovery_until_s=5.0)
    core.enqueue(make_job("a"), 0.0)
    dup = core.check_admission("a", "m1", 1.0)
    assert dup is not None and dup.code is ErrorCode.INVALID_REQUEST
    full = core.check_admission("b", "m1", 1.0)
    assert full is not None and full.code is ErrorCode.QUEUE_FULL


# -- dispatch ----------------------------------------------------------------------------------------


def test_take_only_jobs_the_worker_serves_and_keeps_the_rest_in_order() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(models=["m1"]), 0.0)
    for i, (rid, model) in enumerate([("a", "m2"), ("b", "m1"), ("c", "m2"), ("d", "m1"), ("e", "m2")]):
        core.enqueue(make_job(rid, model, accepted_at_s=float(i)), float(i))
    taken = core.take("w1", 5, 10.0)
    assert ids(taken) == ["b", "d"]
    assert queued_ids(core) == ["a", "c", "e"]
    popped = [core.queue.pop(10.0) for _ in range(3)]
    assert [r.request_id for r in popped if r is not None] == ["a", "c", "e"]


def test_take_marks_jobs_running_on_the_worker() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    (job,) = core.take("w1", 1, 2.5)
    state = core.jobs["a"]
    assert state.status is JobStatus.RUNNING
    assert state.worker_id == "w1"
    assert state.dispatched_at_s == 2.5 and job.dispatched_at_s == 2.5
    assert core.workers["w1"].running == {"a"}
    assert "a" not in core.queue
    assert not core.has_work_for("w1")


def test_take_at_most_free_slots() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    for i in range(4):
        core.enqueue(make_job(f"j{i}", accepted_at_s=float(i)), float(i))
    assert core.take("w1", 0, 5.0) == []
    assert ids(core.take("w1", 3, 5.0)) == ["j0", "j1", "j2"]
    assert len(core.queue) == 1
    assert ids(core.take("w1", 3, 5.0)) == ["j3"]
    assert core.take("w1", 3, 5.0) == []


def test_take_follows_the_ssjf_order() -> None:
    core = make_core("ssjf")
    core.on_heartbeat(make_hb(), 0.0)
    for i, ms in enumerate((300.0, 50.0, 120.0)):
        core.enqueue(make_job(f"j{i}", accepted_at_s=0.0, predicted_exec_ms=ms), 0.0)
    assert ids(core.take("w1", 3, 0.01)) == ["j1", "j2", "j0"]


def test_take_by_unknown_worker_gets_nothing() -> None:
    core = make_core()
    core.enqueue(make_job("a"), 0.0)
    assert core.take("ghost", 4, 0.0) == []
    assert "a" in core.queue and core.jobs["a"].status is JobStatus.QUEUED
    assert not core.has_work_for("ghost")


def test_has_work_for_depends_on_the_models() -> None:
    core = make_core()
    core.on_heartbeat(make_hb("w1", ["m1"]), 0.0)
    core.on_heartbeat(make_hb("w2", ["m2"]), 0.0)
    core.enqueue(make_job("a", "m2"), 0.0)
    assert not core.has_work_for("w1")
    assert core.has_work_for("w2")


# -- heartbeats ------------------------------------------------------------------------------------


def test_heartbeat_registers_and_refreshes_workers() -> None:
    core = make_core()
    assert core.on_heartbeat(make_hb(slots=4), 1.0) == []
    w = core.workers["w1"]
    assert (w.node, w.gpu, w.slots, w.models, w.last_seen_s) == ("node-a", 0, 4, frozenset({"m1"}), 1.0)
    core.on_heartbeat(make_hb(models=["m1", "m3"], slots=2), 2.0)
    assert core.workers["w1"] is w
    assert (w.slots, w.models, w.last_seen_s) == (2, frozenset({"m1", "m3"}), 2.0)


def test_heartbeat_adopts_a_queued_job_the_worker_already_runs() -> None:
    core = make_core()
    core.enqueue(make_job("a"), 0.0)
    core.on_heartbeat(make_hb(inflight=[("a", 7)]), 1.0)
    state = core.jobs["a"]
    assert state.status is JobStatus.RUNNING and state.worker_id == "w1"
    assert state.dispatched_at_s == 1.0 and state.emitted_tokens == 7
    assert "a" not in core.queue and len(core.queue) == 0
    assert core.workers["w1"].running == {"a"}


def test_heartbeat_adopts_a_recovering_job() -> None:
    core = make_core(recovery_until_s=5.0)
    core.recover(make_job("a"))
    state = core.jobs["a"]
    assert [s.status for s in core.jobs.values()] == [JobStatus.RECOVERING]
    core.on_heartbeat(make_hb(inflight=[("a", 0)]), 1.0)
    assert state.status is JobStatus.RUNNING and state.worker_id == "w1"
    assert core.release_recovered() == 0
    assert len(core.queue) == 0


def test_heartbeat_moves_a_job_that_another_worker_reports() -> None:
    core = make_core()
    core.on_heartbeat(make_hb("w1"), 0.0)
    core.on_heartbeat(make_hb("w2"), 0.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w1", 1, 0.5)
    core.on_heartbeat(make_hb("w2", inflight=[("a", 3)]), 1.0)
    state = core.jobs["a"]
    assert state.worker_id == "w2" and state.status is JobStatus.RUNNING and state.emitted_tokens == 3
    assert state.dispatched_at_s == 0.5  # the original dispatch time is kept
    core.on_heartbeat(make_hb("w1"), 1.5)
    assert core.workers["w1"].running == set()  # w1 forgets it without re-queueing it
    assert core.jobs["a"].status is JobStatus.RUNNING and core.jobs["a"].job.attempt == 1


def test_heartbeat_updates_emitted_tokens_of_running_jobs() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w1", 1, 0.0)
    core.on_heartbeat(make_hb(inflight=[("a", 5)]), 0.5)
    core.on_heartbeat(make_hb(inflight=[("a", 9)]), 1.0)
    assert core.jobs["a"].emitted_tokens == 9


def test_dispatch_missing_from_heartbeats_past_the_lease_is_requeued() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w1", 1, 1.0)
    core.on_heartbeat(make_hb(), 1.0 + LEASE_S)  # missing, but not longer than the lease
    assert core.jobs["a"].status is JobStatus.RUNNING
    core.on_heartbeat(make_hb(), 1.0 + LEASE_S + 0.1)
    state = core.jobs["a"]
    assert state.status is JobStatus.QUEUED and state.worker_id is None and state.dispatched_at_s is None
    assert state.job.attempt == 2
    assert "a" in core.queue
    assert core.workers["w1"].running == set()


def test_dispatch_listed_as_unconfirmed_done_is_not_requeued() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w1", 1, 0.0)
    done = core.on_heartbeat(make_hb(unconfirmed_done=["a", "unknown"]), 10.0)
    assert done == ["a"]
    assert core.jobs["a"].status is JobStatus.RUNNING and core.jobs["a"].job.attempt == 1
    core.on_done("a")
    assert core.on_heartbeat(make_hb(unconfirmed_done=["a"]), 10.5) == []


def test_heartbeat_ignores_unknown_inflight_ids() -> None:
    core = make_core()
    assert core.on_heartbeat(make_hb(inflight=[("stranger", 4)]), 0.0) == []
    assert core.jobs == {} and core.workers["w1"].running == set()


# -- completion and cancellation -------------------------------------------------------------------


def test_on_done_is_idempotent_and_remembers_the_id() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w1", 1, 0.0)
    job = core.on_done("a")
    assert job is not None and job.request_id == "a"
    assert core.on_done("a") is None
    assert core.completions == 1
    assert core.is_completed("a") and not core.is_completed("b")
    assert "a" not in core.jobs and core.workers["w1"].running == set()
    assert core.on_done("never-seen") is None and core.is_completed("never-seen")


def test_on_done_of_a_queued_job_removes_it_from_the_queue() -> None:
    core = make_core()
    core.enqueue(make_job("a"), 0.0)
    assert core.on_done("a") is not None
    assert len(core.queue) == 0


def test_cancel_queued_running_and_unknown() -> None:
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("run", accepted_at_s=0.0), 0.0)
    core.enqueue(make_job("wait", accepted_at_s=1.0), 1.0)
    core.take("w1", 1, 2.0)
    job, worker = core.cancel("wait")
    assert job is not None and job.request_id == "wait" and worker is None
    assert "wait" not in core.jobs and "wait" not in core.queue and core.is_completed("wait")
    job, worker = core.cancel("run")
    assert job is None and worker == "w1"
    assert core.jobs["run"].status is JobStatus.RUNNING  # the worker reports its end
    assert core.cancel("nope") == (None, None)


# -- expiry ----------------------------------------------------------------------------------------


def test_expire_handles_the_jobs_of_a_lost_worker() -> None:
    core = make_core(max_attempts=3)
    core.on_heartbeat(make_hb(slots=8), 0.0)
    core.enqueue(make_job("plain", accepted_at_s=0.0), 0.0)
    core.enqueue(make_job("streamed", accepted_at_s=0.1, stream=True), 0.0)
    core.enqueue(make_job("stream-no-tokens", accepted_at_s=0.2, stream=True), 0.0)
    core.enqueue(make_job("last-try", accepted_at_s=0.3, attempt=3), 0.0)
    assert len(core.take("w1", 8, 0.5)) == 4
    core.on_heartbeat(
        make_hb(inflight=[("plain", 4), ("streamed", 4), ("stream-no-tokens", 0), ("last-try", 0)]), 1.0
    )
    assert core.expire(1.0 + LEASE_S).lost_workers == []  # lease still holds
    res = core.expire(1.0 + LEASE_S + 0.5)
    assert res.lost_workers == ["w1"] and core.workers == {}
    assert sorted(res.requeued) == ["plain", "stream-no-tokens"]
    failed = {f.job.request_id: f.error for f in res.failed}
    assert set(failed) == {"streamed", "last-try"}
    assert all(e.code is ErrorCode.WORKER_LOST for e in failed.values())
    assert "streaming 4 tokens" in failed["streamed"].message
    assert "after 3 attempts" in failed["last-try"].message
    for rid in ("plain", "stream-no-tokens"):
        assert core.jobs[rid].status is JobStatus.QUEUED and core.jobs[rid].job.attempt == 2
        assert rid in core.queue
    assert "streamed" not in core.jobs and core.is_completed("streamed")
    assert "last-try" not in core.jobs and core.is_completed("last-try")


def test_expire_times_out_queued_jobs_past_their_deadline() -> None:
    core = make_core()
    core.enqueue(make_job("soon", deadline_s=1.0), 0.0)
    core.enqueue(make_job("later", accepted_at_s=0.1, deadline_s=10.0), 0.0)
    core.enqueue(make_job("never", accepted_at_s=0.2), 0.0)
    assert core.expire(1.0).failed == []  # deadline itself is still fine
    res = core.expire(1.5)
    assert [f.job.request_id for f in res.failed] == ["soon"]
    assert res.failed[0].error.code is ErrorCode.TIMEOUT and res.failed[0].error.http_status == 504
    assert res.requeued == [] and res.lost_workers == []
    assert "soon" not in core.jobs and "soon" not in core.queue and core.is_completed("soon")
    assert sorted(r.request_id for r in core.queue) == ["later", "never"]


def test_expire_keeps_live_workers_and_their_jobs() -> None:
    core = make_core()
    core.on_heartbeat(make_hb("w1"), 0.0)
    core.on_heartbeat(make_hb("w2"), 2.0)
    core.enqueue(make_job("a"), 0.0)
    core.take("w2", 1, 2.0)
    res = core.expire(4.0)
    assert res.lost_workers == ["w1"] and res.requeued == [] and res.failed == []
    assert list(core.workers) == ["w2"] and core.jobs["a"].status is JobStatus.RUNNING


# -- recovery --------------------------------------------------------------------------------------


def test_recovered_jobs_wait_outside_the_queue_until_released() -> None:
    core = make_core(recovery_until_s=2.5)
    core.recover(make_job("a", accepted_at_s=0.0, predicted_exec_ms=40.0))
    core.recover(make_job("b", accepted_at_s=0.1, predicted_exec_ms=60.0))
    core.recover(make_job("a"))  # redelivered twice: counted once
    assert core.arrivals == 2
    assert len(core.queue) == 0
    tel = core.telemetry(1.0, 1.0, 0, 0)
    assert tel.depth == 2 and tel.running == 0 and tel.predicted_work_ms == 0.0
    assert core.release_recovered() == 2
    assert core.release_recovered() == 0
    assert {r.request_id for r in core.queue} == {"a", "b"}
    assert all(s.status is JobStatus.QUEUED for s in core.jobs.values())
    tel = core.telemetry(3.0, 1.0, 0, 0)
    assert tel.depth == 2 and tel.predicted_work_ms == pytest.approx(100.0)
    core.on_heartbeat(make_hb(), 3.0)
    assert ids(core.take("w1", 4, 3.0)) == ["a", "b"]


def test_recover_skips_a_job_already_known() -> None:
    core = make_core()
    core.enqueue(make_job("a"), 0.0)
    core.recover(make_job("a"))
    assert core.jobs["a"].status is JobStatus.QUEUED and core.arrivals == 1
    assert core.release_recovered() == 0 and len(core.queue) == 1


def test_cancel_of_a_recovering_job_drops_it() -> None:
    core = make_core()
    core.recover(make_job("a"))
    job, worker = core.cancel("a")
    assert job is not None and worker is None
    assert core.release_recovered() == 0 and core.telemetry(0.0, 1.0, 0, 0).depth == 0


# -- telemetry -------------------------------------------------------------------------------------


def test_telemetry_snapshot() -> None:
    core = make_core()
    core.on_heartbeat(make_hb("w1", slots=4), 2.0)
    core.on_heartbeat(make_hb("old", slots=1), -5.0)  # lease long expired: not listed
    core.enqueue(make_job("r", accepted_at_s=0.0, predicted_exec_ms=500.0), 0.0)
    core.enqueue(make_job("q1", accepted_at_s=0.5, predicted_exec_ms=100.0), 0.5)
    core.enqueue(make_job("q2", accepted_at_s=1.0, predicted_exec_ms=300.0), 1.0)
    assert ids(core.take("w1", 1, 2.0)) == ["r"]
    tel = core.telemetry(2.2, 2.0, arrivals=6, completions=3)
    assert tel.group == "chat" and tel.ts_s == 2.2 and tel.policy == "fcfs"
    assert tel.depth == 2 and tel.running == 1
    assert tel.predicted_work_ms == pytest.approx(400.0)
    assert tel.running_work_ms == pytest.approx(300.0)  # 500 ms predicted, 200 ms elapsed
    assert tel.oldest_wait_ms == pytest.approx(1700.0)
    assert tel.arrivals_per_s == pytest.approx(3.0) and tel.completions_per_s == pytest.approx(1.5)
    assert tel.workers == [WorkerRef(worker_id="w1", node="node-a", gpu=0, slots=4)]
    later = core.telemetry(2.4, 2.0, 0, 0)
    assert later.running_work_ms == pytest.approx(100.0)  # decreases with elapsed time
    assert core.telemetry(10.0, 2.0, 0, 0).running_work_ms == 0.0  # floored at zero


def test_telemetry_of_an_idle_group() -> None:
    core = make_core("ssjf")
    tel = core.telemetry(5.0, 0.0, arrivals=3, completions=3)
    assert (tel.depth, tel.running, tel.predicted_work_ms, tel.running_work_ms) == (0, 0, 0.0, 0.0)
    assert tel.oldest_wait_ms == 0.0
    assert tel.arrivals_per_s == 0.0 and tel.completions_per_s == 0.0  # no division by a zero interval
    assert tel.workers == [] and tel.policy == "ssjf"


def test_telemetry_oldest_wait_is_never_negative() -> None:
    core = make_core()
    core.enqueue(make_job("future", accepted_at_s=10.0), 10.0)  # clock skew between processes
    assert core.telemetry(9.0, 1.0, 0, 0).oldest_wait_ms == 0.0


# -- documented defects ----------------------------------------------------------------------------


def test_take_keeps_skipped_jobs_ahead_of_later_jobs_with_the_same_arrival() -> None:
    """Skipped jobs get a new insertion seq, so ties on accepted_at_s (coarse clocks) reorder them."""
    core = make_core()
    core.on_heartbeat(make_hb(models=["y"]), 0.0)
    for rid, model in [("A", "x"), ("C", "x"), ("B", "y"), ("D", "x")]:
        core.enqueue(make_job(rid, model, accepted_at_s=0.0), 0.0)
    assert ids(core.take("w1", 1, 0.0)) == ["B"]
    popped = [core.queue.pop(0.0) for _ in range(3)]
    assert [r.request_id for r in popped if r is not None] == ["A", "C", "D"]


def test_expire_does_not_report_a_job_as_requeued_and_failed() -> None:
    """A lost worker's job past its deadline is re-queued, then timed out in the same call."""
    core = make_core()
    core.on_heartbeat(make_hb(), 0.0)
    core.enqueue(make_job("a", deadline_s=2.0), 0.0)
    core.take("w1", 1, 0.0)
    res = core.expire(5.0)
    assert [f.job.request_id for f in res.failed] == ["a"]
    assert res.requeued == []


def test_reestimate_reorders_a_queued_job_but_not_a_running_one() -> None:
    core = make_core("ssjf")
    core.on_heartbeat(make_hb(slots=1), 0.0)
    a, b = make_job("a", predicted_exec_ms=100.0), make_job("b", predicted_exec_ms=200.0)
    core.enqueue(a, 0.0)
    core.enqueue(b, 0.0)
    b.predicted_exec_ms = b.rank_exec_ms = 10.0  # a late prediction: "b" is short
    assert core.reestimate("b")
    assert core.queue.predicted_work_ms == pytest.approx(110.0)
    assert [j.request_id for j in core.take("w1", 1, 0.0)] == ["b"]
    assert not core.reestimate("b")  # running: nothing to re-key
    assert not core.reestimate("nope")
