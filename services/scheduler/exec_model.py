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
    # Running sums of x, y, x^2, x*y over the window (re-summed every `window` evictions, so float
    # drift cannot accumulate): the fit is O(1) however often it is asked for.
    _sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0], repr=False)
    _evictions: int = field(default=0, repr=False)
    _longest: float | None = field(default=None, repr=False)

    def observe(self, tokens: int, exec_ms: float) -> None:
        """Add one finished request (output tokens, measured exec time)."""
        if tokens < 0 or exec_ms <= 0:
            return
        x, y = float(tokens), float(exec_ms)
        self._samples.append((x, y))
        sums = self._sums
        sums[0] += x
        sums[1] += y
        sums[2] += x * x
        sums[3] += x * y
        while len(self._samples) > self.window:
            ox, oy = self._samples.popleft()
            sums[0] -= ox
            sums[1] -= oy
            sums[2] -= ox * ox
            sums[3] -= ox * oy
            self._evictions += 1
        if self._evictions >= self.window:
            self._evictions = 0
            xs = [a for a, _ in self._samples]
            ys = [b for _, b in self._samples]
            self._sums = [sum(xs), sum(ys), sum(a * a for a in xs), sum(a * b for a, b in self._samples)]
        self._dirty = True
        self._longest = None

    @property
    def samples(self) -> int:
        """Requests in the window."""
        return len(self._samples)

    def longest_tokens(self) -> float | None:
        """The longest answer in the window (None until min_samples): a bound on credible predictions."""
        if len(self._samples) < self.min_samples:
            return None
        if self._longest is None:  # recomputed once per change of the window, not per prediction
            self._longest = max(x for x, _ in self._samples)
        return self._longest

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
        sx, sy, sxx_raw, sxy_raw = self._sums
        mx, my = sx / n, sy / n
        sxx = sxx_raw - sx * mx
        # Relative to the raw sum: cancellation leaves noise of that size when all lengths are equal.
        if sxx < 1e-12 * max(sxx_raw, n):
            # All requests had the same length: keep the prior slope, fit the intercept.
            return max(my - self.ms_per_token * mx, 0.0), self.ms_per_token
        slope = (sxy_raw - sx * my) / sxx
        slope = max(slope, 0.0)  # longer answers never take less time
        return max(my - slope * mx, 0.0), slope

    def estimate_ms(self, tokens: float) -> float:
        """Predicted exec time of an answer of `tokens` tokens."""
        const, per_token = self.coefficients()
        return const + per_token * max(tokens, 0.0)
