"""Clock policies: pure objects that map queue telemetry to a graphics clock (no I/O, no GPU calls).

The same objects drive powerd on a node and the discrete-event simulator. A new policy (the
SLO-aware one from µ-Serve is next) subclasses ClockPolicy, adds a PolicyKind member and registers
its constructor in _POLICY_CONSTRUCTORS; callers only ever go through make_clock_policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from services.powerd.gpu import snap_to_supported_clock_mhz

__all__ = [
    "ClockPolicy",
    "MaxClockPolicy",
    "PolicyKind",
    "QueueSnapshot",
    "QueueThresholdPolicy",
    "make_clock_policy",
]


@dataclass(frozen=True)
class QueueSnapshot:
    """What the scheduler's telemetry says about the queue feeding the GPUs one powerd controls."""

    depth: int  # queued requests
    running: int  # requests in service
    predicted_work_ms: float  # predicted outstanding work at max clock
    oldest_wait_ms: float
    slo_ms: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 0 or self.running < 0:
            raise ValueError(f"depth and running must be >= 0, got {self.depth}, {self.running}")
        if self.predicted_work_ms < 0 or self.oldest_wait_ms < 0:
            raise ValueError("predicted_work_ms and oldest_wait_ms must be >= 0")
        if self.slo_ms is not None and self.slo_ms <= 0:
            raise ValueError(f"slo_ms must be positive, got {self.slo_ms}")


def _max_clock_mhz(supported_clocks_mhz: Sequence[int]) -> int:
    """Highest clock, refusing an empty list with a clear error."""
    if not supported_clocks_mhz:
        raise ValueError("supported_clocks_mhz is empty")
    return max(supported_clocks_mhz)


class ClockPolicy(ABC):
    """Chooses the graphics clock to lock for the next control interval."""

    name: ClassVar[str]

    @abstractmethod
    def choose_clock_mhz(self, snapshot: QueueSnapshot, supported_clocks_mhz: list[int], now_s: float) -> int:
        """Return one of supported_clocks_mhz; now_s is any monotonic time in seconds."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MaxClockPolicy(ClockPolicy):
    """Baseline: always the highest supported clock (what the GPU does with no power management)."""

    name = "max-clock"

    def choose_clock_mhz(self, snapshot: QueueSnapshot, supported_clocks_mhz: list[int], now_s: float) -> int:
        """Highest supported clock, whatever the queue."""
        return _max_clock_mhz(supported_clocks_mhz)


class QueueThresholdPolicy(ClockPolicy):
    """Two clocks: low when (nearly) idle, max under a burst, hold in between, slow to step down."""

    name = "queue-threshold"

    def __init__(
        self,
        low_clock_mhz: int | None = None,
        low_fraction: float = 0.6,
        high_depth: int = 4,
        low_depth: int = 1,
        min_dwell_s: float = 2.0,
    ) -> None:
        if low_clock_mhz is not None and low_clock_mhz <= 0:
            raise ValueError(f"low_clock_mhz must be positive, got {low_clock_mhz}")
        if not 0.0 < low_fraction <= 1.0:
            raise ValueError(f"low_fraction must be in (0, 1], got {low_fraction}")
        if not 0 <= low_depth < high_depth:
            raise ValueError(f"need 0 <= low_depth < high_depth, got {low_depth} and {high_depth}")
        if min_dwell_s < 0:
            raise ValueError(f"min_dwell_s must be >= 0, got {min_dwell_s}")
        self.low_clock_mhz = low_clock_mhz
        self.low_fraction = low_fraction
        self.high_depth = high_depth
        self.low_depth = low_depth
        self.min_dwell_s = min_dwell_s
        self._current_mhz: int | None = None
        self._changed_at_s = 0.0

    @property
    def current_clock_mhz(self) -> int | None:
        """The clock chosen last, or None before the first decision."""
        return self._current_mhz

    def low_target_mhz(self, supported_clocks_mhz: Sequence[int]) -> int:
        """The low clock as a supported clock: lowest one at or above the requested value."""
        target = self.low_clock_mhz
        if target is None:
            target = round(self.low_fraction * _max_clock_mhz(supported_clocks_mhz))
        return snap_to_supported_clock_mhz(target, supported_clocks_mhz)

    def choose_clock_mhz(self, snapshot: QueueSnapshot, supported_clocks_mhz: list[int], now_s: float) -> int:
        """Apply thresholds, hysteresis and dwell; remembers the choice."""
        max_mhz = _max_clock_mhz(supported_clocks_mhz)
        current = self._current_mhz
        if current is not None and current not in supported_clocks_mhz:
            # The clock list changed under us (another GPU model): keep an equivalent valid clock.
            current = self._current_mhz = snap_to_supported_clock_mhz(current, supported_clocks_mhz)
        if snapshot.depth >= self.high_depth:
            wanted = max_mhz
        elif snapshot.depth + snapshot.running <= self.low_depth:
            wanted = self.low_target_mhz(supported_clocks_mhz)
        else:
            # Hysteresis band: keep what we have; with no history, max is the safe start.
            wanted = current if current is not None else max_mhz

        # Going up to max never waits (a burst must not queue behind a slow clock); any other
        # change waits out the dwell so a flickering queue cannot make the clock flap.
        if current is None or (
            wanted != current and (wanted == max_mhz or now_s - self._changed_at_s >= self.min_dwell_s)
        ):
            self._current_mhz = current = wanted
            self._changed_at_s = now_s
        return current

    def reset(self) -> None:
        """Forget history, e.g. after the GPU's clocks were reset behind the policy's back."""
        self._current_mhz = None
        self._changed_at_s = 0.0

    def __repr__(self) -> str:
        return (
            f"QueueThresholdPolicy(low_clock_mhz={self.low_clock_mhz}, low_fraction={self.low_fraction}, "
            f"high_depth={self.high_depth}, low_depth={self.low_depth}, min_dwell_s={self.min_dwell_s})"
        )


class PolicyKind(StrEnum):
    """Names accepted by make_clock_policy (and by configuration)."""

    MAX_CLOCK = "max-clock"
    QUEUE_THRESHOLD = "queue-threshold"


_POLICY_CONSTRUCTORS: dict[PolicyKind, Callable[..., ClockPolicy]] = {
    PolicyKind.MAX_CLOCK: MaxClockPolicy,
    PolicyKind.QUEUE_THRESHOLD: QueueThresholdPolicy,
}


def make_clock_policy(kind: str | PolicyKind, **kwargs: Any) -> ClockPolicy:
    """Build a policy by name ("max-clock", "queue-threshold"; "_" works for "-"), forwarding kwargs."""
    if isinstance(kind, PolicyKind):
        resolved = kind
    else:
        try:
            resolved = PolicyKind(kind.strip().lower().replace("_", "-"))
        except ValueError:
            valid = ", ".join(k.value for k in PolicyKind)
            raise ValueError(f"unknown clock policy {kind!r}; choose one of: {valid}") from None
    return _POLICY_CONSTRUCTORS[resolved](**kwargs)
