"""powerd's /metrics: DCGM/Triton names, energy per output token, served over real HTTP (no NATS)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.schemas import CompletionRecord, QueueTelemetry, StepTelemetry, WorkerRef
from services.common.settings import Settings
from services.powerd.metrics import EnergyLedger, Family, MetricsServer, render
from services.powerd.service import PowerDaemon, snapshot_for_gpu


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name -> samples, through prometheus_client's own parser (so the format is valid)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(dict(s.labels), s.value) for s in fam.samples]
    return out


def record(model: str, tokens: int, energy_j: float | None, node: str = "n1") -> CompletionRecord:
    return CompletionRecord(
        request_id=f"{model}-{tokens}-{energy_j}",
        model=model,
        prompt_tokens=5,
        completion_tokens=tokens,
        finish_reason="length",
        queue_ms=1.0,
        exec_ms=100.0,
        energy_j=energy_j,
        energy_simulated=True,
        node=node,
        gpu=0,
    )


def test_render_keeps_counter_names_and_escapes_labels() -> None:
    fam = Family("nv_energy_consumption", "counter", "energy", [({"gpu_uuid": 'a"b\\c'}, 12.5)])
    text = render([fam, Family("empty", "gauge", "no samples")])
    assert "# TYPE nv_energy_consumption counter\n" in text
    assert 'nv_energy_consumption{gpu_uuid="a\\"b\\\\c"} 12.5\n' in text
    assert "empty" not in text  # families without samples are left out
    parsed = list(text_string_to_metric_families(text))
    assert parsed[0].type == "counter" and parsed[0].samples[0].labels == {"gpu_uuid": 'a"b\\c'}


def test_ledger_counts_only_this_nodes_requests_with_energy() -> None:
    ledger = EnergyLedger("n1")
    assert ledger.observe(record("m", 10, 5.0))
    assert ledger.observe(record("m", 30, 7.0))
    assert not ledger.observe(record("m", 10, 99.0, node="n2"))  # another node's powerd counts it
    assert not ledger.observe(record("m", 10, None))  # no power telemetry yet: no estimate
    assert ledger.joules_per_output_token("m", simulated=True) == pytest.approx(12.0 / 40)
    assert ledger.joules_per_output_token("m", simulated=False) is None
    assert ledger.joules_per_output_token("other", simulated=True) is None


def sim_daemon(tmp_path: Path, **powerd: object) -> PowerDaemon:
    settings = Settings(
        node="n1",
        data_dir=tmp_path,
        powerd={"backend": "sim", "profile": "v100", "gpus": 2, "policy": "queue-threshold", **powerd},
    )
    return PowerDaemon(settings, nc=None)  # type: ignore[arg-type]  # control() does no I/O


def test_metrics_text_has_dcgm_and_triton_names_per_gpu(tmp_path: Path) -> None:
    d = sim_daemon(tmp_path)
    d.steps[0] = StepTelemetry(
        worker_id="w",
        node="n1",
        gpu=0,
        ts_s=10.0,
        interval_ms=500.0,
        steps=4,
        busy_ms=250.0,
        tokens=8,
        mean_batch=2.0,
        slowdown=1.0,
    )
    first = d.control(10.0)
    d.ledger.observe(record("smollm2", 40, 8.0))
    d.gpus[0].set_utilization(0.5)  # type: ignore[attr-defined]
    metrics = parse(d.metrics_text())
    power = {lab["gpu"]: v for lab, v in metrics["nv_gpu_power_usage"]}
    assert set(power) == {"0", "1"} and power["0"] == pytest.approx(first[0].power_w)
    for name in ("nv_gpu_power_usage", "nv_energy_consumption", "nv_gpu_utilization"):
        for labels, _ in metrics[name]:
            assert labels["simulated"] == "true" and labels["gpu_uuid"] == f"SIM-n1-{labels['gpu']}"
    clock = {lab["gpu"]: (lab, v) for lab, v in metrics["DCGM_FI_DEV_SM_CLOCK"]}
    labels, mhz = clock["0"]
    assert mhz == first[0].clock_mhz and labels["modelName"] == "V100-SXM2-16GB (simulated)"
    assert labels["Hostname"] == "n1" and labels["device"] == "nvidia0" and labels["simulated"] == "true"
    assert dict((lab["gpu"], v) for lab, v in metrics["DCGM_FI_DEV_POWER_USAGE"]) == power
    util = dict((lab["gpu"], v) for lab, v in metrics["DCGM_FI_DEV_GPU_UTIL"])
    assert util["0"] == pytest.approx(50.0) and util["1"] == 0.0
    # Energy since powerd started: zero at the first interval, then it grows with the integral.
    assert all(v == 0.0 for _, v in metrics["nv_energy_consumption"])
    later = d.control(11.0)
    energy = dict((lab["gpu"], v) for lab, v in parse(d.metrics_text())["nv_energy_consumption"])
    assert energy["0"] == pytest.approx(later[0].energy_j - first[0].energy_j) and energy["0"] > 0
    jpt = metrics["muserve_energy_joules_per_output_token"]
    assert jpt == [({"model": "smollm2", "Hostname": "n1", "simulated": "true"}, pytest.approx(0.2))]
    assert metrics["muserve_powerd_dry_run"][0][1] == 0.0
    assert (
        metrics["muserve_powerd_clock_changes"][0][1] == 2.0
    )  # both idle GPUs went down (parser drops _total)


async def test_metrics_endpoint_over_http(tmp_path: Path) -> None:
    d = sim_daemon(tmp_path)
    d.control(1.0)
    server = MetricsServer(d.metrics_text)
    assert await server.start("127.0.0.1", 0)  # port 0: any free port, read back
    assert server.port
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                metrics = parse(await resp.text())
            async with http.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
                assert (await resp.json()) == {"ok": True}
        assert {lab["gpu"] for lab, _ in metrics["DCGM_FI_DEV_SM_CLOCK"]} == {"0", "1"}
        # A second server on the same port cannot bind: it says so instead of raising.
        clash = MetricsServer(d.metrics_text)
        assert not await clash.start("127.0.0.1", server.port)
    finally:
        await server.stop()


def queue(**extra: object) -> QueueTelemetry:
    fields: dict[str, object] = {
        "group": "chat",
        "ts_s": 1.0,
        "depth": 4,
        "running": 2,
        "predicted_work_ms": 400.0,
        "running_work_ms": 100.0,
        "oldest_wait_ms": 50.0,
        "arrivals_per_s": 6.0,
        "completions_per_s": 1.0,
        "workers": [
            WorkerRef(worker_id="a", node="n1", gpu=0, slots=2),
            WorkerRef(worker_id="b", node="n2", gpu=0, slots=2),
        ],
        "policy": "ssjf",
    }
    fields.update(extra)
    return QueueTelemetry.model_validate(fields)


def test_snapshot_passes_the_schedulers_slo_figures_to_the_policy() -> None:
    old = snapshot_for_gpu("n1", 0, [queue()])
    assert old.arrivals_per_s == pytest.approx(3.0)  # an older scheduler: the raw rate, halved
    assert old.slack_slowdown is None and old.slo_attainment is None and old.mean_exec_ms == 0.0
    new = snapshot_for_gpu(
        "n1",
        0,
        [
            queue(
                mean_arrivals_per_s=2.0,
                mean_exec_ms=300.0,
                slo_scale=5.0,
                slack_slowdown=3.0,
                slo_attainment=1.0,
            ),
            queue(group="other", mean_exec_ms=500.0, slo_scale=4.0, slack_slowdown=1.5, slo_attainment=0.9),
        ],
    )
    assert new.arrivals_per_s == pytest.approx(1.0 + 3.0)  # smoothed where published, raw otherwise
    assert new.mean_exec_ms == 500.0 and new.slo_scale == 4.0  # longest requests, tightest SLO
    assert new.slack_slowdown == 1.5 and new.slo_attainment == 0.9
    assert new.slots == 4 and new.queue_slots == 8
