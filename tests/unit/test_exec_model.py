"""The online exec-time fit, the oracle queue, and revised work of mispredicted running requests."""

from __future__ import annotations

import random

import pytest

from services.common.schemas import GenerateRequest, Job, JobKind, Prediction
from services.scheduler.core import JobState, JobStatus, remaining_work_ms
from services.scheduler.exec_model import LinearExecModel
from services.scheduler.request_queue import (
    OracleSJFQueue,
    QueuedRequest,
    SchedulingPolicy,
    make_request_queue,
)


def test_priors_hold_until_enough_samples_then_the_fit_recovers_the_line() -> None:
    m = LinearExecModel(const_ms=50.0, ms_per_token=25.0, min_samples=16)
    rng = random.Random(0)
    for i in range(315):
        tokens = rng.randint(1, 800)
        m.observe(tokens, 120.0 + 31.0 * tokens + rng.gauss(0, 20))
        if i < 15:
            assert m.coefficients() == (50.0, 25.0)  # not enough data yet
    const, per_token = m.coefficients()
    assert const == pytest.approx(120.0, abs=15.0) and per_token == pytest.approx(31.0, abs=0.2)
    assert m.estimate_ms(100) == pytest.approx(const + 100 * per_token)


def test_fit_is_windowed_clamped_and_ignores_garbage() -> None:
    m = LinearExecModel(const_ms=10.0, ms_per_token=1.0, window=32, min_samples=4)
    for t in range(1, 33):
        m.observe(t, 1000.0 - t)  # a negative slope would mean longer answers are faster: clamp to 0
    const, per_token = m.coefficients()
    assert per_token == 0.0 and const > 0
    for t in range(1, 33):
        m.observe(t, 5.0 * t)  # the window forgets the old regime entirely
    assert m.coefficients()[1] == pytest.approx(5.0)
    m.observe(-1, 10.0)
    m.observe(5, 0.0)
    assert m.samples == 32
    same = LinearExecModel(const_ms=10.0, ms_per_token=2.0, min_samples=4)
    for _ in range(8):
        same.observe(50, 300.0)  # no spread in length: keep the prior slope, fit the intercept
    assert same.coefficients() == pytest.approx((200.0, 2.0))


def test_running_sums_match_a_direct_fit_over_a_long_stream() -> None:
    m = LinearExecModel(const_ms=10.0, ms_per_token=1.0, window=64, min_samples=4)
    rng = random.Random(1)
    for _ in range(5000):  # many evictions: drift would show
        m.observe(rng.randint(1, 2000), rng.uniform(1e3, 1e5))
    xs = [x for x, _ in m._samples]
    ys = [y for _, y in m._samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    expected = (max(my - max(slope, 0.0) * mx, 0.0), max(slope, 0.0))
    assert m.coefficients() == pytest.approx(expected, rel=1e-9)


def test_oracle_queue_is_sjf_with_its_own_policy_name() -> None:
    q = make_request_queue("oracle", aging_factor=8.0, max_wait_ms=60_000.0)
    assert isinstance(q, OracleSJFQueue) and q.policy is SchedulingPolicy.ORACLE
    for rid, ms in (("long", 900.0), ("short", 10.0), ("mid", 100.0)):
        q.add(QueuedRequest(rid, arrival_s=0.0, predicted_exec_ms=ms))
    assert [q.pop(0.0).request_id for _ in range(3)] == ["short", "mid", "long"]  # type: ignore[union-attr]


def running(emitted: int, predicted_tokens: float, max_tokens: int = 1000) -> JobState:
    job = Job(
        request_id="r",
        kind=JobKind.GENERATE,
        model="m",
        group="g",
        reply_to="inbox",
        generate=GenerateRequest(prompt="x", max_tokens=max_tokens),
        prediction=Prediction(length_class=1, predicted_tokens=predicted_tokens, predictor="p"),
        predicted_exec_ms=50.0 + 10.0 * predicted_tokens,
        predicted_tokens=predicted_tokens,
        ms_per_token=10.0,
        accepted_at_s=0.0,
    )
    return JobState(
        job=job, status=JobStatus.RUNNING, worker_id="w", dispatched_at_s=1.0, emitted_tokens=emitted
    )


def test_remaining_work_follows_token_progress_and_is_revised_when_outlived() -> None:
    assert remaining_work_ms(running(emitted=30, predicted_tokens=100), now_s=2.0) == (700.0, False)
    work, outlived = remaining_work_ms(running(emitted=150, predicted_tokens=100), now_s=2.0)
    assert outlived and work == 1500.0  # as much again as it already produced
    work, outlived = remaining_work_ms(running(emitted=900, predicted_tokens=100, max_tokens=1000), now_s=2.0)
    assert outlived and work == 1000.0  # but never past max_tokens


def test_predictions_beyond_any_recent_answer_are_clipped() -> None:
    from services.common.settings import Settings
    from services.scheduler.service import Scheduler

    m = LinearExecModel(const_ms=10.0, ms_per_token=1.0, window=8, min_samples=4)
    assert m.longest_tokens() is None  # too few answers to bound anything
    for t in (100, 300, 512, 200):
        m.observe(t, 10.0 + t)
    assert m.longest_tokens() == 512
    for t in (50, 60, 70, 80, 90, 95, 99, 98):  # the 512-token answer leaves the window
        m.observe(t, 10.0 + t)
    assert m.longest_tokens() == 99

    settings = Settings()
    spec = settings.models[0]
    sched = Scheduler(settings, None, None)  # type: ignore[arg-type]  # no I/O in what is tested
    for t in (100, 300, 512, 200) * 4:
        sched.exec_models[spec.name].observe(t, 10.0 + 20.0 * t)
    job = Job(
        request_id="r",
        kind=JobKind.GENERATE,
        model=spec.name,
        group=spec.group,
        reply_to="_INBOX.r",
        generate=GenerateRequest(
            request_id="r", model=spec.name, prompt="hi", max_tokens=4096, ignore_eos=True
        ),
        predicted_exec_ms=1.0,
        accepted_at_s=0.0,
    )
    sched._apply_prediction(
        job, spec, Prediction(length_class=4, predicted_tokens=1400.0, predictor="p", score_tokens=2000.0)
    )
    # A replay's ignore_eos max_tokens is never read, but no estimate outruns the longest recent answer.
    assert job.predicted_tokens == 512.0
    const, per_token = sched.exec_models[spec.name].coefficients()
    assert job.rank_exec_ms == pytest.approx(const + per_token * 512.0)
