"""The worker's view of its GPU clock (from powerd's telemetry): step slowdown and busy power."""

from __future__ import annotations

from services.common.schemas import PowerTelemetry
from services.powerd.gpu import slowdown_factor
from services.powerd.sim_gpu import GpuProfile, get_profile


class ClockView:
    """Latest power telemetry of this worker's GPU; turns it into step slowdown and busy power."""

    def __init__(self, enabled: bool = True) -> None:
        # enabled=False: never stretch steps (energy is still estimated).
        self.enabled = enabled
        self.latest: PowerTelemetry | None = None
        self._profile: GpuProfile | None = None

    def update(self, tel: PowerTelemetry) -> None:
        """Take a new telemetry message."""
        if tel.profile and (
            self._profile is None or self.latest is None or self.latest.profile != tel.profile
        ):
            try:
                self._profile = get_profile(tel.profile)
            except ValueError:
                self._profile = None
        self.latest = tel

    @property
    def simulated(self) -> bool | None:
        """True on a simulated GPU, False on a real one, None when powerd has not spoken yet."""
        return None if self.latest is None else self.latest.simulated

    def slowdown(self, sensitivity: float) -> float:
        """How much longer a step takes at the current clock than at max (simulated GPUs only)."""
        tel = self.latest
        if not self.enabled or tel is None or not tel.simulated or tel.clock_mhz <= 0:
            return 1.0
        return slowdown_factor(tel.clock_mhz, tel.max_clock_mhz, sensitivity)

    def busy_power_w(self) -> float | None:
        """Board power while a step runs: the profile's model at full load, or the measured power."""
        tel = self.latest
        if tel is None:
            return None
        if tel.simulated and self._profile is not None:
            return self._profile.power_at(tel.clock_mhz, 1.0)
        return tel.power_w
