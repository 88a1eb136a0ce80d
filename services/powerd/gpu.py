"""GPU abstraction for powerd: one interface, an NVML backend for real nodes and a simulated one."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Self

__all__ = [
    "GPU_BACKENDS",
    "GpuBackend",
    "GpuError",
    "GpuInvalidArgumentError",
    "GpuNotFoundError",
    "GpuNotSupportedError",
    "GpuPermissionError",
    "GpuUnknownError",
    "make_gpu",
    "slowdown_factor",
    "snap_to_supported_clock_mhz",
]


class GpuError(Exception):
    """Base class of every GPU backend error."""


class GpuNotFoundError(GpuError):
    """No driver, no NVML library, or no device at the requested index."""


class GpuPermissionError(GpuError):
    """The call needs more privileges (locking clocks needs root or a granted capability)."""


class GpuNotSupportedError(GpuError):
    """The device or driver does not support the call."""


class GpuInvalidArgumentError(GpuError):
    """An argument was refused, e.g. a clock outside the supported set."""


class GpuUnknownError(GpuError):
    """Any other GPU failure."""


def snap_to_supported_clock_mhz(target_mhz: float, supported_clocks_mhz: Sequence[int]) -> int:
    """Return the lowest supported clock >= target_mhz, clamped to the highest supported clock."""
    if not supported_clocks_mhz:
        raise ValueError("supported_clocks_mhz is empty")
    if math.isnan(target_mhz):
        raise ValueError("target_mhz is NaN")
    # Rounding up, never down: a policy asking for f gets at least f, so its latency estimate holds.
    at_or_above = [c for c in supported_clocks_mhz if c >= target_mhz]
    return min(at_or_above) if at_or_above else max(supported_clocks_mhz)


def slowdown_factor(clock_mhz: float, max_clock_mhz: float, sensitivity: float) -> float:
    """µ-Serve latency model: t(f) / t(fmax) = s * fmax / f + (1 - s)."""
    if not 0.0 <= sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity}")
    if clock_mhz <= 0 or max_clock_mhz <= 0:
        raise ValueError(f"clocks must be positive, got clock_mhz={clock_mhz}, max_clock_mhz={max_clock_mhz}")
    return sensitivity * max_clock_mhz / clock_mhz + (1.0 - sensitivity)


class GpuBackend(ABC):
    """One GPU whose graphics clock powerd can read, lock and reset."""

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name

    @property
    def simulated(self) -> bool:
        """True when every figure this GPU reports comes from a model, not hardware."""
        return False

    @property
    def uuid(self) -> str | None:
        """The device's UUID ("GPU-..."), when the backend knows one."""
        return None

    @abstractmethod
    def supported_clocks_mhz(self) -> list[int]:
        """Supported graphics clocks in MHz, descending (as NVML lists them)."""

    @property
    def max_clock_mhz(self) -> int:
        """Highest supported graphics clock."""
        return max(self.supported_clocks_mhz())

    @property
    def min_clock_mhz(self) -> int:
        """Lowest supported graphics clock."""
        return min(self.supported_clocks_mhz())

    @abstractmethod
    def current_clock_mhz(self) -> int:
        """Graphics clock right now."""

    def set_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """Lock the graphics clock into [min_mhz, max_mhz]; both must be supported clocks."""
        self.validate_locked_clocks_mhz(min_mhz, max_mhz)
        self._apply_locked_clocks_mhz(int(min_mhz), int(max_mhz))

    def validate_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """Raise GpuInvalidArgumentError unless [min_mhz, max_mhz] is a lock this GPU accepts (no I/O)."""
        supported = set(self.supported_clocks_mhz())
        # Validate here, before any device call, so a bad policy output never reaches the driver.
        for label, value in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
            if isinstance(value, bool) or value not in supported:
                raise GpuInvalidArgumentError(
                    f"GPU {self.index}: {label}={value!r} is not a supported clock "
                    f"({min(supported)}..{max(supported)} MHz; use nearest_supported_clock_mhz)"
                )
        if min_mhz > max_mhz:
            raise GpuInvalidArgumentError(f"GPU {self.index}: min_mhz={min_mhz} > max_mhz={max_mhz}")

    @abstractmethod
    def _apply_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """Lock clocks on the device; arguments are already validated."""

    @abstractmethod
    def reset_clocks(self) -> None:
        """Undo any clock lock (the driver manages clocks again)."""

    @abstractmethod
    def power_w(self) -> float:
        """Board power draw now, in watts."""

    @abstractmethod
    def total_energy_j(self) -> float:
        """Energy in joules since driver load (NVML) or creation (simulated); monotonic."""

    @abstractmethod
    def utilization(self) -> float:
        """Fraction of recent time the GPU was busy, 0..1."""

    def nearest_supported_clock_mhz(self, target_mhz: float) -> int:
        """Lowest supported clock >= target_mhz, clamped to the maximum."""
        try:
            return snap_to_supported_clock_mhz(target_mhz, self.supported_clocks_mhz())
        except ValueError as exc:
            raise GpuInvalidArgumentError(f"GPU {self.index}: {exc}") from exc

    def close(self) -> None:  # noqa: B027 (optional hook: a simulated GPU holds nothing)
        """Release backend resources; clocks are left as they are."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, name={self.name!r})"


GPU_BACKENDS = ("auto", "nvml", "sim")


def make_gpu(backend: str = "auto", index: int = 0, profile: str = "V100") -> GpuBackend:
    """Build a GPU backend: "nvml", "sim", or "auto" (nvml when device `index` exists, else sim)."""
    # Imported here: both modules import this one, and NVML should not load unless asked for.
    from services.powerd.nvml_backend import NvmlBackend, nvml_device_count
    from services.powerd.sim_gpu import SimulatedGpu, get_profile

    kind = backend.strip().lower()
    if kind not in GPU_BACKENDS:
        raise ValueError(f"unknown GPU backend {backend!r}; choose one of: {', '.join(GPU_BACKENDS)}")
    if index < 0:
        raise ValueError(f"GPU index must be >= 0, got {index}")
    # Check the profile even when auto picks NVML, so a typo fails on every machine alike.
    sim_profile = get_profile(profile) if kind != "nvml" else None
    if kind == "auto":
        kind = "nvml" if nvml_device_count() > index else "sim"
    if kind == "nvml" or sim_profile is None:
        return NvmlBackend(index)
    return SimulatedGpu(sim_profile, index=index)
