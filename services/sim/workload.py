"""Workloads for the simulator: Azure LLM traces (rescaled to a load factor), Poisson and Gamma arrivals."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "SYNTHETIC_LENGTHS",
    "Workload",
    "WorkloadKind",
    "azure_trace",
    "gamma_arrivals",
    "load_azure_csv",
    "make_workload",
    "poisson_arrivals",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Log-normal lengths when no trace is at hand: medians of the Azure conversation trace (prompt 1,020,
# output 129 tokens, /work/shared/data/README.md) with spreads giving its p90s (~2,700 and ~420).
SYNTHETIC_LENGTHS = {
    "prompt_median": 1020.0,
    "prompt_sigma": 0.75,
    "output_median": 129.0,
    "output_sigma": 0.9,
}


class WorkloadKind(StrEnum):
    """Workloads make_workload builds."""

    AZURE_CONV = "azure-conv"
    AZURE_CODE = "azure-code"
    POISSON = "poisson"
    GAMMA = "gamma"


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival: arrival time (s from 0) and prompt and output lengths in tokens."""

    name: str
    arrival_s: FloatArray
    prompt_tokens: IntArray
    output_tokens: IntArray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have the same length")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError("arrivals must be sorted and >= 0")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("every request needs >= 1 prompt and >= 1 output token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    @property
    def rate_per_s(self) -> float:
        """Mean arrival rate."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else 0.0

    def scaled(self, load: float) -> Workload:
        """The same requests with arrival times divided by `load` (2.0 = twice the rate)."""
        if load <= 0:
            raise ValueError(f"load must be positive, got {load}")
        return Workload(
            f"{self.name} x{load:g}", self.arrival_s / load, self.prompt_tokens, self.output_tokens
        )

    def head(self, n: int) -> Workload:
        """The first n requests."""
        return Workload(self.name, self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n])


def _parse_ts(text: str) -> float:
    """Azure's "2023-11-16 18:15:46.6805900" (7 fractional digits) as POSIX seconds."""
    head, _, frac = text.strip().partition(".")
    base = datetime.fromisoformat(head).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: Path) -> Workload:
    """Read an AzureLLMInferenceTrace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    ts: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            ts.append(_parse_ts(row["TIMESTAMP"]))
            prompt.append(max(int(row["ContextTokens"]), 1))
            output.append(max(int(row["GeneratedTokens"]), 1))
    if not ts:
        raise ValueError(f"{path}: no requests")
    order = np.argsort(np.asarray(ts), kind="stable")
    arrival = np.asarray(ts, dtype=np.float64)[order]
    return Workload(
        Path(path).stem,
        arrival - arrival[0],
        np.asarray(prompt, dtype=np.int64)[order],
        np.asarray(output, dtype=np.int64)[order],
    )


def azure_trace(path: Path, load: float = 1.0, requests: int | None = None) -> Workload:
    """A trace at `load` x its own rate; more requests than it holds repeat it back to back."""
    base = load_azure_csv(path)
    if requests is not None and requests > len(base):
        copies = math.ceil(requests / len(base))
        period = base.duration_s + (base.duration_s / max(len(base) - 1, 1))
        arrival = np.concatenate([base.arrival_s + i * period for i in range(copies)])[:requests]
        base = Workload(
            f"{base.name} (repeated {copies}x)",
            arrival,
            np.tile(base.prompt_tokens, copies)[:requests],
            np.tile(base.output_tokens, copies)[:requests],
        )
    elif requests is not None:
        base = base.head(requests)
    return base.scaled(load) if load != 1.0 else base


def _lengths(
    n: int, rng: np.random.Generator, lengths_from: Workload | None, max_tokens: int = 16384
) -> tuple[IntArray, IntArray]:
    """(prompt, output) pairs resampled from a workload, else log-normal (SYNTHETIC_LENGTHS)."""
    if lengths_from is not None and len(lengths_from):
        pick = rng.integers(0, len(lengths_from), size=n)
        return lengths_from.prompt_tokens[pick], lengths_from.output_tokens[pick]
    sl = SYNTHETIC_LENGTHS
    p = rng.lognormal(math.log(sl["prompt_median"]), sl["prompt_sigma"], size=n)
    o = rng.lognormal(math.log(sl["output_median"]), sl["output_sigma"], size=n)
    return (
        np.clip(np.rint(p), 1, max_tokens).astype(np.int64),
        np.clip(np.rint(o), 1, max_tokens).astype(np.int64),
    )


def poisson_arrivals(
    rate_per_s: float, requests: int, seed: int = 0, lengths_from: Workload | None = None
) -> Workload:
    """Exponential gaps at `rate_per_s`."""
    return gamma_arrivals(rate_per_s, requests, cv=1.0, seed=seed, lengths_from=lengths_from, name="poisson")


def gamma_arrivals(
    rate_per_s: float,
    requests: int,
    cv: float = 2.0,
    seed: int = 0,
    lengths_from: Workload | None = None,
    name: str = "gamma",
) -> Workload:
    """Gamma-distributed gaps with mean 1 / rate and coefficient of variation `cv` (1 = Poisson)."""
    if rate_per_s <= 0 or requests < 1 or cv <= 0:
        raise ValueError("need rate_per_s > 0, requests >= 1 and cv > 0")
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), size=requests)
    gaps[0] = 0.0
    prompt, output = _lengths(requests, rng, lengths_from)
    label = f"{name} {rate_per_s:g}/s" + (f" cv {cv:g}" if name == "gamma" else "")
    return Workload(label, np.cumsum(gaps), prompt, output)


def make_workload(
    kind: str | WorkloadKind,
    *,
    data_dir: Path | None = None,
    load: float = 1.0,
    requests: int | None = None,
    rate_per_s: float | None = None,
    cv: float = 2.0,
    seed: int = 0,
) -> Workload:
    """Build a workload by name; Poisson and Gamma take lengths from the conv trace when data_dir has it."""
    try:
        resolved = WorkloadKind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in WorkloadKind)
        raise ValueError(f"unknown workload {kind!r}; choose one of: {valid}") from None
    conv = None if data_dir is None else Path(data_dir) / "AzureLLMInferenceTrace_conv.csv"
    if resolved in (WorkloadKind.AZURE_CONV, WorkloadKind.AZURE_CODE):
        if data_dir is None:
            raise ValueError(f"workload {resolved.value} needs data_dir (the folder with the Azure CSVs)")
        which = "conv" if resolved is WorkloadKind.AZURE_CONV else "code"
        path = Path(data_dir) / f"AzureLLMInferenceTrace_{which}.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (see /work/shared/data/README.md)")
        return azure_trace(path, load=load, requests=requests)
    lengths = load_azure_csv(conv) if conv is not None and conv.exists() else None
    n = requests or 10_000
    rate = (rate_per_s or 5.53) * load  # default: the conv trace's own mean rate
    if resolved is WorkloadKind.POISSON:
        return poisson_arrivals(rate, n, seed=seed, lengths_from=lengths)
    return gamma_arrivals(rate, n, cv=cv, seed=seed, lengths_from=lengths)
