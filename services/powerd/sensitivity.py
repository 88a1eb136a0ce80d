"""Frequency sensitivity s of a model: measured at locked clocks on a real GPU, else a roofline estimate.

µ-Serve's latency model is t(f) = t(fmax) * (s * fmax / f + 1 - s): the share s of a step's time that
is compute-bound scales with the SM clock, the memory-bound rest does not. The roofline splits a step
into compute time (FLOPs / achievable peak) and memory time (bytes / achievable bandwidth), adds them
(no overlap: the conservative end) and takes s = compute / (compute + memory). `measure_sensitivity`
instead locks each of several clocks, times a step and fits the same formula (pure apart from the GPU
calls it is handed). Every estimate says where it came from. `run_profile` is `muserve profile`: it
measures on an NVML GPU with CUDA when there is one and falls back to the roofline otherwise.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from services.powerd.gpu import GpuBackend
from services.powerd.sim_gpu import GpuProfile

__all__ = [
    "DEFAULT_COMPUTE_EFFICIENCY",
    "DEFAULT_MEMORY_EFFICIENCY",
    "MODEL_SHAPES",
    "ModelShape",
    "RooflineTime",
    "SensitivityEstimate",
    "SensitivitySource",
    "decode_step_roofline",
    "estimate_sensitivity",
    "fit_sensitivity",
    "get_model_shape",
    "measure_sensitivity",
    "prefill_roofline",
    "resolve_model_shape",
    "run_profile",
]

# Achievable fractions of the datasheet peaks: large fp16 GEMMs reach ~50% of tensor peak on V100/A100
# in serving engines, streaming reads ~80% of HBM bandwidth. Both are assumptions, not measurements.
DEFAULT_COMPUTE_EFFICIENCY = 0.5
DEFAULT_MEMORY_EFFICIENCY = 0.8


class SensitivitySource(StrEnum):
    """Where a sensitivity value came from."""

    ROOFLINE = "roofline"
    NVML_MEASURED = "nvml-measured"


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs to know about a decoder-only transformer (read from its HF config)."""

    name: str
    params: float  # all parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    bytes_per_param: float = 2.0  # fp16 / bf16

    def __post_init__(self) -> None:
        if min(self.params, self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim) <= 0:
            raise ValueError(f"{self.name}: every size must be positive")
        if self.bytes_per_param <= 0:
            raise ValueError(f"{self.name}: bytes_per_param must be positive")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str = "model") -> ModelShape:
        """Build from a Hugging Face config.json (Llama-style names; params counted when not given)."""
        try:
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            vocab = int(config["vocab_size"])
        except KeyError as exc:
            raise ValueError(f"{name}: config lacks {exc.args[0]!r}") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config.get("intermediate_size") or 4 * hidden)
        tied = bool(config.get("tie_word_embeddings", False))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        width = 4.0 if dtype == "float32" else 2.0
        params = float(config.get("num_parameters") or 0.0)
        if params <= 0:
            attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
            gated = str(config.get("hidden_act", "silu")) in ("silu", "swish", "gelu_pytorch_tanh")
            mlp = (3 if gated else 2) * hidden * inter
            params = layers * (attn + mlp + 2 * hidden) + hidden + vocab * hidden * (1 if tied else 2)
        return cls(name, params, layers, hidden, heads, kv_heads, head_dim, vocab, tied, width)

    @property
    def matmul_params(self) -> float:
        """Parameters used in matrix multiplies per token (the input embedding is only a lookup)."""
        return self.params if self.tied_embeddings else self.params - self.vocab * self.hidden

    @property
    def weight_bytes(self) -> float:
        """Bytes of weights one forward pass reads."""
        return self.matmul_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token of context (keys and values of every layer)."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def attention_flops_per_context_token(self) -> float:
        """FLOPs one new token spends per token of context (QK^T and AV over every head)."""
        return 4.0 * self.layers * self.heads * self.head_dim


def _llama(
    name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool
) -> ModelShape:
    """A Llama-style shape from its config numbers."""
    cfg = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    return ModelShape.from_hf_config(cfg, name)


