"""powerd's control step on simulated GPUs, and the worker's view of the clock (no NATS)."""

from __future__ import annotations

import pytest

from services.common.schemas import PowerTelemetry, QueueTelemetry, StepTelemetry, WorkerRef
from services.common.settings import Settings
from services.powerd.service import PowerDaemon, snapshot_for_gpu
from services.powerd.sim_gpu import SimulatedGpu, get_profile
from services.worker.clock import ClockView


def queue(
    group: str, depth: int, workers: list[WorkerRef], ts_s: float = 100.0, work_ms: float = 0.0
) -> QueueTelemetry:
    return QueueTelemetry(
        group=group,
        ts_s=ts_s,
        depth=depth,
        running=0,
        predicted_work_ms=work_ms,
        running_work_ms=0.0,
        oldest_wait_ms=0.0,
        arrivals_per_s=0.0,
        completions_per_s=0.0,
        workers=workers,
        policy="ssjf",
    )


def test_snapshot_takes_this_gpus_share_of_each_group() -> None:
    ws = [
        WorkerRef(worker_id="a", node="n1", gpu=0, slots=8),
        WorkerRef(worker_id="b", node="n2", gpu=0, slots=8),
    ]
    other = [WorkerRef(worker_id="c", node="n2", gpu=1, slots=4)]
    snap = snapshot_for_gpu("n1", 0, [queue("chat", 10, ws, work_ms=1000.0), queue("embed", 7, other)])
    assert snap.depth == 5 and snap.predicted_work_ms == pytest.approx(500.0)
    assert snapshot_for_gpu("n3", 0, [queue("chat", 10, ws)]).depth == 0


def test_snapshot_feeds_the_policy_the_clocks_own_attainment() -> None:
    ws = [WorkerRef(worker_id="a", node="n1", gpu=0, slots=8)]
    q = queue("chat", 0, ws).model_copy(update={"slo_attainment": 0.8, "clock_slo_attainment": 0.99})
    assert snapshot_for_gpu("n1", 0, [q]).slo_attainment == pytest.approx(0.99)
    older = queue("chat", 0, ws).model_copy(update={"slo_attainment": 0.8})  # an older scheduler
    assert snapshot_for_gpu("n1", 0, [older]).slo_attainment == pytest.approx(0.8)


def daemon(policy: str) -> PowerDaemon:
    settings = Settings(node="n1", powerd={"backend": "sim", "profile": "v100", "gpus": 1, "policy": policy})
    return PowerDaemon(settings, nc=None)  # type: ignore[arg-type]  # control() does no I/O


def test_queue_threshold_lowers_clock_when_idle_and_raises_it_under_load() -> None:
    d = daemon("queue-threshold")
    gpu = d.gpus[0]
    assert isinstance(gpu, SimulatedGpu) and gpu.simulated
    ws = [WorkerRef(worker_id="a", node="n1", gpu=0, slots=8)]
    d.queues["chat"] = queue("chat", 0, ws, ts_s=100.0)
    idle = d.control(100.0)[0]
    assert idle.clock_mhz < gpu.max_clock_mhz and idle.simulated and idle.profile == "v100"
    d.queues["chat"] = queue("chat", 20, ws, ts_s=101.0)
    busy = d.control(101.0)[0]
    assert busy.clock_mhz == gpu.max_clock_mhz
    assert busy.energy_j >= idle.energy_j


def test_max_clock_policy_keeps_max_and_utilization_comes_from_step_telemetry() -> None:
    d = daemon("max-clock")
    gpu = d.gpus[0]
    d.steps[0] = StepTelemetry(
        worker_id="w",
        node="n1",
        gpu=0,
        ts_s=50.0,
        interval_ms=500.0,
        steps=10,
        busy_ms=250.0,
        tokens=40,
        mean_batch=4.0,
        p50_step_ms=25.0,
        max_step_ms=30.0,
        slowdown=1.0,
    )
    tel = d.control(50.1)[0]
    assert tel.clock_mhz == gpu.max_clock_mhz and tel.utilization == pytest.approx(0.5)
    # Stale step telemetry means an idle GPU.
    assert d.control(60.0)[0].utilization == 0.0


def test_dry_run_decides_but_never_touches_the_gpu() -> None:
    settings = Settings(
        node="n1", powerd={"backend": "sim", "gpus": 1, "policy": "queue-threshold", "dry_run": True}
    )
    d = PowerDaemon(settings, nc=None)  # type: ignore[arg-type]
    gpu = d.gpus[0]
    tel = d.control(10.0)[0]
    assert d.locked[0] is not None and d.locked[0] < gpu.max_clock_mhz
    assert tel.clock_mhz == gpu.max_clock_mhz  # the GPU was left alone


def power(
    clock: int, simulated: bool = True, profile: str | None = "v100", power_w: float = 123.0
) -> PowerTelemetry:
    return PowerTelemetry(
        node="n1",
        gpu=0,
        ts_s=1.0,
        name="gpu",
        clock_mhz=clock,
        max_clock_mhz=1530,
        power_w=power_w,
        energy_j=0.0,
        utilization=1.0,
        simulated=simulated,
        profile=profile,
        policy="p",
    )


def test_clock_view_slowdown_and_busy_power() -> None:
    view = ClockView()
    assert view.slowdown(0.6) == 1.0 and view.busy_power_w() is None and view.simulated is None
    view.update(power(765))  # half of max
    assert view.slowdown(1.0) == pytest.approx(2.0) and view.slowdown(0.0) == pytest.approx(1.0)
    assert view.slowdown(0.6) == pytest.approx(0.6 * 2 + 0.4)
    assert view.busy_power_w() == pytest.approx(get_profile("v100").power_at(765, 1.0))
    view.update(power(765, simulated=False, profile=None, power_w=250.0))
    assert view.slowdown(1.0) == 1.0 and view.busy_power_w() == 250.0  # a real GPU: measured, never stretched
    assert ClockView(enabled=False).slowdown(1.0) == 1.0
