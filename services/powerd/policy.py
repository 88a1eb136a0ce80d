"""Clock policies: pure objects that map queue telemetry to a graphics clock (no I/O, no GPU calls).

The same objects drive powerd on a node and the discrete-event simulator (services/sim). A policy
subclasses ClockPolicy, adds a PolicyKind member and registers its constructor in
_POLICY_CONSTRUCTORS; callers only ever go through make_clock_policy.
"""

from __future__ import annotations

import bisect
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from services.powerd.gpu import slowdown_factor, snap_to_supported_clock_mhz

__all__ = [
    "ClockPolicy",
    "MaxClockPolicy",
    "PolicyKind",
    "QueueSnapshot",
    "QueueThresholdPolicy",
    "SloAwarePolicy",
    "erlang_c",
    "make_clock_policy",
    "max_offered_load",
]


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """What the scheduler's telemetry says about the queue feeding the GPUs one powerd controls."""

    depth: int  # queued requests
    running: int  # requests in service
    predicted_work_ms: float  # predicted outstanding work (queued + running) at max clock
    oldest_wait_ms: float
    slo_ms: float | None = None  # absolute SLO: a request's wait + exec must stay under this
    # Everything below is optional (older callers leave the defaults); the SLO-aware policy reads it.
    arrivals_per_s: float = 0.0  # this GPU's share of the arrival rate
    mean_exec_ms: float = 0.0  # predicted exec time of a typical request at max clock (0: unknown)
    slots: int = 1  # sequences the GPU runs at once: work drains `slots` requests in parallel
    sensitivity: float | None = None  # the models' s in t(f) = t(fmax) * (s * fmax / f + 1 - s)
    slo_scale: float | None = None  # relative SLO: a request may take slo_scale x its own exec time
    # SLO slack of the most urgent request in flight: min over running requests of (time left to its
    # deadline) / (its predicted remaining work at max clock) - the largest slowdown it can absorb.
    slack_slowdown: float | None = None
    slo_attainment: float | None = None  # share of recently completed requests that met their SLO
    # Slots of all the GPUs the queue feeds (a shared queue pools them); None: just this GPU's.
    queue_slots: int | None = None

    def __post_init__(self) -> None:
        if self.depth < 0 or self.running < 0:
            raise ValueError(f"depth and running must be >= 0, got {self.depth}, {self.running}")
        if self.predicted_work_ms < 0 or self.oldest_wait_ms < 0:
            raise ValueError("predicted_work_ms and oldest_wait_ms must be >= 0")
        if self.slo_ms is not None and self.slo_ms <= 0:
            raise ValueError(f"slo_ms must be positive, got {self.slo_ms}")
        if self.arrivals_per_s < 0 or self.mean_exec_ms < 0:
            raise ValueError("arrivals_per_s and mean_exec_ms must be >= 0")
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.sensitivity is not None and not 0.0 <= self.sensitivity <= 1.0:
            raise ValueError(f"sensitivity must be in [0, 1], got {self.sensitivity}")
        if self.slo_scale is not None and self.slo_scale <= 0:
            raise ValueError(f"slo_scale must be positive, got {self.slo_scale}")
        if self.slack_slowdown is not None and math.isnan(self.slack_slowdown):
            raise ValueError("slack_slowdown is NaN")
        if self.slo_attainment is not None and not 0.0 <= self.slo_attainment <= 1.0:
            raise ValueError(f"slo_attainment must be in [0, 1], got {self.slo_attainment}")
        if self.queue_slots is not None and self.queue_slots < self.slots:
            raise ValueError(f"queue_slots ({self.queue_slots}) must be >= slots ({self.slots})")


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


def _clock_for_slowdown_mhz(max_slowdown: float, sensitivity: float, max_clock_mhz: int) -> float:
    """Lowest (continuous) clock whose slowdown s * fmax / f + 1 - s is <= max_slowdown; inf if none."""
    if max_slowdown < 1.0:
        return math.inf  # even the max clock is too slow
    if sensitivity <= 0.0:
        return 0.0  # latency does not depend on the clock at all
    return sensitivity * max_clock_mhz / (max_slowdown - 1.0 + sensitivity)


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (c = servers, load in Erlangs)."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    if offered_load <= 0.0:
        return 0.0
    if offered_load >= servers:
        return 1.0
    # Erlang B by its recursion (stable for thousands of servers), then C from B.
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_load * b / (k + offered_load * b)
    return servers * b / (servers - offered_load * (1.0 - b))