# Config numbers copied from each model's published config.json on the Hugging Face hub.
MODEL_SHAPES: Mapping[str, ModelShape] = MappingProxyType(
    {
        s.name: s
        for s in (
            _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True),
            _llama("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, True),
            _llama("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, True),
            _llama("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, False),
            _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, False),
        )
    }
)


def get_model_shape(name: str) -> ModelShape:
    """A built-in shape by name (case-insensitive; "smollm2-135m-instruct" finds "smollm2-135m")."""
    wanted = name.strip().lower()
    for key, shape in MODEL_SHAPES.items():
        if wanted == key or wanted.startswith(key + "-"):
            return shape
    raise ValueError(f"unknown model shape {name!r}; choose one of: {', '.join(MODEL_SHAPES)}")


@dataclass(frozen=True)
class RooflineTime:
    """A step's time at max clock split into its clock-bound and memory-bound parts."""

    compute_ms: float
    memory_ms: float

    @property
    def total_ms(self) -> float:
        """compute + memory (no overlap)."""
        return self.compute_ms + self.memory_ms

    @property
    def sensitivity(self) -> float:
        """Share of the step that scales with the clock."""
        return self.compute_ms / self.total_ms if self.total_ms > 0 else 0.0


def _peaks(profile: GpuProfile, compute_efficiency: float, memory_efficiency: float) -> tuple[float, float]:
    """Achievable FLOP/ms and bytes/ms of a GPU profile."""
    if not 0 < compute_efficiency <= 1 or not 0 < memory_efficiency <= 1:
        raise ValueError("efficiencies must be in (0, 1]")
    flops_per_ms = profile.peak_tflops_bf16 * 1e12 * compute_efficiency / 1e3
    bytes_per_ms = profile.memory_bandwidth_gbps * 1e9 * memory_efficiency / 1e3
    return flops_per_ms, bytes_per_ms


def decode_step_roofline(
    shape: ModelShape,
    profile: GpuProfile,
    batch: int,
    context_tokens: float,
    compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY,
    memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
) -> RooflineTime:
    """One decode step of `batch` sequences with `context_tokens` of context each."""
    if batch < 1 or context_tokens < 0:
        raise ValueError(f"need batch >= 1 and context_tokens >= 0, got {batch}, {context_tokens}")
    flops_per_ms, bytes_per_ms = _peaks(profile, compute_efficiency, memory_efficiency)
    flops = batch * (2.0 * shape.matmul_params + shape.attention_flops_per_context_token * context_tokens)
    nbytes = shape.weight_bytes + batch * context_tokens * shape.kv_bytes_per_token
    return RooflineTime(flops / flops_per_ms, nbytes / bytes_per_ms)


def prefill_roofline(
    shape: ModelShape,
    profile: GpuProfile,
    prompt_tokens: float,
    compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY,
    memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
) -> RooflineTime:
    """The prefill of one prompt (causal attention: half of the full P x P score matrix)."""
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    flops_per_ms, bytes_per_ms = _peaks(profile, compute_efficiency, memory_efficiency)
    attn = 0.5 * shape.attention_flops_per_context_token * prompt_tokens * prompt_tokens
    flops = 2.0 * shape.matmul_params * prompt_tokens + attn
    nbytes = shape.weight_bytes + prompt_tokens * shape.kv_bytes_per_token
    return RooflineTime(flops / flops_per_ms, nbytes / bytes_per_ms)


@dataclass(frozen=True)
class SensitivityEstimate:
    """A sensitivity value, where it came from and how it was obtained."""

    value: float
    source: SensitivitySource
    detail: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"sensitivity must be in [0, 1], got {self.value}")


def estimate_sensitivity(
    shape: ModelShape,
    profile: GpuProfile,
    batch: int = 8,
    context_tokens: float = 1024.0,
    prompt_tokens: float | None = None,
    output_tokens: float | None = None,
    compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY,
    memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
) -> SensitivityEstimate:
    """Roofline s of decode steps, or (prompt and output tokens given) of a request's GPU-time mix.

    The mix weighs one prefill of prompt_tokens against output_tokens decode steps, each shared by
    `batch` sequences: the share of the GPU's busy time that scales with the clock, which is what a
    throughput measurement at several clocks would see.
    """
    eff = (compute_efficiency, memory_efficiency)
    step = decode_step_roofline(shape, profile, batch, context_tokens, *eff)
    where = f"{shape.name} on {profile.name}, decode batch {batch} at {context_tokens:.0f} context tokens"
    if prompt_tokens is None or output_tokens is None:
        detail = f"{where}: compute {step.compute_ms:.2f} ms + memory {step.memory_ms:.2f} ms"
        return SensitivityEstimate(step.sensitivity, SensitivitySource.ROOFLINE, detail)
    pre = prefill_roofline(shape, profile, prompt_tokens, *eff)
    share = output_tokens / batch
    compute = pre.compute_ms + share * step.compute_ms
    total = pre.total_ms + share * step.total_ms
    detail = (
        f"{where}, mix with a {prompt_tokens:.0f}-token prefill (s={pre.sensitivity:.2f}) per "
        f"{output_tokens:.0f} output tokens (decode s={step.sensitivity:.2f})"
    )
    return SensitivityEstimate(compute / total if total > 0 else 0.0, SensitivitySource.ROOFLINE, detail)


def fit_sensitivity(
    clocks_mhz: Sequence[float], latencies_ms: Sequence[float], max_clock_mhz: float
) -> float:
    """Least-squares s of t(f) = A * fmax / f + B (s = A / (A + B)), clipped to [0, 1]."""
    if len(clocks_mhz) != len(latencies_ms) or len(clocks_mhz) < 2:
        raise ValueError("need at least two (clock, latency) pairs of equal length")
    if min(clocks_mhz) <= 0 or max_clock_mhz <= 0 or min(latencies_ms) <= 0:
        raise ValueError("clocks and latencies must be positive")
    xs = [max_clock_mhz / c for c in clocks_mhz]
    mx, my = statistics.fmean(xs), statistics.fmean(latencies_ms)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        raise ValueError("need at least two different clocks")
    a = sum((x - mx) * (y - my) for x, y in zip(xs, latencies_ms, strict=True)) / sxx
    b = my - a * mx
    if a + b <= 0:
        return 0.0
    return min(max(a / (a + b), 0.0), 1.0)


