"""Clock policies: pure objects, driven with hand-made snapshots and times."""

from __future__ import annotations

import pytest

from services.powerd.policy import (
    ClockPolicy,
    MaxClockPolicy,
    PolicyKind,
    QueueSnapshot,
    QueueThresholdPolicy,
    make_clock_policy,
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
    assert {k.value for k in PolicyKind} == {MaxClockPolicy.name, QueueThresholdPolicy.name}


def test_factory_rejects_unknown_kinds_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'slo-aware'.*max-clock, queue-threshold"):
        make_clock_policy("slo-aware")
    with pytest.raises(TypeError):
        make_clock_policy("max-clock", high_depth=3)
