"""`muserve calibrate`: the real worker engine's steps fitted into a step model the simulator runs on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.powerd.sim_gpu import get_profile
from services.sim.calibrate import calibrate_engine, calibrate_worker
from services.sim.engine import SimConfig, simulate
from services.sim.step_model import StepModel
from services.sim.workload import make_workload
from services.worker.engine import ContinuousBatchingEngine
from services.worker.models import ensure_smollm2, load_causal_lm


def test_engine_steps_cover_every_batch_and_prompt(cache_dir: Path) -> None:
    model, tok = load_causal_lm(ensure_smollm2(cache_dir), dtype="float32", num_hidden_layers=2)
    engine = ContinuousBatchingEngine(model, tok, max_seqs=4, seed=0)
    stats = calibrate_engine(engine, prompt_tokens=(8, 64), decode_tokens=6)
    decode = [s for s in stats if s.kind == "decode"]
    prefill = [s for s in stats if s.kind == "prefill"]
    assert {s.batch_size for s in decode} == {1, 2, 4}  # 1, then even sizes up to max_seqs
    assert sorted({s.num_tokens for s in prefill}) == [8, 64]  # the warm-up is not kept
    # Every sequence decodes exactly decode_tokens - 1 steps after its prefill (ignore_eos).
    assert sum(s.batch_size for s in decode) == (1 + 2 + 4) * 2 * 5
    assert all(s.latency_ms > 0 for s in stats)
    with pytest.raises(ValueError, match="batch sizes"):
        calibrate_engine(engine, batches=[5])
    with pytest.raises(ValueError, match="decode_tokens"):
        calibrate_engine(engine, decode_tokens=1)


def test_calibration_file_drives_the_simulator(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    data = calibrate_worker(
        out,
        cache_dir=cache_dir,
        dtype="float32",
        num_hidden_layers=2,
        max_seqs=2,
        prompt_tokens=(8, 32, 64),
        decode_tokens=8,
        show_progress=False,
        log=lambda _m: None,
    )
    saved = json.loads(out.read_text())
    assert saved["measured"]["steps"] == len(saved["decode_samples"]) + len(saved["prefill_samples"])
    assert "2 layers" in saved["source"] and data["fitted"] == saved["fitted"]
    sm = StepModel.from_json(out)
    assert sm.source == saved["source"] and sm.clock_share == 0.6  # the model's default s
    assert sm.decode_ms(1, 10) > 0 and sm.prefill_ms(32) > sm.prefill_memory_ms * 0.99
    assert sm.decode_memory_ms == pytest.approx(saved["fitted"]["decode_memory_ms"])
    w = make_workload("poisson", requests=200, rate_per_s=2.0, seed=0)
    res = simulate(w, SimConfig(profile=get_profile("V100"), step_model=sm, gpus=1, slots=2), None)
    assert res.slo_attainment > 0 and np.all(np.isfinite(res.jct_ms))


def test_clock_share_scales_every_term_uniformly() -> None:
    base = StepModel(
        decode_memory_ms=10.0,
        decode_compute_ms_per_seq=2.0,
        decode_memory_ms_per_ctx=0.01,
        decode_compute_ms_per_ctx=0.0,
        prefill_memory_ms=5.0,
        prefill_compute_ms_per_token=0.5,
        prefill_compute_ms_per_token_sq=1e-4,
    )
    shared = StepModel(**{**base.to_dict(), "clock_share": 0.6})
    for x in (1.0, 1.5, 3.0):  # t(f) = t(fmax) * (s * fmax / f + 1 - s) for the whole step
        assert shared.decode_ms(4, 800, x) == pytest.approx(base.decode_ms(4, 800) * (0.6 * x + 0.4))
        assert shared.prefill_ms(300, x) == pytest.approx(base.prefill_ms(300) * (0.6 * x + 0.4))
    # Without a clock share the roofline split holds: the fixed decode term ignores the clock.
    assert base.decode_ms(1, 0, 2.0) == pytest.approx(10.0 + 2.0 * 2.0)
    assert np.allclose(shared.solo_ms([10, 500], [5, 300]), base.solo_ms([10, 500], [5, 300]))
    with pytest.raises(ValueError, match="clock_share"):
        StepModel(**{**base.to_dict(), "clock_share": 1.5})
    # The simulator honours it: at a lower clock a run takes longer with the share than without.
    w = make_workload("poisson", requests=100, rate_per_s=0.02, seed=0)  # no queueing
    cfg = SimConfig(
        profile=get_profile("V100"), step_model=base, gpus=1, slots=4, clock_policy="queue-threshold"
    )
    slow_base = simulate(w, cfg, None).jct_ms.mean()
    slow_shared = simulate(w, SimConfig(**{**cfg.__dict__, "step_model": shared}), None).jct_ms.mean()
    assert slow_shared > slow_base
