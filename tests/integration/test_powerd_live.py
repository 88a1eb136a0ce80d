"""Energy accounting end to end on a real cluster (simulated GPU): usage.energy_j, completion records,
powerd's /metrics (DCGM/Triton names, J per output token) and the SLO fields of queue telemetry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import subjects
from services.common.settings import DEFAULT_CHAT_MODEL
from services.launcher import ServiceSpec, free_port
from tests.integration.harness import LiveCluster, start_cluster

METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def power_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    """Scheduler, gateway, powerd (slo-aware, metrics on a free port) and one 2-layer SmolLM2 worker."""
    env = {
        "MUSERVE_NODE": "energynode",
        "MUSERVE_POWERD__POLICY": "slo-aware",
        "MUSERVE_POWERD__GPUS": "1",
        "MUSERVE_POWERD__METRICS_PORT": str(METRICS_PORT),
        "MUSERVE_WORKER__MAX_SEQS": "2",
    }
    specs = [
        ServiceSpec("scheduler"),
        ServiceSpec("gateway"),
        ServiceSpec("powerd"),
        ServiceSpec("worker", env={"MUSERVE_WORKER__GPU": "0"}),
    ]
    yield from start_cluster(tmp_path_factory.mktemp("energy"), specs, env, [DEFAULT_CHAT_MODEL])


async def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{METRICS_PORT}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        f.name: [(dict(s.labels), s.value) for s in f.samples] for f in text_string_to_metric_families(text)
    }


async def complete(http: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, Any]:
    body = {"model": DEFAULT_CHAT_MODEL, "prompt": "Count:", "max_tokens": tokens, "ignore_eos": True}
    async with http.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        usage: dict[str, Any] = (await resp.json())["usage"]
        return usage


async def test_energy_flows_from_steps_to_usage_records_and_metrics(power_cluster: LiveCluster) -> None:
    nc = await nats.connect(power_cluster.nats_url)
    records: list[dict[str, Any]] = []
    queue_tel: list[dict[str, Any]] = []

    async def on_record(msg: Any) -> None:
        records.append(msgpack.unpackb(msg.data))

    async def on_queue(msg: Any) -> None:
        queue_tel.append(msgpack.unpackb(msg.data))

    await nc.subscribe(subjects.completions(DEFAULT_CHAT_MODEL), cb=on_record)
    await nc.subscribe(subjects.queue_telemetry("chat"), cb=on_queue)
    try:
        # The worker prices energy from powerd's telemetry: wait until powerd has published.
        for _ in range(100):
            if (await scrape()).get("nv_gpu_power_usage"):
                break
            await asyncio.sleep(0.1)
        before = await scrape()
        async with aiohttp.ClientSession() as http:
            usages = await asyncio.gather(*(complete(http, power_cluster.gateway, n) for n in (8, 12, 16)))
        for u in usages:
            assert u["energy_simulated"] is True and u["energy_j"] > 0
        for _ in range(50):
            if len(records) >= 3 and queue_tel and queue_tel[-1].get("slo_completions", 0) >= 3:
                break
            await asyncio.sleep(0.1)
        mine = [r for r in records if r["completion_tokens"] in (8, 12, 16)]
        assert len(mine) == 3
        for r in mine:
            assert r["node"] == "energynode" and r["gpu"] == 0 and r["energy_simulated"] is True
            assert 0 < r["exec_max_clock_ms"] <= r["exec_ms"]  # the clock's stretch taken out
        # The gateway rounds usage to micro-joules; the record carries the worker's own figure.
        assert sorted(r["energy_j"] for r in mine) == pytest.approx(
            sorted(u["energy_j"] for u in usages), abs=1e-6
        )
        after = await scrape()
        # Per GPU, DCGM and Triton names, labelled simulated.
        (power,) = after["nv_gpu_power_usage"]
        assert power[0]["simulated"] == "true" and power[0]["gpu"] == "0" and power[1] >= 40.0
        (energy,) = after["nv_energy_consumption"]
        assert energy[1] > before["nv_energy_consumption"][0][1]
        (clock,) = after["DCGM_FI_DEV_SM_CLOCK"]
        assert clock[0]["Hostname"] == "energynode" and 135 <= clock[1] <= 1530
        assert after["DCGM_FI_DEV_POWER_USAGE"][0][0]["simulated"] == "true"
        # J per output token of the model = the requests' own energy over their tokens.
        (jpt,) = after["muserve_energy_joules_per_output_token"]
        assert jpt[0] == {"model": DEFAULT_CHAT_MODEL, "Hostname": "energynode", "simulated": "true"}
        total_j = sum(u["energy_j"] for u in usages)
        assert jpt[1] == pytest.approx(total_j / 36, rel=1e-6)
        # The scheduler now publishes what the SLO-aware policy needs.
        tel = queue_tel[-1]
        assert tel["slo_scale"] == 5.0 and tel["slo_completions"] >= 3
        # Whether these 3 met 5x their solo time depends on what else loads the CPU (a timing question
        # for benchmarks; the rule is unit-tested): here, attainment is published over whole completions.
        met = tel["slo_attainment"] * tel["slo_completions"]
        assert 0.0 <= tel["slo_attainment"] <= 1.0 and met == pytest.approx(round(met))
        assert tel["mean_exec_ms"] > 0 and tel["mean_arrivals_per_s"] > 0 and tel["window_s"] > 0
    finally:
        await nc.close()


def test_powerd_status_reports_safety_state(power_cluster: LiveCluster) -> None:
    async def status() -> dict[str, Any]:
        nc = await nats.connect(power_cluster.nats_url)
        try:
            msg = await nc.request(subjects.status("powerd"), b"", timeout=5)
            result: dict[str, Any] = json.loads(msg.data)
            return result
        finally:
            await nc.close()

    info = asyncio.run(status())
    assert info["dry_run"] is False and info["metrics_port"] == METRICS_PORT
    assert info["watchdog_pid"] is None  # simulated GPUs only: nothing outlives powerd, no watchdog
    assert not (Path(power_cluster.env["MUSERVE_DATA_DIR"]) / "powerd").exists()  # no real GPU locked
