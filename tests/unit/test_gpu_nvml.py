"""NvmlBackend against the fake libnvidia-ml.so.1, through the real, unpatched nvidia-ml-py."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pynvml
import pytest

from services.powerd import nvml_backend
from services.powerd.gpu import (
    GpuError,
    GpuInvalidArgumentError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuPermissionError,
    GpuUnknownError,
    make_gpu,
)
from services.powerd.nvml_backend import NvmlBackend, map_nvml_error, nvml_device_count
from services.powerd.sim_gpu import PROFILES, SimulatedGpu
from tests.fakenvml import FakeNvml, clean_env, fake_nvml, fake_nvml_dir, read_fake_nvml_state

# Imported fixtures are used by name as arguments; keep them listed so linters keep the import.
__all__ = ["fake_nvml", "fake_nvml_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter that imports this checkout."""
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_identity_and_supported_clocks(fake_nvml: FakeNvml) -> None:
    with NvmlBackend(0) as gpu:
        assert gpu.name == "Tesla V100-SXM2-16GB"
        assert gpu.simulated is False
        assert gpu.memory_clock_mhz == 877
        clocks = gpu.supported_clocks_mhz()
        assert clocks == sorted(clocks, reverse=True)
        assert (gpu.max_clock_mhz, gpu.min_clock_mhz, len(clocks)) == (1530, 135, 187)
        # The simulated V100 lists exactly what the (fake) driver lists.
        assert clocks == PROFILES["V100"].supported_clocks_mhz()


def test_set_and_reset_reach_the_device(fake_nvml: FakeNvml) -> None:
    with NvmlBackend() as gpu:
        assert gpu.current_clock_mhz() == 1530
        assert fake_nvml.state() == {}
        gpu.set_locked_clocks_mhz(1005, 1005)
        assert gpu.current_clock_mhz() == 1005
        assert fake_nvml.state() == {0: (1005, 1005)}
        gpu.set_locked_clocks_mhz(135, 1200)
        assert gpu.current_clock_mhz() == 1200
        assert fake_nvml.state() == {0: (135, 1200)}
        gpu.reset_clocks()
        assert gpu.current_clock_mhz() == 1530
        assert fake_nvml.state() == {0: None}


def test_power_in_watts_matches_the_v100_model(fake_nvml: FakeNvml) -> None:
    with NvmlBackend() as gpu:
        assert gpu.utilization() == 1.0  # the fake's default: busy
        assert gpu.power_w() == pytest.approx(300.0)
        gpu.set_locked_clocks_mhz(1005, 1005)
        # mW from the driver, W from us: same number as the simulated V100 to within 1 mW.
        assert gpu.power_w() == pytest.approx(PROFILES["V100"].power_at(1005, 1.0), abs=1e-3)
        gpu.reset_clocks()


