"""Frequency sensitivity: roofline estimate, least-squares fit, measurement loop on a fake GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.powerd.gpu import slowdown_factor
from services.powerd.sensitivity import (
    MODEL_SHAPES,
    ModelShape,
    SensitivitySource,
    decode_step_roofline,
    estimate_sensitivity,
    fit_sensitivity,
    get_model_shape,
    measure_sensitivity,
    prefill_roofline,
    resolve_model_shape,
    run_profile,
)
from services.powerd.sim_gpu import SimulatedGpu, get_profile

V100 = get_profile("V100")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("smollm2-135m", 134.5e6),
        ("llama-3.2-1b", 1.236e9),
        ("llama-3.2-3b", 3.213e9),
        ("llama-2-7b", 6.738e9),
    ],
)
def test_parameter_counts_match_the_published_models(name: str, params: float) -> None:
    assert MODEL_SHAPES[name].params == pytest.approx(params, rel=0.002)


def test_shape_from_an_hf_config_and_its_derived_sizes() -> None:
    cfg = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    shape = ModelShape.from_hf_config(cfg, "tiny")
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert shape.params == 2 * per_layer + 64 + 2 * 100 * 64
    assert shape.head_dim == 16 and shape.bytes_per_param == 4.0
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4.0
    assert shape.matmul_params == shape.params - 100 * 64  # the input embedding is a lookup
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_hf_config({"num_hidden_layers": 2}, "broken")


def test_decode_is_memory_bound_and_grows_more_sensitive_with_batch() -> None:
    shape = get_model_shape("llama-3.2-3b")
    s1 = decode_step_roofline(shape, V100, 1, 1024).sensitivity
    s32 = decode_step_roofline(shape, V100, 32, 1024).sensitivity
    assert s1 < 0.05 < s32 < 0.5
    step = decode_step_roofline(shape, V100, 1, 0)
    # Batch 1, no context: reading 6.4 GB of weights at 80% of 900 GB/s.
    assert step.memory_ms == pytest.approx(shape.weight_bytes / (0.8 * 900e9) * 1e3)
    assert prefill_roofline(shape, V100, 1024).sensitivity > 0.85  # prefill is compute bound


def test_estimate_names_its_source_and_mixes_prefill_with_decode() -> None:
    shape = get_model_shape("llama-3.2-3b")
    decode = estimate_sensitivity(shape, V100, batch=8, context_tokens=1024)
    mix = estimate_sensitivity(
        shape, V100, batch=8, context_tokens=1024, prompt_tokens=1024, output_tokens=200
    )
    pre = prefill_roofline(shape, V100, 1024).sensitivity
    assert decode.source is mix.source is SensitivitySource.ROOFLINE
    assert decode.value < mix.value < pre
    assert "V100" in decode.detail and "prefill" in mix.detail
    # A faster memory system (H100 vs V100 relative to its FLOPs) changes the balance.
    assert estimate_sensitivity(shape, get_profile("H100")).value != decode.value


def test_fit_recovers_the_sensitivity_of_exact_data() -> None:
    clocks = [1530, 1200, 900, 600]
    for s in (0.0, 0.3, 0.75, 1.0):
        lat = [12.0 * slowdown_factor(c, 1530, s) for c in clocks]
        assert fit_sensitivity(clocks, lat, 1530) == pytest.approx(s, abs=1e-9)
    with pytest.raises(ValueError):
        fit_sensitivity([1000, 1000], [1.0, 1.0], 1530)
    with pytest.raises(ValueError):
        fit_sensitivity([1000], [1.0], 1530)


def test_measure_locks_each_clock_fits_and_resets() -> None:
    gpu = SimulatedGpu("V100")
    now = [0.0]

    def step() -> None:  # a 10 ms step with true s = 0.4 at the GPU's locked clock
        now[0] += 0.010 * slowdown_factor(gpu.current_clock_mhz(), gpu.max_clock_mhz, 0.4)

    est, medians = measure_sensitivity(gpu, step, clocks=4, repeats=3, warmup=1, timer=lambda: now[0])
    assert est.source is SensitivitySource.NVML_MEASURED
    assert est.value == pytest.approx(0.4, abs=1e-6)
    assert len(medians) == 4 and max(medians) == gpu.max_clock_mhz and min(medians) == gpu.min_clock_mhz
    assert gpu.locked_clocks_mhz is None  # reset afterwards


def test_measure_resets_clocks_even_when_the_step_fails() -> None:
    gpu = SimulatedGpu("A100")

    def boom() -> None:
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        measure_sensitivity(gpu, boom, clocks=3)
    assert gpu.locked_clocks_mhz is None


def test_profile_without_a_gpu_falls_back_to_the_roofline_and_says_so() -> None:
    lines: list[str] = []
    result = run_profile("smollm2-135m-instruct", V100, batch=4, log=lines.append)
    assert result["source"] == "roofline" and 0.0 <= result["sensitivity"] <= 1.0
    assert result["model"] == "smollm2-135m"
    assert any("NOT measured" in line for line in lines)


def test_model_shapes_resolve_by_name_or_folder(tmp_path: Path) -> None:
    assert get_model_shape("Llama-3.2-3B-Instruct").name == "llama-3.2-3b"
    with pytest.raises(ValueError, match="unknown model shape"):
        get_model_shape("gpt-17")
    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape, folder = resolve_model_shape(str(tmp_path))
    assert folder == tmp_path and shape.hidden == 32 and shape.kv_heads == 2
