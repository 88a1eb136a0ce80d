"""The LengthPredictor interface and the honest baseline: each model's median output length."""

from __future__ import annotations

import bisect
import statistics
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence

from services.common.schemas import Prediction, PredictItem


def length_class(tokens: float, edges_tokens: Sequence[int]) -> int:
    """Class index of an output length: class k holds lengths in (edges[k-1], edges[k]]."""
    return bisect.bisect_left(edges_tokens, tokens)


class LengthPredictor(ABC):
    """Predicts each request's output length (class and expected tokens) before it is served."""

    name: str
    version: str

    @property
    def ident(self) -> str:
        """Stamped on every prediction: name@version."""
        return f"{self.name}@{self.version}"

    @abstractmethod
    def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """One prediction per item, in order."""

    def observe(  # noqa: B027 - optional hook
        self, model: str, completion_tokens: int, prediction: Prediction | None = None
    ) -> None:
        """Learn from a finished request's true length (and what was predicted for it), optionally."""


class MedianLengthPredictor(LengthPredictor):
    """Baseline: every request of a model gets that model's median observed length (prompt ignored)."""

    name = "per-model-median"
    version = "1"

    def __init__(
        self,
        edges_tokens: Sequence[int],
        priors_tokens: Mapping[str, float] | None = None,
        default_tokens: float = 256.0,
        window: int = 1000,
    ) -> None:
        self.edges_tokens = list(edges_tokens)
        self._priors = dict(priors_tokens or {})
        self._default = default_tokens
        self._window = window
        self._seen: dict[str, deque[int]] = {}
        self._median: dict[str, float] = {}

    def median_tokens(self, model: str) -> float:
        """The current estimate for a model: observed median, else its prior."""
        cached = self._median.get(model)
        if cached is not None:
            return cached
        seen = self._seen.get(model)
        value = float(statistics.median(seen)) if seen else self._priors.get(model, self._default)
        self._median[model] = value
        return value

    def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """The model's median for every item."""
        out = []
        for item in items:
            tokens = self.median_tokens(item.model)
            out.append(
                Prediction(
                    length_class=length_class(tokens, self.edges_tokens),
                    predicted_tokens=tokens,
                    predictor=self.ident,
                )
            )
        return out

    def observe(self, model: str, completion_tokens: int, prediction: Prediction | None = None) -> None:
        """Add a true length to the model's sliding window."""
        if completion_tokens <= 0:
            return
        self._seen.setdefault(model, deque(maxlen=self._window)).append(completion_tokens)
        self._median.pop(model, None)
