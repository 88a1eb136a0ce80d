"""SimulatedGpu, GPU profiles, the GpuBackend contract and make_gpu("sim")."""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import pytest

from services.powerd.gpu import (
    GpuBackend,
    GpuInvalidArgumentError,
    make_gpu,
    slowdown_factor,
    snap_to_supported_clock_mhz,
)
from services.powerd.sim_gpu import PROFILES, GpuProfile, SimulatedGpu, get_profile


class FakeClock:
    """Manually advanced monotonic clock, so energy integrals are exact."""

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


V100 = PROFILES["V100"]


def test_profiles_are_the_three_documented_gpus() -> None:
    assert set(PROFILES) == {"V100", "A100", "H100"}
    assert (V100.min_clock_mhz, V100.max_clock_mhz, V100.max_power_w) == (135, 1530, 300.0)
    assert (PROFILES["A100"].min_clock_mhz, PROFILES["A100"].max_clock_mhz) == (210, 1410)
    assert (PROFILES["H100"].min_clock_mhz, PROFILES["H100"].max_clock_mhz) == (345, 1980)


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_profile_is_sane(key: str) -> None:
    p = PROFILES[key]
    assert 0 < p.idle_power_w < p.max_power_w
    assert 0 < p.min_clock_mhz < p.max_clock_mhz
    assert p.memory_bandwidth_gbps > 0 and p.peak_tflops_bf16 > 0
    assert 2.0 <= p.power_exponent <= 3.0
    clocks = p.supported_clocks_mhz()
    assert clocks[0] == p.max_clock_mhz and clocks[-1] == p.min_clock_mhz
    assert clocks == sorted(set(clocks), reverse=True)
    assert p.power_at(p.max_clock_mhz, 1.0) == pytest.approx(p.max_power_w)
    assert p.power_at(p.min_clock_mhz, 0.0) == pytest.approx(p.idle_power_w)


def test_supported_clocks_follow_profile_steps() -> None:
    v100 = V100.supported_clocks_mhz()
    # The real V100 list: 1530, 1522, 1515, 1507, ... 150, 142, 135 (alternating 8/7 MHz steps).
    assert len(v100) == 187
    assert v100[:4] == [1530, 1522, 1515, 1507] and v100[-3:] == [150, 142, 135]
    assert all(7 <= a - b <= 8 for a, b in pairwise(v100))
    a100 = PROFILES["A100"].supported_clocks_mhz()
    assert len(a100) == 81 and all(a - b == 15 for a, b in pairwise(a100))
    assert len(PROFILES["H100"].supported_clocks_mhz()) == 110
    assert SimulatedGpu(V100).supported_clocks_mhz() == v100


def test_profile_rejects_inconsistent_numbers() -> None:
    with pytest.raises(ValueError, match="steps"):
        dataclasses.replace(V100, clock_step_mhz=7.0)
    with pytest.raises(ValueError, match="idle"):
        dataclasses.replace(V100, idle_power_w=400.0)
    with pytest.raises(ValueError, match="min_clock"):
        dataclasses.replace(V100, min_clock_mhz=2000)


def test_get_profile_is_case_insensitive_and_lists_choices() -> None:
    assert get_profile("v100") is V100
    assert get_profile(" h100 ") is PROFILES["H100"]
    assert get_profile("a100-sxm4-40gb") is PROFILES["A100"]
    with pytest.raises(ValueError, match=r"'X100'.*V100, A100, H100"):
        get_profile("X100")


def test_simulated_gpu_identity() -> None:
    gpu = SimulatedGpu("A100", index=3)
    assert isinstance(gpu, GpuBackend)
    assert gpu.simulated is True
    assert gpu.index == 3 and "simulated" in gpu.name and "A100" in gpu.name
    assert (gpu.max_clock_mhz, gpu.min_clock_mhz) == (1410, 210)


def test_starts_at_max_clock_idle() -> None:
    gpu = SimulatedGpu(V100, clock=FakeClock())
    assert gpu.current_clock_mhz() == 1530
    assert gpu.locked_clocks_mhz is None
    assert gpu.utilization() == 0.0
    assert gpu.power_w() == pytest.approx(40.0)
    assert gpu.total_energy_j() == 0.0


def test_energy_integral_is_exact_over_piecewise_segments() -> None:
    clock = FakeClock()
    gpu = SimulatedGpu(V100, clock=clock)
    clock.advance(10.0)  # idle at max clock: 40 W
    gpu.set_locked_clocks_mhz(1005, 1005)
    gpu.set_utilization(0.8)
    clock.advance(2.5)
    mid_j = gpu.total_energy_j()  # a read mid-segment must not disturb the integral
    clock.advance(2.5)
    loaded_w = 40.0 + (300.0 - 40.0) * 0.8 * (1005 / 1530) ** 2.5
    assert gpu.power_w() == pytest.approx(loaded_w)
    assert mid_j == pytest.approx(400.0 + loaded_w * 2.5)
    assert gpu.total_energy_j() == pytest.approx(40.0 * 10 + loaded_w * 5, rel=1e-12)
    gpu.reset_clocks()
    gpu.set_utilization(1.0)
    clock.advance(1.0)
    assert gpu.total_energy_j() == pytest.approx(400.0 + loaded_w * 5 + 300.0, rel=1e-12)


