"""Clock policies: pure objects, driven with hand-made snapshots and times."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from services.powerd.gpu import slowdown_factor
from services.powerd.policy import (
    ClockPolicy,
    MaxClockPolicy,
    PolicyKind,
    QueueSnapshot,
    QueueThresholdPolicy,
    SloAwarePolicy,
    erlang_c,
    make_clock_policy,
    max_offered_load,
)
from services.powerd.sim_gpu import PROFILES

CLOCKS = PROFILES["V100"].supported_clocks_mhz()  # 1530 .. 135, descending
MAX = 1530
LOW = 922  # lowest V100 clock >= 0.6 * 1530 = 918


def snap(depth: int = 0, running: int = 0) -> QueueSnapshot:
    """Snapshot with only the counts that the threshold policy reads."""
    return QueueSnapshot(depth=depth, running=running, predicted_work_ms=50.0 * depth, oldest_wait_ms=0.0)


IDLE = snap(0, 0)
BURST = snap(6, 2)
BAND = snap(2, 1)  # between low_depth and high_depth


def test_max_clock_policy_is_constant() -> None:
    policy = MaxClockPolicy()
    assert policy.name == "max-clock"
    for t, s in enumerate((IDLE, BURST, BAND, snap(100, 8))):
        assert policy.choose_clock_mhz(s, CLOCKS, float(t)) == MAX
    assert policy.choose_clock_mhz(IDLE, sorted(CLOCKS), 0.0) == MAX  # order of the list is irrelevant
    with pytest.raises(ValueError):
        policy.choose_clock_mhz(IDLE, [], 0.0)


def test_threshold_idle_goes_to_the_low_clock() -> None:
    policy = QueueThresholdPolicy()
    assert policy.name == "queue-threshold"
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 0.0) == LOW
    assert policy.choose_clock_mhz(snap(0, 1), CLOCKS, 0.1) == LOW  # one in service is "near idle"
    assert policy.current_clock_mhz == LOW


def test_explicit_low_clock_is_snapped_to_a_supported_one() -> None:
    policy = QueueThresholdPolicy(low_clock_mhz=1000)
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 0.0) == 1005
    assert QueueThresholdPolicy(low_fraction=1.0).choose_clock_mhz(IDLE, CLOCKS, 0.0) == MAX


def test_burst_goes_to_max_immediately_even_inside_the_dwell() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=10.0)
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 0.0) == LOW
    assert policy.choose_clock_mhz(BURST, CLOCKS, 0.01) == MAX
    assert policy.choose_clock_mhz(snap(4, 0), CLOCKS, 0.02) == MAX  # depth == high_depth counts


def test_going_down_waits_for_the_dwell() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=2.0)
    assert policy.choose_clock_mhz(BURST, CLOCKS, 100.0) == MAX
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 101.0) == MAX
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 101.99) == MAX
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 102.0) == LOW
    # A second burst right after the step down still goes up at once.
    assert policy.choose_clock_mhz(BURST, CLOCKS, 102.1) == MAX


def test_dwell_counts_from_the_last_change_not_the_last_call() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=2.0)
    policy.choose_clock_mhz(BURST, CLOCKS, 0.0)
    for t in (0.5, 1.0, 1.5):
        assert policy.choose_clock_mhz(BURST, CLOCKS, t) == MAX
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 2.0) == LOW


def test_hysteresis_band_holds_either_clock() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=0.0)
    assert policy.choose_clock_mhz(BURST, CLOCKS, 0.0) == MAX
    for t in range(1, 20):
        assert policy.choose_clock_mhz(BAND, CLOCKS, float(t)) == MAX
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 20.0) == LOW
    for t in range(21, 40):
        assert policy.choose_clock_mhz(BAND, CLOCKS, float(t)) == LOW
    assert policy.choose_clock_mhz(snap(3, 5), CLOCKS, 40.0) == LOW  # many running, short queue: hold


def test_first_decision_in_the_band_is_max() -> None:
    assert QueueThresholdPolicy().choose_clock_mhz(BAND, CLOCKS, 0.0) == MAX


def test_reset_forgets_history() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=100.0)
    policy.choose_clock_mhz(BURST, CLOCKS, 0.0)
    policy.reset()
    assert policy.current_clock_mhz is None
    assert policy.choose_clock_mhz(IDLE, CLOCKS, 1.0) == LOW


def test_a_changed_clock_list_still_yields_a_supported_clock() -> None:
    policy = QueueThresholdPolicy(min_dwell_s=100.0)
    policy.choose_clock_mhz(IDLE, CLOCKS, 0.0)  # 922 on the V100
    a100 = PROFILES["A100"].supported_clocks_mhz()
    chosen = policy.choose_clock_mhz(BAND, a100, 1.0)
    assert chosen in a100 and chosen == 930


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low_fraction": 0.0},
        {"low_fraction": 1.5},
        {"high_depth": 1, "low_depth": 1},
        {"low_depth": -1},
        {"min_dwell_s": -1.0},
        {"low_clock_mhz": 0},
    ],
)
def test_threshold_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QueueThresholdPolicy(**kwargs)  # type: ignore[arg-type]


def test_snapshot_validation() -> None:
    with pytest.raises(ValueError):
        QueueSnapshot(depth=-1, running=0, predicted_work_ms=0.0, oldest_wait_ms=0.0)
    with pytest.raises(ValueError):
        QueueSnapshot(depth=0, running=0, predicted_work_ms=-1.0, oldest_wait_ms=0.0)
    with pytest.raises(ValueError):
        QueueSnapshot(depth=0, running=0, predicted_work_ms=0.0, oldest_wait_ms=0.0, slo_ms=0.0)
    assert QueueSnapshot(1, 2, 3.0, 4.0, slo_ms=500.0).slo_ms == 500.0


def test_factory_builds_by_name_or_kind() -> None:
    assert isinstance(make_clock_policy("max-clock"), MaxClockPolicy)
    assert isinstance(make_clock_policy(PolicyKind.MAX_CLOCK), MaxClockPolicy)
    policy = make_clock_policy("Queue_Threshold", high_depth=8, min_dwell_s=0.5)
    assert isinstance(policy, QueueThresholdPolicy) and isinstance(policy, ClockPolicy)
    assert (policy.high_depth, policy.min_dwell_s) == (8, 0.5)
    assert PolicyKind("queue-threshold") is PolicyKind.QUEUE_THRESHOLD
    slo = make_clock_policy("slo_aware", slo_scale=4.0, margin=0.1)
    assert isinstance(slo, SloAwarePolicy) and (slo.slo_scale, slo.margin) == (4.0, 0.1)
    assert {k.value for k in PolicyKind} == {
        MaxClockPolicy.name,
        QueueThresholdPolicy.name,
        SloAwarePolicy.name,
    }


def test_factory_rejects_unknown_kinds_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'race-to-idle'.*max-clock, queue-threshold, slo-aware"):
        make_clock_policy("race-to-idle")
    with pytest.raises(TypeError):
        make_clock_policy("max-clock", high_depth=3)


# -- SLO-aware policy -------------------------------------------------------------------------------


def slo_snap(
    depth: int = 0,
    running: int = 0,
    work_ms: float = 0.0,
    oldest_ms: float = 0.0,
    rate: float = 0.0,
    mean_exec_ms: float = 1000.0,
    slots: int = 8,
    s: float | None = 0.5,
    scale: float | None = 5.0,
    slack: float | None = None,
    attainment: float | None = None,
    slo_ms: float | None = None,
) -> QueueSnapshot:
    """A snapshot carrying what the SLO-aware policy reads."""
    return QueueSnapshot(
        depth=depth,
        running=running,
        predicted_work_ms=work_ms,
        oldest_wait_ms=oldest_ms,
        slo_ms=slo_ms,
        arrivals_per_s=rate,
        mean_exec_ms=mean_exec_ms,
        slots=slots,
        sensitivity=s,
        slo_scale=scale,
        slack_slowdown=slack,
        slo_attainment=attainment,
    )


def lowest_clock_within(max_slowdown: float, s: float) -> int:
    """Brute force: the lowest V100 clock whose slowdown is within max_slowdown."""
    return min(c for c in CLOCKS if slowdown_factor(c, MAX, s) <= max_slowdown + 1e-12)


def test_slo_aware_without_an_slo_stays_at_max() -> None:
    policy = SloAwarePolicy()
    assert policy.name == "slo-aware"
    assert policy.choose_clock_mhz(slo_snap(scale=None), CLOCKS, 0.0) == MAX


def test_idle_gpu_goes_as_low_as_the_stretch_rule_allows() -> None:
    # Idle: only "one request alone, slowed, fits slo_scale / (1 + margin)" binds; the first move
    # lands a hysteresis band inside it.
    policy = SloAwarePolicy(margin=0.25, hysteresis=0.1)
    chosen = policy.choose_clock_mhz(slo_snap(), CLOCKS, 0.0)
    assert chosen == lowest_clock_within(5.0 / 1.25 / 1.1, 0.5)
    assert slowdown_factor(chosen, MAX, 0.5) <= 5.0 / 1.25  # the SLO with the base margin holds
    # A memory-bound model (s = 0) loses nothing at the lowest clock.
    assert SloAwarePolicy().choose_clock_mhz(slo_snap(s=0.0), CLOCKS, 0.0) == min(CLOCKS)
    # A tight SLO keeps a compute-bound model near max.
    tight = SloAwarePolicy().choose_clock_mhz(slo_snap(s=1.0, scale=1.3), CLOCKS, 0.0)
    assert tight > 0.9 * MAX and slowdown_factor(tight, MAX, 1.0) <= 1.3 / 1.25


def test_snapshot_sensitivity_overrides_the_policy_default() -> None:
    low_s = SloAwarePolicy(sensitivity=1.0).choose_clock_mhz(slo_snap(s=0.2), CLOCKS, 0.0)
    high_s = SloAwarePolicy(sensitivity=0.2).choose_clock_mhz(slo_snap(s=None), CLOCKS, 0.0)
    assert low_s == high_s  # both use s = 0.2
    assert SloAwarePolicy(sensitivity=1.0).choose_clock_mhz(slo_snap(s=None), CLOCKS, 0.0) > low_s


def test_absolute_slo_bounds_one_requests_stretch() -> None:
    # slo_ms 3000 for a 1000 ms request: sd <= 3 / (1 + margin) / (1 + hysteresis) on the first move.
    policy = SloAwarePolicy(margin=0.2, hysteresis=0.1)
    chosen = policy.choose_clock_mhz(slo_snap(scale=None, slo_ms=3000.0, s=0.8), CLOCKS, 0.0)
    assert chosen == lowest_clock_within(3.0 / 1.2 / 1.1, 0.8)


def test_backlog_rule_drains_the_queue_in_time() -> None:
    # 8 slots, 40 s of queued work -> 5 s to drain at max; budget 5 x 2 s = 10 s with 2 s waited.
    policy = SloAwarePolicy(margin=0.25, hysteresis=0.0)
    snap = slo_snap(depth=12, running=8, work_ms=40_000.0, oldest_ms=2000.0, mean_exec_ms=2000.0)
    chosen = policy.choose_clock_mhz(snap, CLOCKS, 0.0)
    allowed = (10_000.0 / 1.25 - 2000.0) / 5000.0
    assert chosen == lowest_clock_within(allowed, 0.5)
    assert policy.max_slowdowns(snap, 0.25, 0.1)[1] == pytest.approx(allowed)


def test_load_rule_keeps_the_wait_probability_bounded() -> None:
    policy = SloAwarePolicy(margin=0.25, hysteresis=0.0, max_wait_probability=0.1)
    snap = slo_snap(rate=2.0, mean_exec_ms=2000.0, slots=8)  # 4 Erlangs at max clock
    chosen = policy.choose_clock_mhz(snap, CLOCKS, 0.0)
    sd = slowdown_factor(chosen, MAX, 0.5)
    assert erlang_c(8, 4.0 * sd) <= 0.1 + 1e-9
    lower = max(c for c in CLOCKS if c < chosen)
    assert erlang_c(8, 4.0 * slowdown_factor(lower, MAX, 0.5)) > 0.1  # the next clock down breaks it
    # Arrivals the GPU cannot carry even at max: straight to max.
    assert SloAwarePolicy().choose_clock_mhz(slo_snap(rate=10.0, mean_exec_ms=2000.0), CLOCKS, 0.0) == MAX


def test_a_shared_queue_pools_the_slots_of_its_gpus() -> None:
    # Four GPUs behind one queue: the same per-GPU load waits far less often than on a GPU alone.
    alone = SloAwarePolicy(hysteresis=0.0).choose_clock_mhz(
        slo_snap(rate=1.5, mean_exec_ms=2000.0), CLOCKS, 0.0
    )
    pooled_snap = replace(slo_snap(rate=1.5, mean_exec_ms=2000.0), queue_slots=32)
    pooled = SloAwarePolicy(hysteresis=0.0).choose_clock_mhz(pooled_snap, CLOCKS, 0.0)
    assert pooled < alone
    sd = slowdown_factor(pooled, MAX, 0.5)
    assert erlang_c(32, 4 * 3.0 * sd) <= 0.1 + 1e-9


def test_erlang_c_matches_closed_forms() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1.0 / 3.0)  # 2 rho^2 / (1 + rho), rho = 0.5
    assert erlang_c(4, 0.0) == 0.0 and erlang_c(4, 4.0) == 1.0
    assert erlang_c(8, max_offered_load(8, 0.1)) == pytest.approx(0.1, abs=1e-6)
    # Thousands of pooled slots: no overflow, and pooling lets utilisation approach 1.
    assert 0.95 < max_offered_load(8000, 0.1) / 8000 < 1.0
    assert max_offered_load(8, 0.1) / 8 < max_offered_load(32, 0.1) / 32 < max_offered_load(8000, 0.1) / 8000
    with pytest.raises(ValueError):
        erlang_c(0, 1.0)


def test_up_is_immediate_down_waits_for_the_dwell() -> None:
    policy = SloAwarePolicy(min_dwell_s=2.0)
    low = policy.choose_clock_mhz(slo_snap(), CLOCKS, 100.0)
    busy = slo_snap(rate=3.0, mean_exec_ms=2000.0)
    high = policy.choose_clock_mhz(busy, CLOCKS, 100.1)
    assert high > low  # at once
    assert policy.choose_clock_mhz(slo_snap(), CLOCKS, 101.0) == high
    assert policy.choose_clock_mhz(slo_snap(), CLOCKS, 102.0) == high  # 1.9 s since the change
    assert policy.choose_clock_mhz(slo_snap(), CLOCKS, 102.2) == low


def test_hysteresis_holds_the_clock_under_small_fluctuations() -> None:
    policy = SloAwarePolicy(min_dwell_s=0.0, hysteresis=0.2)
    chosen = [policy.choose_clock_mhz(slo_snap(rate=1.5, mean_exec_ms=2000.0), CLOCKS, 0.0)]
    for i, rate in enumerate([1.45, 1.55, 1.5, 1.4, 1.6, 1.5] * 3):
        chosen.append(policy.choose_clock_mhz(slo_snap(rate=rate, mean_exec_ms=2000.0), CLOCKS, 1.0 + i))
    # A +-7% wobble inside a 20% band never sends the clock back up: it settles, it does not flap.
    assert all(b <= a for a, b in itertools.pairwise(chosen))
    assert len(set(chosen)) <= 3
    # Without hysteresis the same wobble does move it up again.
    bare = SloAwarePolicy(min_dwell_s=0.0, hysteresis=0.0)
    rates = [1.5, 1.4, 1.6, 1.4, 1.6]
    plain = [
        bare.choose_clock_mhz(slo_snap(rate=r, mean_exec_ms=2000.0), CLOCKS, float(i))
        for i, r in enumerate(rates)
    ]
    assert any(b > a for a, b in itertools.pairwise(plain))


def test_slo_risk_goes_straight_to_max() -> None:
    policy = SloAwarePolicy(min_dwell_s=100.0)
    low = policy.choose_clock_mhz(slo_snap(), CLOCKS, 0.0)
    assert low < MAX
    # The most urgent request can absorb no more slowdown than max clock gives: max at once.
    assert policy.choose_clock_mhz(slo_snap(running=3, slack=0.9), CLOCKS, 0.5) == MAX
    # A backlog already late at the current clock: max too.
    late = SloAwarePolicy(min_dwell_s=100.0)
    late.choose_clock_mhz(slo_snap(), CLOCKS, 0.0)
    snap = slo_snap(depth=20, running=8, work_ms=60_000.0, oldest_ms=7000.0, mean_exec_ms=2000.0)
    assert late.choose_clock_mhz(snap, CLOCKS, 0.5) == MAX


def test_slack_rule_raises_the_clock_for_an_urgent_request() -> None:
    policy = SloAwarePolicy(margin=0.25, hysteresis=0.0)
    relaxed = policy.choose_clock_mhz(slo_snap(running=2, slack=10.0), CLOCKS, 0.0)
    urgent = SloAwarePolicy(margin=0.25, hysteresis=0.0).choose_clock_mhz(
        slo_snap(running=2, slack=1.6), CLOCKS, 0.0
    )
    assert urgent > relaxed and urgent == lowest_clock_within(1.6 / 1.25, 0.5)


def test_attainment_feedback_raises_then_releases_a_floor() -> None:
    policy = SloAwarePolicy(target_attainment=0.99, floor_gain_per_s=0.1, min_dwell_s=0.0)
    base = policy.choose_clock_mhz(slo_snap(attainment=1.0), CLOCKS, 0.0)
    t = 0.0
    for _ in range(60):  # 30 s at 90% attainment: the floor rises by 0.1 x 0.09 x 30 s
        t += 0.5
        clock = policy.choose_clock_mhz(slo_snap(attainment=0.90), CLOCKS, t)
    assert policy.floor_fraction == pytest.approx(0.27)
    assert clock >= policy.floor_fraction * MAX > base
    for _ in range(2000):  # attainment back at 100%: the floor decays
        t += 0.5
        clock = policy.choose_clock_mhz(slo_snap(attainment=1.0), CLOCKS, t)
    assert policy.floor_fraction == 0.0 and clock == base
    policy.reset()
    assert policy.current_clock_mhz is None and policy.floor_fraction == 0.0
    assert (
        SloAwarePolicy(target_attainment=None).choose_clock_mhz(slo_snap(attainment=0.0), CLOCKS, 0.0) == base
    )


def test_attainment_floor_does_not_wind_up_while_at_max_clock() -> None:
    policy = SloAwarePolicy(target_attainment=0.99, floor_gain_per_s=0.1, min_dwell_s=0.0)
    # A burst beyond capacity: the clock is pinned at max (SLO at risk) and requests miss anyway.
    burst = slo_snap(running=3, slack=0.9, attainment=0.80)
    t = 0.0
    for _ in range(60):
        t += 0.5
        assert policy.choose_clock_mhz(burst, CLOCKS, t) == MAX
    assert policy.floor_fraction == 0.0  # those misses were not the clock's doing
    # After the burst the clock may fall at once, although the attainment window still holds the misses.
    assert policy.choose_clock_mhz(slo_snap(attainment=0.80), CLOCKS, t + 0.5) < MAX


def test_slo_aware_min_clock_and_changed_clock_list() -> None:
    assert SloAwarePolicy(min_clock_mhz=1000).choose_clock_mhz(slo_snap(s=0.0), CLOCKS, 0.0) == 1005
    policy = SloAwarePolicy(min_dwell_s=100.0)
    policy.choose_clock_mhz(slo_snap(), CLOCKS, 0.0)
    a100 = PROFILES["A100"].supported_clocks_mhz()
    assert policy.choose_clock_mhz(slo_snap(), a100, 1.0) in a100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sensitivity": 1.5},
        {"slo_ms": 0.0},
        {"slo_scale": -1.0},
        {"margin": -0.1},
        {"hysteresis": -0.1},
        {"max_wait_probability": 0.0},
        {"max_wait_probability": 1.0},
        {"min_dwell_s": -1.0},
        {"min_clock_mhz": 0},
        {"target_attainment": 0.0},
        {"floor_gain_per_s": -1.0},
    ],
)
def test_slo_aware_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SloAwarePolicy(**kwargs)  # type: ignore[arg-type]


def test_snapshot_new_fields_are_optional_and_validated() -> None:
    old_style = QueueSnapshot(1, 2, 3.0, 4.0)
    assert (old_style.arrivals_per_s, old_style.slots, old_style.sensitivity, old_style.slo_scale) == (
        0.0,
        1,
        None,
        None,
    )
    for bad in (
        {"arrivals_per_s": -1.0},
        {"mean_exec_ms": -1.0},
        {"slots": 0},
        {"sensitivity": 1.2},
        {"slo_scale": 0.0},
        {"slack_slowdown": float("nan")},
        {"slo_attainment": 1.5},
        {"queue_slots": 0},
    ):
        with pytest.raises(ValueError):
            QueueSnapshot(0, 0, 0.0, 0.0, **bad)  # type: ignore[arg-type]


def test_powerd_runs_the_slo_aware_policy_from_live_telemetry() -> None:
    from services.common.schemas import QueueTelemetry, WorkerRef
    from services.common.settings import Settings
    from services.powerd.service import PowerDaemon, snapshot_for_gpu

    settings = Settings(
        node="n1",
        powerd={"backend": "sim", "profile": "v100", "gpus": 1, "policy": "slo-aware", "slo_scale": 4.0},
    )
    daemon = PowerDaemon(settings, nc=None)  # type: ignore[arg-type]  # control() does no I/O
    assert isinstance(daemon.policies[0], SloAwarePolicy) and daemon.policies[0].slo_scale == 4.0
    ws = [
        WorkerRef(worker_id="a", node="n1", gpu=0, slots=8),
        WorkerRef(worker_id="b", node="n2", gpu=0, slots=8),
    ]
    tel = QueueTelemetry(
        group="chat",
        ts_s=100.0,
        depth=0,
        running=2,
        predicted_work_ms=0.0,
        running_work_ms=800.0,
        oldest_wait_ms=0.0,
        arrivals_per_s=1.0,
        completions_per_s=1.0,
        workers=ws,
        policy="ssjf",
    )
    snap = snapshot_for_gpu("n1", 0, [tel], daemon.sensitivity)
    assert (snap.arrivals_per_s, snap.slots, snap.queue_slots, snap.sensitivity) == (0.5, 8, 16, 0.6)
    daemon.queues["chat"] = tel
    assert daemon.control(100.0)[0].clock_mhz < MAX
