"""The discrete-event simulator: conservation, energy bounds, scheduling and clock effects (small, CPU)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from services.powerd.sensitivity import get_model_shape
from services.powerd.sim_gpu import get_profile
from services.sim import ConfusionPredictor, SimConfig, StepModel, Workload, make_workload, simulate
from services.sim.engine import _steps_within
from services.sim.predictor import predict_tokens
from services.sim.report import SimPlan, provision_gpus, run_sim
from services.sim.step_model import calibration_from_step_stats, fit_decode_samples, fit_prefill_samples
from services.sim.workload import azure_trace, gamma_arrivals, load_azure_csv, poisson_arrivals

V100 = get_profile("V100")
STEPS = StepModel.roofline(get_model_shape("llama-3.2-3b"), V100)
# Always the low clock (0.4 x max): "low" holds while depth + running <= an unreachable bound.
ALWAYS_LOW = {"low_fraction": 0.4, "high_depth": 10**9, "low_depth": 10**9 - 1}


def config(**kw: object) -> SimConfig:
    """A small cluster."""
    base = SimConfig(profile=V100, step_model=STEPS, gpus=2, slots=4, sensitivity=0.3)
    return replace(base, **kw)  # type: ignore[arg-type]


def workload(n: int = 400, rate: float = 3.0, seed: int = 1) -> Workload:
    """Poisson arrivals, synthetic log-normal lengths."""
    return poisson_arrivals(rate, n, seed=seed)


def skewed(n: int = 300, rate: float = 1.2, seed: int = 2) -> Workload:
    """Nine short requests for each long one, short prompts: where shortest-job-first pays off."""
    rng = np.random.default_rng(seed)
    out = np.where(rng.random(n) < 0.1, 600, 20).astype(np.int64)
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    return Workload("skewed", arrival, np.full(n, 64, dtype=np.int64), out)


def test_every_request_completes_once_and_in_order_of_its_own_events() -> None:
    w = workload()
    for sched in ("fcfs", "ssjf", "oracle"):
        for pol in ("max-clock", "queue-threshold", "slo-aware"):
            res = simulate(w, config(scheduling=sched, clock_policy=pol), ConfusionPredictor.default())
            assert len(res.jct_ms) == len(w)
            assert np.all(np.isfinite(res.jct_ms)) and np.all(res.jct_ms > 0)
            assert np.all(res.wait_ms >= -1e-9) and np.all(res.ttft_ms >= res.wait_ms - 1e-9)
            assert np.all(res.jct_ms >= res.ttft_ms - 1e-9)
            assert res.makespan_s == pytest.approx(float(np.max(w.arrival_s + res.jct_ms / 1000.0)))
            # Nobody beats their own time alone at max clock (the SLO's yardstick).
            assert np.all(res.jct_ms >= res.slo_ms / res.config.slo_scale - 1e-6)


def test_energy_is_bounded_by_idle_and_peak_power() -> None:
    w = workload()
    for pol in ("max-clock", "slo-aware"):
        res = simulate(w, config(clock_policy=pol), ConfusionPredictor.default())
        gpus = res.config.gpus
        assert res.total_energy_j >= V100.idle_power_w * res.makespan_s * gpus - 1e-6
        assert res.total_energy_j <= V100.max_power_w * res.makespan_s * gpus + 1e-6
        for e, busy in zip(res.energy_j, res.busy_s, strict=True):
            assert e >= V100.idle_power_w * res.makespan_s - 1e-6  # per GPU, too
            assert 0.0 <= busy <= res.makespan_s + 1e-9
        # The timeline integrates to the same energy.
        bin_s = res.config.timeline_bin_s
        widths = np.full(len(res.timeline_power_w), bin_s)
        widths[-1] = res.makespan_s - (len(widths) - 1) * bin_s
        assert float(np.sum(res.timeline_power_w * widths)) == pytest.approx(res.total_energy_j, rel=1e-9)
    max_run = simulate(w, config(clock_policy="max-clock"), ConfusionPredictor.default())
    busy = float(max_run.busy_s.sum())
    expected = V100.max_power_w * busy + V100.idle_power_w * (max_run.makespan_s * 2 - busy)
    assert max_run.total_energy_j == pytest.approx(expected, rel=1e-9)


def test_ssjf_beats_fcfs_on_mean_jct_for_a_skewed_workload() -> None:
    w = skewed()
    cfg = config(gpus=1, slots=1)
    exact = ConfusionPredictor.from_rows(np.eye(5).tolist(), "exact classes")
    fcfs = simulate(w, replace(cfg, scheduling="fcfs"), exact)
    ssjf = simulate(w, replace(cfg, scheduling="ssjf"), exact)
    oracle = simulate(w, replace(cfg, scheduling="oracle"), None)
    assert ssjf.jct_ms.mean() < 0.8 * fcfs.jct_ms.mean()
    assert oracle.jct_ms.mean() <= ssjf.jct_ms.mean() * 1.05
    # With the measured (imperfect) predictor SSJF still wins, by less.
    noisy = simulate(w, replace(cfg, scheduling="ssjf"), ConfusionPredictor.default())
    assert ssjf.jct_ms.mean() <= noisy.jct_ms.mean() < fcfs.jct_ms.mean()


def test_a_slower_clock_draws_less_power_and_takes_longer() -> None:
    w = workload(rate=1.0)
    fast = simulate(w, config(clock_policy="max-clock"), None)
    slow = simulate(w, config(clock_policy="queue-threshold", clock_policy_kwargs=ALWAYS_LOW), None)
    assert slow.summary()["mean_busy_clock_mhz"] < 0.45 * V100.max_clock_mhz
    assert slow.total_energy_j / slow.makespan_s < fast.total_energy_j / fast.makespan_s
    assert slow.jct_ms.mean() > fast.jct_ms.mean()
    assert slow.ttft_ms.mean() > fast.ttft_ms.mean()


def test_slo_aware_saves_energy_against_max_clock_at_light_load() -> None:
    w = workload(rate=1.0)
    fast = simulate(w, config(clock_policy="max-clock", scheduling="ssjf"), ConfusionPredictor.default())
    aware = simulate(w, config(clock_policy="slo-aware", scheduling="ssjf"), ConfusionPredictor.default())
    assert aware.total_energy_j < 0.8 * fast.total_energy_j
    assert aware.slo_attainment >= 0.95
    assert aware.clock_changes > 0 and fast.clock_changes == 0


def test_the_run_is_deterministic_for_a_seed() -> None:
    w = workload(n=200)
    a = simulate(w, config(clock_policy="slo-aware"), ConfusionPredictor.default())
    b = simulate(w, config(clock_policy="slo-aware"), ConfusionPredictor.default())
    assert np.array_equal(a.jct_ms, b.jct_ms) and a.total_energy_j == b.total_energy_j


def test_steps_within_matches_brute_force() -> None:
    def total(n: int, step0: float, bcb: float) -> float:
        return n * step0 + bcb * n * (n - 1) / 2.0

    for step0, bcb in ((10.0, 0.0), (9.3, 0.02), (1.0, 0.5)):
        for dt in (0.0, 5.0, 10.0, 123.4, 1e4):
            k = _steps_within(step0, bcb, dt)
            assert total(k, step0, bcb) <= dt + 1e-9 < total(k + 1, step0, bcb)


def test_step_model_solo_time_and_clock_scaling() -> None:
    sm = STEPS
    p, n = 100, 5
    manual = sm.prefill_ms(p) + sum(sm.decode_ms(1, p + 1 + j) for j in range(n - 1))
    assert float(sm.solo_ms([p], [n])[0]) == pytest.approx(manual)
    # Decode is mostly memory: halving the clock costs little; prefill is mostly compute.
    assert sm.decode_ms(1, 1000, 2.0) / sm.decode_ms(1, 1000) < 1.1
    assert sm.prefill_ms(1000, 2.0) / sm.prefill_ms(1000) > 1.8
    assert "roofline" in sm.source


def test_step_model_from_a_calibration_file(tmp_path: Path) -> None:
    samples = [(b, c, 5.0 + 0.5 * b + 0.001 * c) for b in (1, 2, 4, 8) for c in (100, 2000, 8000)]
    assert fit_decode_samples(samples) == pytest.approx((5.0, 0.5, 0.001))
    path = tmp_path / "cal.json"
    rows = [{"batch": b, "context_tokens": c, "step_ms": ms} for b, c, ms in samples]
    path.write_text(json.dumps({"decode_samples": rows, "source": "worker step stats"}))
    sm = StepModel.from_json(path, base=STEPS)
    assert sm.decode_memory_ms == pytest.approx(5.0) and sm.source == "worker step stats"
    assert sm.prefill_compute_ms_per_token == STEPS.prefill_compute_ms_per_token  # kept from the base
    (tmp_path / "bad.json").write_text(json.dumps({"decode_memory_ms": 1.0, "warp": 2}))
    with pytest.raises(ValueError, match="unknown step-model keys"):
        StepModel.from_json(tmp_path / "bad.json", base=STEPS)


@dataclass(frozen=True)
class FakeStep:
    """The fields of the worker engine's StepStats that calibration reads."""

    kind: str
    batch_size: int
    num_tokens: int
    latency_ms: float
    context_tokens: int


