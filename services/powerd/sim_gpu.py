"""Simulated GPU: clock range and power from public spec sheets, latency from the µ-Serve model."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from services.powerd.gpu import GpuBackend, GpuInvalidArgumentError, slowdown_factor

__all__ = ["DEFAULT_POWER_EXPONENT", "PROFILES", "GpuProfile", "SimulatedGpu", "get_profile"]

# P(f, u) = idle + (max - idle) * u * (f / fmax) ** alpha.
# Dynamic power is ~ C * V^2 * f, and in the DVFS range the driver lowers V together with f, so the
# ideal exponent is ~3; leakage and the voltage floor at the bottom of the range pull it down.
# 2.5 sits in the 2..3 band and reproduces what µ-Serve (Qiu et al., ATC'24, sec. 2) and Zeus
# (You et al., NSDI'23) observe: lowering the SM clock saves power superlinearly while latency
# grows at most linearly (t(f) = t(fmax) * (s * fmax / f + 1 - s)).
DEFAULT_POWER_EXPONENT = 2.5


@dataclass(frozen=True)
class GpuProfile:
    """Published characteristics of one GPU model (what the simulated GPU is built from)."""

    name: str
    min_clock_mhz: int
    max_clock_mhz: int
    clock_step_mhz: float  # NVML lists min + floor(i * step) up to max
    idle_power_w: float
    max_power_w: float  # TDP: board power at full load and max clock
    memory_bandwidth_gbps: float  # GB/s
    peak_tflops_bf16: float  # dense 16-bit tensor peak (fp16 on V100, which has no bf16)
    power_exponent: float = DEFAULT_POWER_EXPONENT

    def __post_init__(self) -> None:
        if not 0 < self.min_clock_mhz < self.max_clock_mhz:
            raise ValueError(f"{self.name}: need 0 < min_clock_mhz < max_clock_mhz")
        steps = (self.max_clock_mhz - self.min_clock_mhz) / self.clock_step_mhz
        if self.clock_step_mhz <= 0 or abs(steps - round(steps)) > 1e-6:
            raise ValueError(f"{self.name}: clock range is not whole {self.clock_step_mhz} MHz steps")
        if not 0 <= self.idle_power_w < self.max_power_w:
            raise ValueError(f"{self.name}: need 0 <= idle_power_w < max_power_w")
        if self.power_exponent <= 0:
            raise ValueError(f"{self.name}: power_exponent must be positive")

    def supported_clocks_mhz(self) -> list[int]:
        """Graphics clocks in MHz, descending, as NVML would list them."""
        n_steps = round((self.max_clock_mhz - self.min_clock_mhz) / self.clock_step_mhz)
        # The epsilon keeps 7.5 * 2 = 15.0 from flooring to 14 through float error.
        clocks = [self.min_clock_mhz + math.floor(i * self.clock_step_mhz + 1e-9) for i in range(n_steps + 1)]
        return sorted(set(clocks), reverse=True)

    def power_at(self, clock_mhz: float, utilization: float) -> float:
        """Board power in watts at a graphics clock and utilization (0..1)."""
        if not 0.0 <= utilization <= 1.0:
            raise ValueError(f"utilization must be in [0, 1], got {utilization}")
        if clock_mhz <= 0:
            raise ValueError(f"clock_mhz must be positive, got {clock_mhz}")
        scale = math.pow(clock_mhz / self.max_clock_mhz, self.power_exponent)
        return self.idle_power_w + utilization * (self.max_power_w - self.idle_power_w) * scale


_PROFILE_LIST = (
    # NVIDIA Tesla V100 SXM2 16GB. Clocks: `nvidia-smi -q -d SUPPORTED_CLOCKS` at memory 877 MHz lists
    # 1530..135 MHz in alternating 7/8 MHz steps. V100 datasheet (2018): 300 W, 900 GB/s HBM2,
    # 125 TFLOPS tensor (fp16). Idle ~40 W: typical nvidia-smi reading of an idle SXM2 board.
    GpuProfile(
        name="V100-SXM2-16GB",
        min_clock_mhz=135,
        max_clock_mhz=1530,
        clock_step_mhz=7.5,
        idle_power_w=40.0,
        max_power_w=300.0,
        memory_bandwidth_gbps=900.0,
        peak_tflops_bf16=125.0,
    ),
    # NVIDIA A100 SXM4 40GB. Clocks 1410..210 MHz in 15 MHz steps (nvidia-smi at memory 1215 MHz).
    # A100 datasheet: 400 W, 1555 GB/s HBM2, 312 TFLOPS bf16 dense. Idle ~55 W (reported 50-60 W).
    GpuProfile(
        name="A100-SXM4-40GB",
        min_clock_mhz=210,
        max_clock_mhz=1410,
        clock_step_mhz=15.0,
        idle_power_w=55.0,
        max_power_w=400.0,
        memory_bandwidth_gbps=1555.0,
        peak_tflops_bf16=312.0,
    ),
    # NVIDIA H100 SXM5 80GB. Clocks 1980..345 MHz in 15 MHz steps. H100 datasheet: up to 700 W,
    # 3.35 TB/s HBM3, 1979 TFLOPS bf16 with sparsity = ~989 dense. Idle ~75 W (reported 70-90 W).
    GpuProfile(
        name="H100-SXM5-80GB",
        min_clock_mhz=345,
        max_clock_mhz=1980,
        clock_step_mhz=15.0,
        idle_power_w=75.0,
        max_power_w=700.0,
        memory_bandwidth_gbps=3350.0,
        peak_tflops_bf16=989.0,
    ),
)

PROFILES: Mapping[str, GpuProfile] = MappingProxyType({p.name.split("-")[0]: p for p in _PROFILE_LIST})


def get_profile(name: str) -> GpuProfile:
    """Look a profile up by key ("V100") or full name ("v100-sxm2-16gb"), case-insensitively."""
    wanted = name.strip().lower()
    for key, profile in PROFILES.items():
        if wanted in (key.lower(), profile.name.lower()):
            return profile
    raise ValueError(f"unknown GPU profile {name!r}; choose one of: {', '.join(PROFILES)}")


class SimulatedGpu(GpuBackend):
    """A GPU that exists only as a model: clocks, power and energy follow its GpuProfile."""

    def __init__(
        self,
        profile: GpuProfile | str = "V100",
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        # The name says "simulated" so every figure that comes from here is labelled as such.
        super().__init__(index, f"{self.profile.name} (simulated)")
        self._clock = clock
        self._clocks_mhz = self.profile.supported_clocks_mhz()
        self._lock = threading.Lock()
        self._current_mhz = self.profile.max_clock_mhz
        self._locked_mhz: tuple[int, int] | None = None
        self._utilization = 0.0
        self._energy_j = 0.0
        self._last_s = clock()

    @property
    def simulated(self) -> bool:
        """Always True."""
        return True

    @property
    def locked_clocks_mhz(self) -> tuple[int, int] | None:
        """The (min, max) lock in force, or None after a reset."""
        return self._locked_mhz

    def supported_clocks_mhz(self) -> list[int]:
        """Profile clocks, descending."""
        return list(self._clocks_mhz)

    def current_clock_mhz(self) -> int:
        """Current graphics clock."""
        return self._current_mhz

    def _integrate(self) -> None:
        """Add the energy of the segment since the last state change (power was constant in it)."""
        now_s = self._clock()
        # A clock that steps backwards must not make energy decrease.
        elapsed_s = max(0.0, now_s - self._last_s)
        self._energy_j += self.profile.power_at(self._current_mhz, self._utilization) * elapsed_s
        self._last_s = max(now_s, self._last_s)

    def _apply_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """Integrate up to now, then run at the top of the locked range (a busy GPU boosts to it)."""
        with self._lock:
            self._integrate()
            self._locked_mhz = (min_mhz, max_mhz)
            self._current_mhz = max_mhz

    def reset_clocks(self) -> None:
        """Back to the unlocked state: max clock."""
        with self._lock:
            self._integrate()
            self._locked_mhz = None
            self._current_mhz = self.profile.max_clock_mhz

    def set_utilization(self, utilization: float) -> None:
        """Tell the GPU how busy the workload keeps it (0..1); power follows from now on."""
        if not 0.0 <= utilization <= 1.0:
            raise GpuInvalidArgumentError(f"utilization must be in [0, 1], got {utilization}")
        with self._lock:
            self._integrate()
            self._utilization = float(utilization)

    def utilization(self) -> float:
        """Utilization last set by the workload."""
        return self._utilization

    def power_w(self) -> float:
        """Modelled board power now."""
        return self.profile.power_at(self._current_mhz, self._utilization)

    def power_at(self, clock_mhz: float, utilization: float) -> float:
        """Modelled power at any clock and utilization (pure; does not change the GPU)."""
        return self.profile.power_at(clock_mhz, utilization)

    def total_energy_j(self) -> float:
        """Exact integral of modelled power since creation."""
        with self._lock:
            self._integrate()
            return self._energy_j

    def slowdown(self, sensitivity: float) -> float:
        """Latency multiplier at the current clock vs max: s * fmax / f + (1 - s)."""
        return slowdown_factor(self._current_mhz, self.profile.max_clock_mhz, sensitivity)
