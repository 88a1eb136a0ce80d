"""Per-model execution-time model exec_ms = const_ms + ms_per_token * tokens, fitted online (pure)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class LinearExecModel:
    """Least squares over a sliding window of finished requests; the priors hold until enough data."""

    const_ms: float
    ms_per_token: float
    window: int = 512
    min_samples: int = 16
    _samples: deque[tuple[float, float]] = field(default_factory=deque, repr=False)
    _dirty: bool = field(default=False, repr=False)
    _fit: tuple[float, float] | None = field(default=None, repr=False)

    def observe(self, tokens: int, exec_ms: float) -> None:
        """Add one finished request (output tokens, measured exec time)."""
        if tokens < 0 or exec_ms <= 0:
            return
        self._samples.append((float(tokens), float(exec_ms)))
        while len(self._samples) > self.window:
            self._samples.popleft()
        self._dirty = True

    @property
    def samples(self) -> int:
        """Requests in the window."""
        return len(self._samples)

    def coefficients(self) -> tuple[float, float]:
        """(const_ms, ms_per_token) now in force: fitted when there is enough data, else the priors."""
        if len(self._samples) < self.min_samples:
            return self.const_ms, self.ms_per_token
        if self._dirty or self._fit is None:
            self._fit = self._least_squares()
            self._dirty = False
        return self._fit

    def _least_squares(self) -> tuple[float, float]:
        n = len(self._samples)
        mx = sum(x for x, _ in self._samples) / n
        my = sum(y for _, y in self._samples) / n
        sxx = sum((x - mx) ** 2 for x, _ in self._samples)
        if sxx < 1e-9 * n:
            # All requests had the same length: keep the prior slope, fit the intercept.
            return max(my - self.ms_per_token * mx, 0.0), self.ms_per_token
        slope = sum((x - mx) * (y - my) for x, y in self._samples) / sxx
        slope = max(slope, 0.0)  # longer answers never take less time
        return max(my - slope * mx, 0.0), slope

    def estimate_ms(self, tokens: float) -> float:
        """Predicted exec time of an answer of `tokens` tokens."""
        const, per_token = self.coefficients()
        return const + per_token * max(tokens, 0.0)