def test_utilization_knob(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(util_percent=37)
    with NvmlBackend() as gpu:
        assert gpu.utilization() == pytest.approx(0.37)
        assert gpu.power_w() == pytest.approx(40.0 + 260.0 * 0.37, abs=1e-3)


def test_energy_in_joules_is_monotonic(fake_nvml: FakeNvml) -> None:
    with NvmlBackend() as gpu:
        t0 = time.monotonic()
        e0 = gpu.total_energy_j()
        t1 = time.monotonic()
        time.sleep(0.05)
        t2 = time.monotonic()
        e1 = gpu.total_energy_j()
        t3 = time.monotonic()
        # 300 W for the time between the two reads; both bracket the fake's own CLOCK_MONOTONIC.
        assert 300.0 * (t2 - t1) - 2e-3 <= e1 - e0 <= 300.0 * (t3 - t0) + 2e-3
        readings = [gpu.total_energy_j() for _ in range(50)]
        assert readings == sorted(readings) and readings[0] >= e1


def test_no_permission_maps_to_permission_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(no_permission=True)
    with NvmlBackend() as gpu:
        with pytest.raises(GpuPermissionError) as info:
            gpu.set_locked_clocks_mhz(1005, 1005)
        assert isinstance(info.value.__cause__, pynvml.NVMLError_NoPermission)
        assert "nvmlDeviceSetGpuLockedClocks" in str(info.value)
        with pytest.raises(GpuPermissionError):
            gpu.reset_clocks()
        assert gpu.current_clock_mhz() == 1530
    assert fake_nvml.state() == {}


def test_unsupported_clock_is_refused_before_the_driver_call(fake_nvml: FakeNvml) -> None:
    # With no permission the driver would answer NO_PERMISSION, so an InvalidArgument here proves
    # the backend refused on its own, without calling NVML.
    fake_nvml.configure(no_permission=True)
    with NvmlBackend() as gpu:
        for lo, hi in ((1000, 1000), (135, 1600), (1200, 1005)):
            with pytest.raises(GpuInvalidArgumentError) as info:
                gpu.set_locked_clocks_mhz(lo, hi)
            assert info.value.__cause__ is None
    assert not fake_nvml.state_file.exists()


def test_no_devices_and_bad_index_are_not_found(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(device_count=0)
    assert nvml_device_count() == 0
    with pytest.raises(GpuNotFoundError, match="0 device"):
        NvmlBackend(0)
    assert nvml_backend._nvml_users() == 0  # a failed constructor gives its NVML share back


def test_index_beyond_count_is_not_found(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(device_count=2)
    assert nvml_device_count() == 2
    for index in (2, 7, -1):
        with pytest.raises(GpuNotFoundError):
            NvmlBackend(index)
    with NvmlBackend(1) as gpu1, NvmlBackend(0) as gpu0:
        gpu1.set_locked_clocks_mhz(900, 900)
        assert (gpu0.current_clock_mhz(), gpu1.current_clock_mhz()) == (1530, 900)
        assert fake_nvml.state() == {0: None, 1: (900, 900)}
        gpu1.reset_clocks()


def test_library_without_driver_is_not_found(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(enabled=False)  # also what every later test sees: the fake stays loaded
    assert nvml_device_count() == 0
    with pytest.raises(GpuNotFoundError) as info:
        NvmlBackend()
    assert isinstance(info.value.__cause__, pynvml.NVMLError_DriverNotLoaded)
    assert isinstance(make_gpu("auto"), SimulatedGpu)


def test_make_gpu_auto_picks_nvml_when_a_device_exists(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(device_count=1)
    gpu = make_gpu("auto", 0, "A100")
    try:
        assert isinstance(gpu, NvmlBackend) and not gpu.simulated
    finally:
        gpu.close()
    fallback = make_gpu("auto", 1, "A100")  # no device 1 -> simulated
    assert isinstance(fallback, SimulatedGpu) and fallback.profile is PROFILES["A100"]
    with make_gpu("nvml", 0) as explicit:
        assert isinstance(explicit, NvmlBackend)


def test_make_gpu_auto_picks_sim_with_zero_devices(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(device_count=0)
    assert isinstance(make_gpu("auto", 0, "V100"), SimulatedGpu)
    with pytest.raises(GpuNotFoundError):
        make_gpu("nvml", 0)


def test_nvml_is_initialised_once_and_shut_down_by_the_last_user(fake_nvml: FakeNvml) -> None:
    a = NvmlBackend()
    b = NvmlBackend()
    assert nvml_backend._nvml_users() == 2
    a.close()
    a.close()  # idempotent
    assert nvml_backend._nvml_users() == 1
    assert b.power_w() > 0  # still initialised for b
    with pytest.raises(GpuError, match="closed"):
        a.power_w()
    b.close()
    assert nvml_backend._nvml_users() == 0
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()  # NVML really was shut down


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuNotFoundError),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuNotFoundError),
        (pynvml.NVML_ERROR_NOT_FOUND, GpuNotFoundError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuNotFoundError),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuPermissionError),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError),
        (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, GpuNotSupportedError),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, GpuInvalidArgumentError),
        (pynvml.NVML_ERROR_TIMEOUT, GpuUnknownError),
        (pynvml.NVML_ERROR_UNKNOWN, GpuUnknownError),
    ],
)
def test_nvml_error_mapping(code: int, expected: type[GpuError]) -> None:
    mapped = map_nvml_error(pynvml.NVMLError(code), "op")
    assert type(mapped) is expected
    assert f"NVML error {code}" in str(mapped) and str(mapped).startswith("op: ")


def test_child_process_sees_the_fake_via_ld_library_path(fake_nvml: FakeNvml) -> None:
    # What an integration test does with a service: LD_LIBRARY_PATH, then watch the state file.
    result = run_python(
        """
        from services.powerd.gpu import make_gpu
        gpu = make_gpu("auto", 1)
        print(type(gpu).__name__, gpu.name)
        gpu.set_locked_clocks_mhz(1200, 1200)
        gpu.close()
        """,
        fake_nvml.env(FAKE_NVML_DEVICE_COUNT=2),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(maxsplit=1) == ["NvmlBackend", "Tesla V100-SXM2-16GB\n"]
    assert read_fake_nvml_state(fake_nvml.state_file) == {0: None, 1: (1200, 1200)}


def test_without_the_library_nvml_is_not_found_in_a_clean_process() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real libnvidia-ml is installed here")
    result = run_python(
        """
        import pynvml
        from services.powerd.gpu import GpuNotFoundError, make_gpu
        from services.powerd.nvml_backend import NvmlBackend, nvml_device_count
        from services.powerd.sim_gpu import SimulatedGpu
        assert nvml_device_count() == 0
        try:
            NvmlBackend(0)
        except GpuNotFoundError as exc:
            assert isinstance(exc.__cause__, pynvml.NVMLError_LibraryNotFound), repr(exc.__cause__)
        else:
            raise AssertionError("NvmlBackend constructed without a library")
        assert isinstance(make_gpu("auto"), SimulatedGpu)
        print("ok")
        """,
        clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
