"""The length predictor as the simulator sees it: a measured confusion matrix sampled per request."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.predictor.data import class_edges, classes_of, edge_percentiles

__all__ = ["DEFAULT_CONFUSION", "ConfusionPredictor", "load_confusion_predictor", "predict_tokens"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# The shipped proxy predictor (proxy-smollm2@1.smollm2-16L-listmle-fb950697) on its held-out test
# prompts, all 226 target LLMs, rows = true class, row-normalised: the matrix `muserve predictor eval`
# writes into bench/results/predictor-eval.json (which the simulator prefers when the report has it).
# Classes are the p25/p50/p75/p99 length buckets. Accuracy 0.527, within-one 0.916 (predictor-eval.md).
DEFAULT_CONFUSION = (
    (0.71, 0.27, 0.02, 0.00, 0.00),
    (0.24, 0.57, 0.16, 0.02, 0.00),
    (0.06, 0.39, 0.38, 0.17, 0.00),
    (0.03, 0.15, 0.27, 0.51, 0.05),
    (0.07, 0.27, 0.25, 0.31, 0.09),
)
DEFAULT_CONFUSION_SOURCE = "bench/results/predictor-eval.json: proxy predictor, all models, test split"


@dataclass(frozen=True)
class ConfusionPredictor:
    """Samples a predicted class from the confusion row of each request's true class (seeded)."""

    matrix: FloatArray  # rows = true class, each row sums to 1
    source: str

    def __post_init__(self) -> None:
        m = self.matrix
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
            raise ValueError(f"confusion matrix must be square, K >= 2, got shape {m.shape}")
        if np.any(m < 0) or not np.allclose(m.sum(axis=1), 1.0):
            raise ValueError("confusion rows must be non-negative and sum to 1")

    @property
    def classes(self) -> int:
        """K."""
        return int(self.matrix.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float]], source: str) -> ConfusionPredictor:
        """Normalise each row (counts or rounded fractions) to sum to 1."""
        m = np.asarray(rows, dtype=np.float64)
        if m.ndim != 2 or np.any(m.sum(axis=1) <= 0):
            raise ValueError("every confusion row needs a positive sum")
        return cls(m / m.sum(axis=1, keepdims=True), source)

    @classmethod
    def default(cls) -> ConfusionPredictor:
        """The shipped predictor's measured matrix."""
        return cls.from_rows(DEFAULT_CONFUSION, DEFAULT_CONFUSION_SOURCE)

    @classmethod
    def from_json(cls, path: Path) -> ConfusionPredictor:
        """A JSON file with "confusion" (or "matrix"): a K x K list, rows = true class."""
        data: Any = json.loads(Path(path).read_text())
        rows = data.get("confusion", data.get("matrix")) if isinstance(data, dict) else data
        if rows is None:
            raise ValueError(f"{path}: no 'confusion' or 'matrix' key")
        return cls.from_rows(rows, str(path))

    def sample(self, true_class: npt.ArrayLike, rng: np.random.Generator) -> IntArray:
        """One predicted class per true class, drawn from its row."""
        t = np.asarray(true_class, dtype=np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.classes):
            raise ValueError(f"true classes must be in [0, {self.classes})")
        cdf = np.cumsum(self.matrix, axis=1)
        cdf[:, -1] = 1.0
        u = rng.random(t.size)
        return np.asarray((u[:, None] > cdf[t]).sum(axis=1), dtype=np.int64)


def predict_tokens(
    output_tokens: npt.ArrayLike,
    predictor: ConfusionPredictor | None,
    rng: np.random.Generator,
    edges: Sequence[int] | None = None,
) -> tuple[FloatArray, IntArray]:
    """(predicted tokens, predicted class) per request; predictor None = oracle (true lengths).

    Predicted tokens are the mean true length of the predicted class over the workload, what the
    predictor service's online per-class estimate converges to.
    """
    out = np.asarray(output_tokens, dtype=np.int64)
    if predictor is None:
        return out.astype(np.float64), np.full(out.size, -1, dtype=np.int64)
    cuts = list(edges) if edges is not None else class_edges(out, edge_percentiles(predictor.classes))
    if len(cuts) != predictor.classes - 1:
        raise ValueError(f"{predictor.classes} classes need {predictor.classes - 1} edges, got {len(cuts)}")
    true_class = classes_of(out, cuts)
    means = np.array(
        [out[true_class == k].mean() if np.any(true_class == k) else np.nan for k in range(predictor.classes)]
    )
    # A class without requests (tiny workloads): interpolate from its neighbours' edges.
    bounds = [1, *cuts, int(out.max()) + 1]
    for k in range(predictor.classes):
        if np.isnan(means[k]):
            means[k] = (bounds[k] + bounds[k + 1]) / 2.0
    predicted = predictor.sample(true_class, rng)
    return means[predicted].astype(np.float64), predicted


def load_confusion_predictor(path: Path | None) -> ConfusionPredictor:
    """The given confusion file, else the evaluation report's matrix if it has one, else the shipped copy."""
    if path is not None:
        return ConfusionPredictor.from_json(path)
    report = Path("bench/results/predictor-eval.json")
    if report.exists():
        try:
            return ConfusionPredictor.from_json(report)
        except (ValueError, KeyError, TypeError):
            pass  # the report does not (yet) carry the matrix
    return ConfusionPredictor.default()
