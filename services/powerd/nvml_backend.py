"""NVML backend: a real NVIDIA GPU through nvidia-ml-py (`import pynvml`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from services.powerd.gpu import (
    GpuBackend,
    GpuError,
    GpuInvalidArgumentError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuUnknownError,
)

__all__ = ["NvmlBackend", "map_nvml_error", "nvml_device_count"]

T = TypeVar("T")


def _codes(*names: str) -> frozenset[int]:
    """NVML error codes by constant name, skipping names an older nvidia-ml-py lacks."""
    return frozenset(getattr(pynvml, n) for n in names if hasattr(pynvml, n))


_ERROR_CLASSES: tuple[tuple[frozenset[int], type[GpuError]], ...] = (
    (
        _codes(
            "NVML_ERROR_LIBRARY_NOT_FOUND",
            "NVML_ERROR_DRIVER_NOT_LOADED",
            "NVML_ERROR_NOT_FOUND",
            "NVML_ERROR_GPU_NOT_FOUND",
            "NVML_ERROR_GPU_IS_LOST",
            "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
        ),
        GpuNotFoundError,
    ),
    (_codes("NVML_ERROR_NO_PERMISSION", "NVML_ERROR_OPERATING_SYSTEM"), GpuPermissionError),
    (
        _codes(
            "NVML_ERROR_NOT_SUPPORTED",
            "NVML_ERROR_FUNCTION_NOT_FOUND",
            "NVML_ERROR_RESET_TYPE_NOT_SUPPORTED",
            "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
        ),
        GpuNotSupportedError,
    ),
    (_codes("NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_FREQ_NOT_SUPPORTED"), GpuInvalidArgumentError),
)


def map_nvml_error(exc: pynvml.NVMLError, what: str) -> GpuError:
    """Translate an NVMLError into the matching typed GpuError (raise it `from exc`)."""
    code = int(getattr(exc, "value", -1))
    cls: type[GpuError] = GpuUnknownError
    for codes, candidate in _ERROR_CLASSES:
        if code in codes:
            cls = candidate
            break
    return cls(f"{what}: {exc} (NVML error {code})")


# One nvmlInit per process, shared by every backend: NVML state is process-wide, and a shutdown
# by one backend must not pull the library from under another.
_init_lock = threading.Lock()
_init_refcount = 0


def _nvml_acquire() -> None:
    """Initialise NVML on first use in this process."""
    global _init_refcount
    with _init_lock:
        if _init_refcount == 0:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise map_nvml_error(exc, "nvmlInit") from exc
        _init_refcount += 1


def _nvml_release() -> None:
    """Shut NVML down when the last user lets go."""
    global _init_refcount
    with _init_lock:
        if _init_refcount == 0:
            return
        _init_refcount -= 1
        if _init_refcount == 0:
            with contextlib.suppress(pynvml.NVMLError):  # nothing useful to do about a failed shutdown
                pynvml.nvmlShutdown()


def _nvml_users() -> int:
    """How many holders keep NVML initialised (for tests and diagnostics)."""
    return _init_refcount


def _nvml_force_shutdown() -> None:
    """Shut NVML down whatever the count, so one test's leak cannot reach the next."""
    global _init_refcount
    with _init_lock:
        if _init_refcount > 0:
            _init_refcount = 0
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


def nvml_device_count() -> int:
    """Number of NVML devices; 0 when there is no library, driver or device."""
    try:
        _nvml_acquire()
    except GpuError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return 0
    finally:
        _nvml_release()


