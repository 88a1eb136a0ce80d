"""Continuous-batching step latency: decode = a(batch) + b * context, prefill = p(prompt), per clock.

Each term is split into a part that scales with the SM clock (compute) and one that does not (memory
reads), which is µ-Serve's t(f) = t(fmax) * (s * fmax / f + 1 - s) applied term by term. The defaults
come from the roofline of a model on a GPU profile (`StepModel.roofline`); a JSON calibration file
(`StepModel.from_json`) replaces them with constants fitted from live worker step measurements.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.powerd.sensitivity import (
    DEFAULT_COMPUTE_EFFICIENCY,
    DEFAULT_MEMORY_EFFICIENCY,
    ModelShape,
)
from services.powerd.sim_gpu import GpuProfile

__all__ = ["StepModel", "calibration_from_step_stats", "fit_decode_samples", "fit_prefill_samples"]

FloatArray = npt.NDArray[np.float64]
# Informational keys of a calibration file (not constants).
METADATA_KEYS = ("fitted", "measured")


@dataclass(frozen=True)
class StepModel:
    """Step latency constants at max clock, in ms; `*_compute_*` terms scale with fmax / f."""

    decode_memory_ms: float  # a0: weights read once per step
    decode_compute_ms_per_seq: float  # a1: matmuls, per sequence in the batch
    decode_memory_ms_per_ctx: float  # b: KV cache read, per context token in the batch
    decode_compute_ms_per_ctx: float  # attention FLOPs, per context token in the batch
    prefill_memory_ms: float  # weights read once per prefill
    prefill_compute_ms_per_token: float  # matmuls, per prompt token
    prefill_compute_ms_per_token_sq: float  # causal attention, per prompt token squared
    source: str = "unspecified"
    # A measured step cannot tell which part scales with the clock: with clock_share = s every term is
    # a total of which s scales with fmax / f (µ-Serve's t(f) for the whole step). None: the split above.
    clock_share: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "source" or (f.name == "clock_share" and value is None):
                continue
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"StepModel.{f.name} must be a number >= 0, got {value!r}")
        if self.clock_share is not None and self.clock_share > 1:
            raise ValueError(f"StepModel.clock_share must be in [0, 1], got {self.clock_share}")
        if self.decode_memory_ms + self.decode_compute_ms_per_seq <= 0:
            raise ValueError("a decode step must take some time")

    @classmethod
    def roofline(
        cls,
        shape: ModelShape,
        profile: GpuProfile,
        compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY,
        memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
    ) -> StepModel:
        """Constants from FLOPs and bytes per token vs the profile's peak compute and bandwidth."""
        flops_per_ms = profile.peak_tflops_bf16 * 1e12 * compute_efficiency / 1e3
        bytes_per_ms = profile.memory_bandwidth_gbps * 1e9 * memory_efficiency / 1e3
        attn = shape.attention_flops_per_context_token
        return cls(
            decode_memory_ms=shape.weight_bytes / bytes_per_ms,
            decode_compute_ms_per_seq=2.0 * shape.matmul_params / flops_per_ms,
            decode_memory_ms_per_ctx=shape.kv_bytes_per_token / bytes_per_ms,
            decode_compute_ms_per_ctx=attn / flops_per_ms,
            prefill_memory_ms=shape.weight_bytes / bytes_per_ms,
            prefill_compute_ms_per_token=2.0 * shape.matmul_params / flops_per_ms,
            prefill_compute_ms_per_token_sq=0.5 * attn / flops_per_ms,
            source=(
                f"roofline: {shape.name} on {profile.name}, {compute_efficiency:.0%} of peak FLOPs, "
                f"{memory_efficiency:.0%} of peak bandwidth"
            ),
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "calibration") -> StepModel:
        """Build from a mapping of the field names; "decode_samples" / "prefill_samples" rows are fitted.

        A measurement at max clock cannot tell which part of a step scales with the clock, so fitted
        constants keep the roofline's attribution: weight and KV reads do not, per-sequence matmuls and
        prompt tokens do.
        """
        values = dict(data)
        for info in METADATA_KEYS:  # what `muserve calibrate` records beside the samples
            values.pop(info, None)
        samples = values.pop("decode_samples", None)
        if samples is not None:
            rows = [(int(r["batch"]), float(r["context_tokens"]), float(r["step_ms"])) for r in samples]
            a0, a1, b = fit_decode_samples(rows)
            values.update(decode_memory_ms=a0, decode_compute_ms_per_seq=a1, decode_memory_ms_per_ctx=b)
            values["decode_compute_ms_per_ctx"] = 0.0
        pre = values.pop("prefill_samples", None)
        if pre is not None:
            p0, p1, p2 = fit_prefill_samples([(float(r["prompt_tokens"]), float(r["step_ms"])) for r in pre])
            values.update(
                prefill_memory_ms=p0, prefill_compute_ms_per_token=p1, prefill_compute_ms_per_token_sq=p2
            )
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown step-model keys {sorted(unknown)}; expected {sorted(names)}")
        values.setdefault("source", source)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"incomplete step model: {exc}") from None

    @classmethod
    def from_json(cls, path: Path, base: StepModel | None = None) -> StepModel:
        """Load a calibration file; keys it leaves out are taken from `base` (e.g. the roofline)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        merged = {**(asdict(base) if base is not None else {}), **data}
        merged["source"] = str(data.get("source", f"calibration file {path}"))
        return cls.from_mapping(merged)

    def with_source(self, source: str) -> StepModel:
        """The same constants, relabelled."""
        return replace(self, source=source)

    def decode_terms(self) -> tuple[float, float, float, float, float, float]:
        """Decode ms at max clock: (const, per sequence, per context token) x (fixed, clock-bound) pairs."""
        a0, a1 = self.decode_memory_ms, self.decode_compute_ms_per_seq
        if self.clock_share is None:
            return a0, 0.0, 0.0, a1, self.decode_memory_ms_per_ctx, self.decode_compute_ms_per_ctx
        s = self.clock_share
        b = self.decode_memory_ms_per_ctx + self.decode_compute_ms_per_ctx
        return (1 - s) * a0, s * a0, (1 - s) * a1, s * a1, (1 - s) * b, s * b

    def prefill_terms(self) -> tuple[float, float, float, float, float, float]:
        """Prefill ms at max clock: (const, per token, per token^2) x (fixed, clock-bound) pairs."""
        p0, p1, p2 = (
            self.prefill_memory_ms,
            self.prefill_compute_ms_per_token,
            self.prefill_compute_ms_per_token_sq,
        )
        if self.clock_share is None:
            return p0, 0.0, 0.0, p1, 0.0, p2
        s = self.clock_share
        return (1 - s) * p0, s * p0, (1 - s) * p1, s * p1, (1 - s) * p2, s * p2

    def decode_ms(self, batch: int, context_tokens: float, clock_ratio: float = 1.0) -> float:
        """One decode step of `batch` rows holding `context_tokens` in total, at fmax / f = clock_ratio."""
        m0, c0, m1, c1, mc, cc = self.decode_terms()
        memory = m0 + m1 * batch + mc * context_tokens
        compute = c0 + c1 * batch + cc * context_tokens
        return memory + compute * clock_ratio

    def prefill_ms(self, prompt_tokens: float, clock_ratio: float = 1.0) -> float:
        """The prefill of one prompt at fmax / f = clock_ratio."""
        p = float(prompt_tokens)
        m0, c0, m1, c1, m2, c2 = self.prefill_terms()
        return m0 + m1 * p + m2 * p * p + (c0 + c1 * p + c2 * p * p) * clock_ratio

    def solo_ms(self, prompt_tokens: npt.ArrayLike, output_tokens: npt.ArrayLike) -> FloatArray:
        """A request's time alone at max clock: its prefill, then output - 1 decode steps at batch 1."""
        p = np.asarray(prompt_tokens, dtype=np.float64)
        n = np.asarray(output_tokens, dtype=np.float64)
        prefill = (
            self.prefill_memory_ms
            + self.prefill_compute_ms_per_token * p
            + self.prefill_compute_ms_per_token_sq * p * p
        )
        steps = np.maximum(n - 1.0, 0.0)
        per_ctx = self.decode_memory_ms_per_ctx + self.decode_compute_ms_per_ctx
        # Step j (0-based) after the prefill sees p + 1 + j tokens of context.
        ctx_sum = steps * (p + 1.0) + steps * (steps - 1.0) / 2.0
        decode = steps * (self.decode_memory_ms + self.decode_compute_ms_per_seq) + per_ctx * ctx_sum
        return np.asarray(prefill + decode, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready constants."""
        return asdict(self)


def fit_decode_samples(samples: Sequence[tuple[int, float, float]]) -> tuple[float, float, float]:
    """Least squares step_ms = a0 + a1 * batch + b * context_tokens (all clipped at >= 0)."""
    if len(samples) < 3:
        raise ValueError("need at least three (batch, context_tokens, step_ms) samples")
    arr = np.asarray(samples, dtype=np.float64)
    design = np.column_stack([np.ones(len(arr)), arr[:, 0], arr[:, 1]])
    coef, *_ = np.linalg.lstsq(design, arr[:, 2], rcond=None)
    a0, a1, b = (max(float(c), 0.0) for c in coef)
    return a0, a1, b


def fit_prefill_samples(samples: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares step_ms = p0 + p1 * prompt + p2 * prompt^2 (all clipped at >= 0)."""
    if len(samples) < 3:
        raise ValueError("need at least three (prompt_tokens, step_ms) samples")
    arr = np.asarray(samples, dtype=np.float64)
    design = np.column_stack([np.ones(len(arr)), arr[:, 0], arr[:, 0] ** 2])
    coef, *_ = np.linalg.lstsq(design, arr[:, 1], rcond=None)
    p0, p1, p2 = (max(float(c), 0.0) for c in coef)
    return p0, p1, p2


def calibration_from_step_stats(stats: Sequence[Any], source: str) -> dict[str, Any]:
    """A calibration file's content from the worker engine's StepStats (kind, batch_size, ...).

    Decode steps give (batch, summed context, latency); single-sequence prefills give (prompt, latency).
    Feed it to StepModel.from_mapping / write it as JSON for `muserve sim --calibration`.
    """
    decode = [
        {"batch": s.batch_size, "context_tokens": s.context_tokens, "step_ms": s.latency_ms}
        for s in stats
        if s.kind == "decode"
    ]
    prefill = [
        {"prompt_tokens": s.num_tokens, "step_ms": s.latency_ms}
        for s in stats
        if s.kind == "prefill" and s.batch_size == 1
    ]
    out: dict[str, Any] = {"source": source}
    if len(decode) >= 3:
        out["decode_samples"] = decode
    if len(prefill) >= 3:
        out["prefill_samples"] = prefill
    return out