@functools.lru_cache(maxsize=256)
def max_offered_load(servers: int, wait_probability: float) -> float:
    """Largest offered load (Erlangs) at which erlang_c(servers, load) <= wait_probability."""
    lo, hi = 0.0, float(servers)
    for _ in range(50):
        mid = (lo + hi) / 2.0
        if erlang_c(servers, mid) <= wait_probability:
            lo = mid
        else:
            hi = mid
    return lo


class SloAwarePolicy(ClockPolicy):
    """µ-Serve's frequency policy: the lowest clock at which the predicted work still meets the SLO.

    With s the models' sensitivity and sd(f) = s * fmax / f + (1 - s) the slowdown at clock f, a clock
    meets the SLO when, with every budget divided by (1 + margin):
      1. stretch: one request alone, slowed by sd(f), fits its SLO (sd <= slo_scale, or
         sd * mean_exec_ms <= slo_ms) - what binds at low load;
      2. backlog: oldest_wait_ms + sd * predicted_work_ms / slots (the work queued and running now,
         drained `slots` at a time) fits the SLO of a typical request (slo_ms, or slo_scale * mean_exec_ms);
      3. load: at the slower clock an arriving request still finds a free slot with probability
         >= 1 - max_wait_probability (Erlang C with the queue's slots as servers and offered load
         arrivals * mean_exec_ms * sd), so a queue does not build up behind a slow clock at all;
      4. slack: the most urgent request in flight still makes its deadline (sd <= slack_slowdown), which
         feeds back whatever the model above misses (prefill stalls, mispredicted lengths).
    The policy picks the lowest supported clock meeting all four. Going up is immediate; if the backlog
    or slack rule fails at the current clock even without the margin (SLO at risk), or no clock meets
    the SLO, it goes straight to the max clock. Every move lands on the clock whose slowdown is within
    the allowed one divided by (1 + hysteresis), so inputs must change by more than that band to move
    it again; going down also waits min_dwell_s after the last change. Feedback closes the loop: while
    the recent SLO attainment is below target_attainment a clock floor rises (integral control,
    floor_gain_per_s per unit of attainment error) and it sinks again while attainment is above, on a
    grid of 1/20 of the max clock. Without any SLO there is nothing to trade latency against, so it
    stays at the max clock.
    """

    name = "slo-aware"

    def __init__(
        self,
        sensitivity: float = 0.6,
        slo_ms: float | None = None,
        slo_scale: float | None = None,
        margin: float = 0.25,
        hysteresis: float = 0.1,
        max_wait_probability: float = 0.1,
        min_dwell_s: float = 2.0,
        min_clock_mhz: int | None = None,
        target_attainment: float | None = 0.995,
        floor_gain_per_s: float = 0.5,
    ) -> None:
        if not 0.0 <= sensitivity <= 1.0:
            raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity}")
        if slo_ms is not None and slo_ms <= 0:
            raise ValueError(f"slo_ms must be positive, got {slo_ms}")
        if slo_scale is not None and slo_scale <= 0:
            raise ValueError(f"slo_scale must be positive, got {slo_scale}")
        if margin < 0 or hysteresis < 0:
            raise ValueError(f"margin and hysteresis must be >= 0, got {margin}, {hysteresis}")
        if not 0.0 < max_wait_probability < 1.0:
            raise ValueError(f"max_wait_probability must be in (0, 1), got {max_wait_probability}")
        if min_dwell_s < 0:
            raise ValueError(f"min_dwell_s must be >= 0, got {min_dwell_s}")
        if min_clock_mhz is not None and min_clock_mhz <= 0:
            raise ValueError(f"min_clock_mhz must be positive, got {min_clock_mhz}")
        if target_attainment is not None and not 0.0 < target_attainment <= 1.0:
            raise ValueError(f"target_attainment must be in (0, 1], got {target_attainment}")
        if floor_gain_per_s < 0:
            raise ValueError(f"floor_gain_per_s must be >= 0, got {floor_gain_per_s}")
        self.sensitivity = sensitivity
        self.slo_ms = slo_ms
        self.slo_scale = slo_scale
        self.margin = margin
        self.hysteresis = hysteresis
        self.max_wait_probability = max_wait_probability
        self.min_dwell_s = min_dwell_s
        self.min_clock_mhz = min_clock_mhz
        self.target_attainment = target_attainment
        self.floor_gain_per_s = floor_gain_per_s
        self._floor = 0.0  # feedback floor as a fraction of the max clock
        self._floor_at_s: float | None = None
        self._current_mhz: int | None = None
        self._changed_at_s = 0.0
        self._clocks_src: list[int] = []
        self._ascending: list[int] = []
        self._clock_set: frozenset[int] = frozenset()

    @property
    def current_clock_mhz(self) -> int | None:
        """The clock chosen last, or None before the first decision."""
        return self._current_mhz

    @property
    def floor_fraction(self) -> float:
        """The attainment feedback's clock floor, as a fraction of the max clock."""
        return self._floor

    def _update_floor(self, attainment: float | None, now_s: float, at_max: bool) -> None:
        """Integral control: the floor moves by gain x (target - attainment) per second, within [0, 1].

        Anti-windup: while the clock is already at max it cannot rise, and misses then are not the
        clock's doing (a burst beyond capacity), so the floor does not wind up on them; otherwise it
        would hold the clock at max long after the burst, until they leave the attainment window.
        """
        last, self._floor_at_s = self._floor_at_s, now_s
        if attainment is None or self.target_attainment is None or last is None:
            return
        dt = min(max(now_s - last, 0.0), 5.0)
        step = self.floor_gain_per_s * (self.target_attainment - attainment) * dt
        if step > 0 and at_max:
            return
        self._floor = min(max(self._floor + step, 0.0), 1.0)

    def max_slowdowns(
        self, snapshot: QueueSnapshot, margin: float, wait_probability: float
    ) -> tuple[float, float]:
        """(largest slowdown all rules allow, largest the backlog and slack rules allow); inf = no bound."""
        slo_ms = snapshot.slo_ms if snapshot.slo_ms is not None else self.slo_ms
        scale = snapshot.slo_scale if snapshot.slo_scale is not None else self.slo_scale
        in_system = snapshot.depth + snapshot.running
        mean_exec_ms = snapshot.mean_exec_ms
        if mean_exec_ms <= 0.0 and in_system > 0:
            mean_exec_ms = snapshot.predicted_work_ms / in_system
        keep = 1.0 / (1.0 + margin)
        bound = math.inf
        budgets_ms: list[float] = []
        # 1. stretch of one request on its own.
        if scale is not None:
            bound = min(bound, keep * scale)
            if mean_exec_ms > 0.0:
                budgets_ms.append(scale * mean_exec_ms)
        if slo_ms is not None:
            budgets_ms.append(slo_ms)
            if mean_exec_ms > 0.0:
                bound = min(bound, keep * slo_ms / mean_exec_ms)
        # 2. backlog: what is queued and running now, drained `slots` requests at a time.
        urgent = math.inf
        if snapshot.predicted_work_ms > 0.0 and budgets_ms:
            drain_ms = snapshot.predicted_work_ms / snapshot.slots
            urgent = (keep * min(budgets_ms) - snapshot.oldest_wait_ms) / drain_ms
        # 3. load: at the slower clock an arrival must still find a free slot (Erlang C). A queue shared
        # by several GPUs pools their slots: c = queue_slots servers carrying this GPU's share scaled up.
        if snapshot.arrivals_per_s > 0.0 and mean_exec_ms > 0.0:
            servers = snapshot.queue_slots or snapshot.slots
            offered = snapshot.arrivals_per_s * mean_exec_ms / 1000.0 * servers / snapshot.slots
            bound = min(bound, max_offered_load(servers, wait_probability) / offered)
        # 4. slack: the most urgent request in flight must still make its deadline.
        if snapshot.slack_slowdown is not None:
            urgent = min(urgent, keep * snapshot.slack_slowdown)
        return min(bound, urgent), urgent

    def _refresh(self, supported_clocks_mhz: list[int]) -> None:
        """Cache the clock list sorted ascending and as a set (re-done only when the list changes)."""
        if supported_clocks_mhz != self._clocks_src:
            if not supported_clocks_mhz:
                raise ValueError("supported_clocks_mhz is empty")
            self._clocks_src = list(supported_clocks_mhz)
            self._ascending = sorted(set(supported_clocks_mhz))
            self._clock_set = frozenset(supported_clocks_mhz)

    def _snap(self, target_mhz: float) -> int:
        """Lowest cached supported clock >= target, clamped to the max (bisect)."""
        ascending = self._ascending
        if not target_mhz < ascending[-1]:  # also NaN
            return ascending[-1]
        if target_mhz <= ascending[0]:
            return ascending[0]
        # Clocks are integers: bisecting on the integer ceiling avoids slow int-vs-float compares.
        return ascending[bisect.bisect_left(ascending, math.ceil(target_mhz))]

    def _lowest_clock_mhz(self, max_slowdown: float, sensitivity: float, max_mhz: int) -> int:
        """Lowest supported clock (not below min_clock_mhz) within max_slowdown; max when none is."""
        target = _clock_for_slowdown_mhz(max_slowdown, sensitivity, max_mhz)
        if math.isinf(target):
            return max_mhz
        if self.min_clock_mhz is not None:
            target = max(target, float(self.min_clock_mhz))
        return self._snap(target)

    def choose_clock_mhz(self, snapshot: QueueSnapshot, supported_clocks_mhz: list[int], now_s: float) -> int:
        """Apply the four rules, risk, hysteresis and dwell; remembers the choice."""
        self._refresh(supported_clocks_mhz)
        max_mhz = self._ascending[-1]
        s = snapshot.sensitivity if snapshot.sensitivity is not None else self.sensitivity
        current = self._current_mhz
        if current is not None and current not in self._clock_set:
            # The clock list changed under us (another GPU model): keep an equivalent valid clock.
            current = self._current_mhz = self._snap(current)
        if (
            snapshot.slo_ms is None
            and self.slo_ms is None
            and snapshot.slo_scale is None
            and self.slo_scale is None
        ):
            wanted = max_mhz  # no SLO to trade against
        else:
            self._update_floor(snapshot.slo_attainment, now_s, at_max=current == max_mhz)
            # On a coarse grid (1/20 of the max clock), so its slow drift does not move the clock each call.
            floor_mhz = (
                self._snap(math.ceil(self._floor * 20.0 - 1e-9) / 20.0 * max_mhz) if self._floor else 0
            )
            bound, urgent = self.max_slowdowns(snapshot, self.margin, self.max_wait_probability)
            need = max(self._lowest_clock_mhz(bound, s, max_mhz), floor_mhz)
            if current is not None and (
                bound < 1.0 or slowdown_factor(current, max_mhz, s) > urgent * (1.0 + self.margin)
            ):
                wanted = max_mhz  # SLO at risk: catch up as fast as the GPU can
            elif current is None or need > current or now_s - self._changed_at_s >= self.min_dwell_s:
                # Moves land inside the allowed slowdown by a (1 + hysteresis) band, so the next move
                # needs the inputs to change by more than the band. Up at once, down after the dwell.
                calm = max(self._lowest_clock_mhz(bound / (1.0 + self.hysteresis), s, max_mhz), need)
                wanted = calm if current is None or need > current or calm < current else current
            else:
                wanted = current
        if wanted != current:
            self._current_mhz = wanted
            self._changed_at_s = now_s
        return wanted

    def reset(self) -> None:
        """Forget history, e.g. after the GPU's clocks were reset behind the policy's back."""
        self._current_mhz = None
        self._changed_at_s = 0.0
        self._floor = 0.0
        self._floor_at_s = None

    def __repr__(self) -> str:
        return (
            f"SloAwarePolicy(sensitivity={self.sensitivity}, slo_ms={self.slo_ms}, "
            f"slo_scale={self.slo_scale}, "
            f"margin={self.margin}, hysteresis={self.hysteresis}, "
            f"max_wait_probability={self.max_wait_probability}, "
            f"min_dwell_s={self.min_dwell_s}, min_clock_mhz={self.min_clock_mhz}, "
            f"target_attainment={self.target_attainment}, floor_gain_per_s={self.floor_gain_per_s})"
        )


class PolicyKind(StrEnum):
    """Names accepted by make_clock_policy (and by configuration)."""

    MAX_CLOCK = "max-clock"
    QUEUE_THRESHOLD = "queue-threshold"
    SLO_AWARE = "slo-aware"


_POLICY_CONSTRUCTORS: dict[PolicyKind, Callable[..., ClockPolicy]] = {
    PolicyKind.MAX_CLOCK: MaxClockPolicy,
    PolicyKind.QUEUE_THRESHOLD: QueueThresholdPolicy,
    PolicyKind.SLO_AWARE: SloAwarePolicy,
}


def make_clock_policy(kind: str | PolicyKind, **kwargs: Any) -> ClockPolicy:
    """Build a policy by name ("max-clock", "queue-threshold", "slo-aware"; "_" for "-") with kwargs."""
    if isinstance(kind, PolicyKind):
        resolved = kind
    else:
        try:
            resolved = PolicyKind(kind.strip().lower().replace("_", "-"))
        except ValueError:
            valid = ", ".join(k.value for k in PolicyKind)
            raise ValueError(f"unknown clock policy {kind!r}; choose one of: {valid}") from None
    return _POLICY_CONSTRUCTORS[resolved](**kwargs)