def test_calibration_from_worker_step_stats() -> None:
    steps = [
        FakeStep("decode", b, b, 3.0 + 0.2 * b + 0.002 * c, c) for b in (1, 2, 4) for c in (50, 500, 5000)
    ]
    steps += [FakeStep("prefill", 1, p, 4.0 + 0.05 * p + 1e-5 * p * p, p) for p in (16, 128, 512, 1024)]
    cal = calibration_from_step_stats(steps, "SmolLM2 on this CPU")
    sm = StepModel.from_mapping(cal)
    assert sm.source == "SmolLM2 on this CPU"
    assert (sm.decode_memory_ms, sm.decode_compute_ms_per_seq, sm.decode_memory_ms_per_ctx) == pytest.approx(
        (3.0, 0.2, 0.002)
    )
    assert fit_prefill_samples([(st.num_tokens, st.latency_ms) for st in steps[9:]]) == pytest.approx(
        (4.0, 0.05, 1e-5), rel=1e-6
    )
    assert sm.prefill_ms(100) == pytest.approx(4.0 + 5.0 + 0.1)
    with pytest.raises(ValueError, match="incomplete"):
        StepModel.from_mapping({"decode_samples": cal["decode_samples"]})  # no prefill constants


def test_confusion_predictor_samples_its_rows() -> None:
    pred = ConfusionPredictor.default()
    assert pred.classes == 5 and np.allclose(pred.matrix.sum(axis=1), 1.0)
    rng = np.random.default_rng(0)
    got = pred.sample(np.full(20_000, 2), rng)
    freq = np.bincount(got, minlength=5) / got.size
    assert np.allclose(freq, pred.matrix[2], atol=0.015)
    out = np.arange(1, 1001)
    tokens, cls = predict_tokens(out, pred, np.random.default_rng(0))
    assert tokens.shape == out.shape and set(np.unique(cls)) <= set(range(pred.classes))
    # Each predicted class's tokens is that class's representative length: one value per class.
    assert all(len(np.unique(tokens[cls == c])) == 1 for c in np.unique(cls))
    oracle, _ = predict_tokens(out, None, np.random.default_rng(0))
    assert np.array_equal(oracle, out)
    with pytest.raises(ValueError):
        ConfusionPredictor.from_rows([[1.0, 0.0]], "not square")