def test_energy_never_decreases_even_if_clock_steps_back() -> None:
    clock = FakeClock()
    gpu = SimulatedGpu(V100, clock=clock)
    gpu.set_utilization(1.0)
    clock.advance(1.0)
    before = gpu.total_energy_j()
    clock.advance(-0.5)
    assert gpu.total_energy_j() == before
    clock.advance(1.0)  # back at +1.5 s, but the last 0.5 s were already counted from t=+1.0
    assert gpu.total_energy_j() == pytest.approx(before + 0.5 * 300.0)


def test_power_is_monotonic_in_clock_and_utilization() -> None:
    gpu = SimulatedGpu(V100)
    ascending = sorted(gpu.supported_clocks_mhz())
    for util in (0.25, 0.5, 1.0):
        powers = [gpu.power_at(c, util) for c in ascending]
        assert all(a < b for a, b in pairwise(powers))
    for clock_mhz in (135, 900, 1530):
        powers = [gpu.power_at(clock_mhz, u / 10) for u in range(11)]
        assert all(a < b for a, b in pairwise(powers))
    # Superlinear: 60% of max clock costs well under 60% of the dynamic power.
    dynamic = (gpu.power_at(918, 1.0) - 40.0) / (300.0 - 40.0)
    assert dynamic < 0.6**2
    with pytest.raises(ValueError):
        gpu.power_at(1000, 1.5)


def test_slowdown_formula() -> None:
    clock = FakeClock()
    gpu = SimulatedGpu(V100, clock=clock)
    assert gpu.slowdown(0.7) == pytest.approx(1.0)  # at max clock nothing slows
    gpu.set_locked_clocks_mhz(765, 765)  # half of 1530
    assert gpu.slowdown(0.0) == pytest.approx(1.0)  # memory-bound: clock does not matter
    assert gpu.slowdown(1.0) == pytest.approx(2.0)  # compute-bound: time ~ 1/f
    assert gpu.slowdown(0.5) == pytest.approx(0.5 * 2 + 0.5)
    assert slowdown_factor(1000, 1500, 0.3) == pytest.approx(0.3 * 1.5 + 0.7)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            gpu.slowdown(bad)


def test_invalid_clocks_are_refused_without_changing_state() -> None:
    clock = FakeClock()
    gpu = SimulatedGpu(V100, clock=clock)
    gpu.set_locked_clocks_mhz(900, 900)
    for lo, hi in ((1000, 1000), (135, 1531), (0, 900), (1530, 900)):
        with pytest.raises(GpuInvalidArgumentError):
            gpu.set_locked_clocks_mhz(lo, hi)
    assert gpu.current_clock_mhz() == 900 and gpu.locked_clocks_mhz == (900, 900)
    with pytest.raises(GpuInvalidArgumentError):
        gpu.set_utilization(1.2)


def test_lock_range_runs_at_its_top_and_reset_returns_to_max() -> None:
    gpu = SimulatedGpu(V100)
    gpu.set_locked_clocks_mhz(135, 1200)
    assert gpu.current_clock_mhz() == 1200 and gpu.locked_clocks_mhz == (135, 1200)
    gpu.reset_clocks()
    assert gpu.current_clock_mhz() == 1530 and gpu.locked_clocks_mhz is None


def test_nearest_supported_clock_rounds_up_and_clamps() -> None:
    gpu = SimulatedGpu(V100)
    assert gpu.nearest_supported_clock_mhz(1000) == 1005
    assert gpu.nearest_supported_clock_mhz(1005) == 1005
    assert gpu.nearest_supported_clock_mhz(0.6 * 1530) == 922
    assert gpu.nearest_supported_clock_mhz(10) == 135
    assert gpu.nearest_supported_clock_mhz(5000) == 1530
    with pytest.raises(GpuInvalidArgumentError):
        gpu.nearest_supported_clock_mhz(float("nan"))
    assert snap_to_supported_clock_mhz(99, [300, 200, 100]) == 100
    with pytest.raises(ValueError):
        snap_to_supported_clock_mhz(99, [])


def test_context_manager_closes() -> None:
    with SimulatedGpu(V100) as gpu:
        assert gpu.current_clock_mhz() == 1530


def test_make_gpu_sim_and_bad_choices() -> None:
    gpu = make_gpu("sim", 2, "h100")
    assert isinstance(gpu, SimulatedGpu) and gpu.profile is PROFILES["H100"] and gpu.index == 2
    assert isinstance(make_gpu("SIM"), SimulatedGpu)
    with pytest.raises(ValueError, match=r"'cuda'.*auto, nvml, sim"):
        make_gpu("cuda")
    with pytest.raises(ValueError, match=r"'T4'.*V100, A100, H100"):
        make_gpu("sim", 0, "T4")
    with pytest.raises(ValueError, match=r"'T4'"):
        make_gpu("auto", 0, "T4")  # a bad profile fails even where auto would pick NVML
    with pytest.raises(ValueError, match="index"):
        make_gpu("sim", -1)


def test_profile_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        V100.max_power_w = 1.0  # type: ignore[misc]
    assert isinstance(V100, GpuProfile)
