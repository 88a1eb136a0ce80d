"""GroupCore's SLO telemetry for the clock policy: smoothed rate and exec time, slack, attainment."""

from __future__ import annotations

import pytest

from services.common.codec import decode, encode
from services.common.schemas import GenerateRequest, Job, JobKind, QueueTelemetry
from services.scheduler.core import GroupCore, JobState, JobStatus, slack_slowdown, solo_exec_ms
from services.scheduler.request_queue import make_request_queue
from tests.unit.test_scheduler_core import make_hb


def core_with_slo(slo_scale: float | None = 5.0, rate_window_s: float = 20.0) -> GroupCore:
    """A FCFS group core with a relative SLO."""
    return GroupCore(
        "chat",
        make_request_queue("fcfs"),
        max_queue=64,
        worker_lease_s=3.0,
        slo_scale=slo_scale,
        rate_window_s=rate_window_s,
        slo_window_s=60.0,
    )


def gen_job(rid: str, accepted_at_s: float, *, tokens: float = 10.0, ms_per_token: float = 10.0) -> Job:
    """A generate job predicted at 100 ms + ms_per_token x tokens."""
    return Job(
        request_id=rid,
        kind=JobKind.GENERATE,
        model="m1",
        group="chat",
        reply_to=f"_INBOX.{rid}",
        generate=GenerateRequest(request_id=rid, model="m1", prompt="hi", max_tokens=1000),
        predicted_exec_ms=100.0 + ms_per_token * tokens,
        predicted_tokens=tokens,
        ms_per_token=ms_per_token,
        accepted_at_s=accepted_at_s,
    )


def test_solo_exec_uses_the_jobs_own_cost_model() -> None:
    job = gen_job("a", 0.0, tokens=10.0)  # 100 + 10 x 10 = 200 ms
    assert solo_exec_ms(job, 10) == pytest.approx(200.0)
    assert solo_exec_ms(job, 30) == pytest.approx(400.0)  # the true length, not the predicted one
    embed = job.model_copy(update={"generate": None, "predicted_exec_ms": 20.0})
    assert solo_exec_ms(embed, 999) == 20.0  # single-shot: the predicted time


def test_rate_and_mean_exec_are_smoothed_over_the_window() -> None:
    core = core_with_slo(rate_window_s=10.0)
    core.telemetry(0.0, 0.5, 0, 0)  # the telemetry loop starts with the scheduler
    for i, t in enumerate((1.0, 2.0, 3.0, 4.0)):
        core.enqueue(gen_job(f"r{i}", t, tokens=10.0 * (i + 1)), t)
    tel = core.telemetry(5.0, 0.5, arrivals=0, completions=0)
    # Young scheduler: 4 arrivals over the 5.5 s it has seen, not over the full window.
    assert tel.window_s == pytest.approx(5.5) and tel.mean_arrivals_per_s == pytest.approx(4 / 5.5)
    assert tel.arrivals_per_s == 0.0  # the raw per-interval count is unchanged
    assert tel.mean_exec_ms == pytest.approx(100.0 + 10.0 * 25.0)  # mean of 200, 300, 400, 500
    later = core.telemetry(13.5, 0.5, 0, 0)  # r0..r2 fell out of the 10 s window
    assert later.window_s == 10.0 and later.mean_arrivals_per_s == pytest.approx(0.1)
    assert later.mean_exec_ms == pytest.approx(500.0)
    assert core.telemetry(30.0, 0.5, 0, 0).mean_exec_ms is None  # nothing arrived lately


def test_mean_exec_follows_a_late_prediction() -> None:
    core = core_with_slo()
    job = gen_job("a", 0.0)
    core.enqueue(job, 0.0)
    job.predicted_exec_ms = 900.0  # the predictor's answer landed after admission (re-keyed in place)
    assert core.telemetry(1.0, 0.5, 0, 0).mean_exec_ms == pytest.approx(900.0)


def test_slack_of_queued_and_running_jobs() -> None:
    # Queued: time left to accepted + 5 x 200 ms, over its 200 ms of predicted work.
    queued = JobState(job=gen_job("q", 0.0), status=JobStatus.QUEUED)
    assert slack_slowdown(queued, 0.0, 5.0) == pytest.approx(5.0)
    assert slack_slowdown(queued, 0.6, 5.0) == pytest.approx(2.0)
    assert slack_slowdown(queued, 2.0, 5.0) == pytest.approx(-5.0)  # already late: negative
    # Running, 4 of 10 predicted tokens out: 60 ms of work left, deadline at 1.0 s.
    running = JobState(job=gen_job("r", 0.0), status=JobStatus.RUNNING, dispatched_at_s=0.1, emitted_tokens=4)
    assert slack_slowdown(running, 0.4, 5.0) == pytest.approx(600.0 / 60.0)
    # Outlived (25 tokens out of 10 predicted): 25 more expected, so the SLO grows to 5 x (100 + 500).
    over = JobState(job=gen_job("o", 0.0), status=JobStatus.RUNNING, dispatched_at_s=0.1, emitted_tokens=25)
    assert slack_slowdown(over, 1.0, 5.0) == pytest.approx((3000.0 - 1000.0) / 250.0)