def _spread_clocks(supported_clocks_mhz: Sequence[int], n: int) -> list[int]:
    """n supported clocks spread evenly from the max down to the min."""
    ordered = sorted(set(supported_clocks_mhz), reverse=True)
    if n < 2 or len(ordered) < 2:
        raise ValueError("need n >= 2 and at least two supported clocks")
    n = min(n, len(ordered))
    return [ordered[round(i * (len(ordered) - 1) / (n - 1))] for i in range(n)]


def measure_sensitivity(
    gpu: GpuBackend,
    step: Callable[[], None],
    clocks: int = 5,
    repeats: int = 20,
    warmup: int = 3,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[SensitivityEstimate, dict[int, float]]:
    """Lock each of `clocks` clocks, time `step` (which must block until the GPU is done), fit s.

    Returns the estimate and the median step latency (ms) per clock. The GPU's clocks are reset
    afterwards whatever happens.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    chosen = _spread_clocks(gpu.supported_clocks_mhz(), clocks)
    medians: dict[int, float] = {}
    try:
        for clock in chosen:
            gpu.set_locked_clocks_mhz(clock, clock)
            for _ in range(warmup):
                step()
            samples = []
            for _ in range(repeats):
                started = timer()
                step()
                samples.append((timer() - started) * 1000.0)
            medians[clock] = statistics.median(samples)
    finally:
        gpu.reset_clocks()
    fmax = max(gpu.supported_clocks_mhz())
    value = fit_sensitivity(list(medians), list(medians.values()), fmax)
    detail = f"{gpu.name}: median of {repeats} steps at {len(chosen)} locked clocks " + ", ".join(
        f"{c} MHz {ms:.2f} ms" for c, ms in medians.items()
    )
    return SensitivityEstimate(value, SensitivitySource.NVML_MEASURED, detail), medians


def resolve_model_shape(model: str) -> tuple[ModelShape, Path | None]:
    """A built-in shape by name, or one read from an HF folder (or its config.json); and the folder."""
    path = Path(model).expanduser()
    config = path / "config.json" if path.is_dir() else path
    if config.name == "config.json" and config.exists():
        data = json.loads(config.read_text())
        return ModelShape.from_hf_config(data, name=config.parent.name), config.parent
    return get_model_shape(model), None


def _cuda_decode_step(
    shape: ModelShape, folder: Path | None, batch: int, context_tokens: int
) -> Callable[[], None]:
    """One batched decode step on CUDA (random weights from the shape unless an HF folder is given)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    else:
        # Timing does not depend on the weights' values: a randomly initialised model of the same shape.
        cfg = LlamaConfig(
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab,
            tie_word_embeddings=shape.tied_embeddings,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.to("cuda").eval()
    vocab = int(model.config.vocab_size)
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (batch, context_tokens), device="cuda")
        state = {"past": model(prompt, use_cache=True).past_key_values}
    token = torch.randint(0, vocab, (batch, 1), device="cuda")

    def step() -> None:
        with torch.inference_mode():
            state["past"] = model(token, past_key_values=state["past"], use_cache=True).past_key_values
        torch.cuda.synchronize()

    return step


def run_profile(
    model: str,
    profile: GpuProfile,
    gpu_index: int = 0,
    batch: int = 8,
    context_tokens: int = 1024,
    prompt_tokens: float | None = None,
    output_tokens: float | None = None,
    clocks: int = 5,
    repeats: int = 20,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`muserve profile`: measure s on an NVML GPU when there is one, else the roofline estimate."""
    from services.powerd.nvml_backend import NvmlBackend, nvml_device_count

    shape, folder = resolve_model_shape(model)
    roofline = estimate_sensitivity(shape, profile, batch, context_tokens, prompt_tokens, output_tokens)
    result: dict[str, Any] = {"model": shape.name, "roofline": asdict(roofline)}
    cuda = False
    if nvml_device_count() > gpu_index:
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except ImportError:
            cuda = False
    if not cuda:
        log(
            f"no NVML GPU {gpu_index} with CUDA here: roofline estimate (NOT measured) for {profile.name}: "
            f"s = {roofline.value:.3f} ({roofline.detail})"
        )
        result.update(sensitivity=roofline.value, source=roofline.source.value, detail=roofline.detail)
        return result
    with NvmlBackend(gpu_index) as gpu:
        step = _cuda_decode_step(shape, folder, batch, context_tokens)
        measured, medians = measure_sensitivity(gpu, step, clocks=clocks, repeats=repeats)
    log(f"measured on {gpu.name} via NVML: s = {measured.value:.3f} ({measured.detail})")
    log(f"roofline estimate for comparison ({profile.name}): s = {roofline.value:.3f}")
    result.update(
        sensitivity=measured.value,
        source=measured.source.value,
        detail=measured.detail,
        step_ms_by_clock_mhz={str(k): v for k, v in medians.items()},
    )
    return result