def test_workloads(tmp_path: Path) -> None:
    p = poisson_arrivals(10.0, 5000, seed=3)
    assert p.rate_per_s == pytest.approx(10.0, rel=0.05)
    gaps = np.diff(gamma_arrivals(10.0, 5000, cv=3.0, seed=3).arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)
    csv = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.1805900,10,0\n"
        "2023-11-16 18:15:48.6805900,50,7\n"
    )
    trace = load_azure_csv(csv)
    assert trace.arrival_s.tolist() == pytest.approx([0.0, 0.5, 2.0])
    assert trace.output_tokens.tolist() == [44, 1, 7]  # zero-token answers count as one
    doubled = azure_trace(csv, load=2.0, requests=7)
    assert len(doubled) == 7 and np.all(np.diff(doubled.arrival_s) >= 0)
    assert doubled.arrival_s[3] == pytest.approx((2.0 + 1.0) / 2.0)  # repeated after one period
    assert len(make_workload("azure-conv", data_dir=tmp_path)) == 3
    assert len(make_workload("poisson", requests=50, data_dir=tmp_path)) == 50  # lengths from the trace
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("bursty")
    with pytest.raises(ValueError, match="needs data_dir"):
        make_workload("azure-code")


def test_provisioning_finds_the_smallest_cluster_meeting_the_slo() -> None:
    w = workload(n=600, rate=4.0)
    n, tried = provision_gpus(w, config(), ConfusionPredictor.default(), target=0.99)
    assert tried[n] >= 0.99 and all(a < 0.99 for m, a in tried.items() if m < n)