def test_telemetry_publishes_the_tightest_slack() -> None:
    core = core_with_slo()
    core.on_heartbeat(make_hb(slots=1), 0.0)
    core.enqueue(gen_job("first", 0.0), 0.0)
    core.enqueue(gen_job("second", 0.5), 0.5)
    core.take("w1", 1, 0.5)  # "first" runs, "second" waits
    tel = core.telemetry(0.8, 0.5, 0, 0)
    # first: 200 ms left to its deadline over 10 tokens x 10 ms of work left = 2.0;
    # second (queued): 700 ms left over its 200 ms predicted exec = 3.5.
    assert tel.slack_slowdown == pytest.approx(2.0)
    assert tel.slo_scale == 5.0


def test_attainment_over_completed_jobs_in_the_window() -> None:
    core = core_with_slo()
    assert core.telemetry(0.0, 0.5, 0, 0).slo_attainment is None  # nothing completed yet
    fast, slow = gen_job("fast", 0.0), gen_job("slow", 0.0)
    assert core.observe_completion(fast, 0.9, completion_tokens=10) is True  # 900 ms <= 5 x 200 ms
    assert core.observe_completion(slow, 1.1, completion_tokens=10) is False
    # A longer true answer earns a longer SLO: 1.1 s <= 5 x (100 + 10 x 20) ms.
    assert core.observe_completion(gen_job("long", 0.0), 1.1, completion_tokens=20) is True
    tel = core.telemetry(2.0, 0.5, 0, 0)
    assert tel.slo_attainment == pytest.approx(2 / 3) and tel.slo_completions == 3
    assert tel.slo_window_s == 60.0
    assert core.telemetry(70.0, 0.5, 0, 0).slo_attainment is None  # all outside the 60 s window


def test_without_an_slo_there_is_no_slack_or_attainment() -> None:
    core = core_with_slo(slo_scale=None)
    core.enqueue(gen_job("a", 0.0), 0.0)
    assert core.observe_completion(gen_job("b", 0.0), 1.0, 10) is None
    tel = core.telemetry(1.0, 0.5, 0, 0)
    assert tel.slo_scale is None and tel.slack_slowdown is None and tel.slo_attainment is None
    assert tel.mean_exec_ms == pytest.approx(200.0)  # smoothing does not need an SLO


def test_queue_telemetry_stays_backward_compatible() -> None:
    # An older scheduler's message (no new keys) still decodes, with the new fields unknown.
    old = {
        "v": 1,
        "group": "chat",
        "ts_s": 1.0,
        "depth": 2,
        "running": 1,
        "predicted_work_ms": 10.0,
        "running_work_ms": 5.0,
        "oldest_wait_ms": 0.0,
        "arrivals_per_s": 1.0,
        "completions_per_s": 1.0,
        "policy": "fcfs",
    }
    import msgpack

    tel = decode(QueueTelemetry, msgpack.packb(old))
    assert tel.mean_arrivals_per_s is None and tel.slack_slowdown is None and tel.slo_attainment is None
    new = core_with_slo().telemetry(1.0, 0.5, 0, 0)
    assert decode(QueueTelemetry, encode(new)) == new


def test_clock_attainment_counts_only_the_misses_the_clock_caused() -> None:
    core = core_with_slo()
    # Each solo time is 200 ms, the SLO 1 s: all three miss it.
    core.observe_completion(gen_job("burst", 0.0), 1.5, 10, stretch_ms=0.0)  # at max clock: not the clock
    core.observe_completion(gen_job("slowed", 0.0), 1.2, 10, stretch_ms=400.0)  # 0.8 s at max: the clock
    core.observe_completion(gen_job("both", 0.0), 2.0, 10, stretch_ms=300.0)  # 1.7 s at max: not the clock
    tel = core.telemetry(2.0, 0.5, 0, 3)
    assert tel.slo_attainment == 0.0
    assert tel.clock_slo_attainment == pytest.approx(2 / 3)