class NvmlBackend(GpuBackend):
    """An NVIDIA GPU driven through NVML."""

    def __init__(self, index: int = 0) -> None:
        super().__init__(index, name="")
        _nvml_acquire()
        self._closed = False
        try:
            count = int(self._call(pynvml.nvmlDeviceGetCount))
            if not 0 <= index < count:
                raise GpuNotFoundError(f"GPU index {index} not found: NVML reports {count} device(s)")
            self._handle: Any = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
            raw_name: str | bytes = self._call(pynvml.nvmlDeviceGetName, self._handle)
            self.name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            # Graphics clocks depend on the memory clock; powerd runs memory at its maximum.
            mem_clocks = self._call(pynvml.nvmlDeviceGetSupportedMemoryClocks, self._handle)
            if not mem_clocks:
                raise GpuNotSupportedError(f"GPU {index}: NVML lists no supported memory clocks")
            self.memory_clock_mhz = int(max(mem_clocks))
            gfx_clocks = self._call(
                pynvml.nvmlDeviceGetSupportedGraphicsClocks,
                self._handle,
                self.memory_clock_mhz,
            )
            if not gfx_clocks:
                raise GpuNotSupportedError(f"GPU {index}: NVML lists no supported graphics clocks")
            self._clocks_mhz = sorted({int(c) for c in gfx_clocks}, reverse=True)
            self._uuid: str | None = None
            with contextlib.suppress(GpuError):  # only a label: an old driver without it is fine
                raw_uuid: str | bytes = self._call(pynvml.nvmlDeviceGetUUID, self._handle)
                self._uuid = raw_uuid.decode() if isinstance(raw_uuid, bytes) else str(raw_uuid)
        except BaseException:
            self._closed = True
            _nvml_release()
            raise

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call pynvml and turn NVMLError into a typed GpuError with the original as __cause__."""
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            raise map_nvml_error(exc, f"{getattr(fn, '__name__', 'NVML')} on GPU {self.index}") from exc

    def _check_open(self) -> None:
        """Refuse calls after close(): NVML may already be shut down."""
        if self._closed:
            raise GpuError(f"GPU {self.index}: backend is closed")

    @property
    def uuid(self) -> str | None:
        """nvmlDeviceGetUUID, read once at construction (None if the driver lacks it)."""
        return self._uuid

    def supported_clocks_mhz(self) -> list[int]:
        """Graphics clocks at the max memory clock, descending (read once at construction)."""
        return list(self._clocks_mhz)

    def current_clock_mhz(self) -> int:
        """nvmlDeviceGetClockInfo(GRAPHICS)."""
        self._check_open()
        clock = self._call(pynvml.nvmlDeviceGetClockInfo, self._handle, pynvml.NVML_CLOCK_GRAPHICS)
        return int(clock)

    def _apply_locked_clocks_mhz(self, min_mhz: int, max_mhz: int) -> None:
        """nvmlDeviceSetGpuLockedClocks (needs root)."""
        self._check_open()
        self._call(pynvml.nvmlDeviceSetGpuLockedClocks, self._handle, min_mhz, max_mhz)

    def reset_clocks(self) -> None:
        """nvmlDeviceResetGpuLockedClocks (needs root)."""
        self._check_open()
        self._call(pynvml.nvmlDeviceResetGpuLockedClocks, self._handle)

    def power_w(self) -> float:
        """nvmlDeviceGetPowerUsage, mW -> W."""
        self._check_open()
        return float(self._call(pynvml.nvmlDeviceGetPowerUsage, self._handle)) / 1e3

    def total_energy_j(self) -> float:
        """nvmlDeviceGetTotalEnergyConsumption, mJ -> J (Volta and newer)."""
        self._check_open()
        energy_mj = self._call(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)
        return float(energy_mj) / 1e3

    def utilization(self) -> float:
        """nvmlDeviceGetUtilizationRates().gpu, percent -> fraction."""
        self._check_open()
        rates = self._call(pynvml.nvmlDeviceGetUtilizationRates, self._handle)
        return float(rates.gpu) / 100.0

    def close(self) -> None:
        """Drop this backend's share of NVML; idempotent. Clocks are not reset here (powerd does that)."""
        if not self._closed:
            self._closed = True
            _nvml_release()