def test_report_end_to_end(tmp_path: Path) -> None:
    plan = SimPlan(
        data_dir=None,
        out_dir=tmp_path,
        workload="poisson",
        requests=300,
        slots=4,
        gpus=2,
        sweep_loads=(),
        speed_gpus=4,
        speed_requests=500,
        progress=False,
    )
    report = run_sim(plan, log=lambda _m: None)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"sim.{ext}").stat().st_size > 0
    data = json.loads((tmp_path / "sim.json").read_text())
    assert data["simulated"] is True and len(data["own_load"]) == 9 and len(data["low_load"]) == 9
    assert data["own_load"]["ssjf/max-clock"]["energy_ratio_vs_max_clock"] == 1.0
    assert data["speed"]["requests"] == 500 and report["targets"]
    assert "SIMULATED" in (tmp_path / "sim.md").read_text()


def test_independent_groups_merge_into_one_result_in_request_order() -> None:
    from services.sim.groups import simulate_groups, split_workload

    w = workload(n=600, rate=6.0)
    cfg = config(gpus=4, clock_policy="slo-aware")
    merged = simulate_groups(w, cfg, ConfusionPredictor.default(), groups=2, processes=2)
    serial = simulate_groups(w, cfg, ConfusionPredictor.default(), groups=2, processes=1)
    # Processes change nothing: the same groups, the same seeds, the same figures.
    assert np.array_equal(merged.jct_ms, serial.jct_ms) and merged.events == serial.events
    parts = split_workload(w, 2, cfg.seed)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(w)))
    # Each group is exactly a cluster of its own: re-simulate group 0 alone and compare.
    idx = parts[0]
    alone = simulate(
        Workload("g0", w.arrival_s[idx], w.prompt_tokens[idx], w.output_tokens[idx]),
        replace(cfg, gpus=2, seed=cfg.seed),
        ConfusionPredictor.default(),
    )
    assert np.allclose(merged.jct_ms[idx], alone.jct_ms)
    assert len(merged.energy_j) == 4 and merged.config.gpus == 4
    assert merged.total_energy_j >= alone.total_energy_j
    assert np.all(merged.jct_ms > 0) and 0.0 < merged.slo_attainment <= 1.0
    with pytest.raises(ValueError, match="one GPU per group"):
        simulate_groups(w, config(gpus=1), None, groups=2)
