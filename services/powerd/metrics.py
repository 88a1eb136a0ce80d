"""powerd's Prometheus endpoint: per-GPU power, energy and clocks under DCGM/Triton names, J per token.

Names follow what ops already scrape: Triton's `nv_gpu_power_usage` (W), `nv_energy_consumption`
(J since this powerd started, counter), `nv_gpu_utilization` (0..1), labelled `gpu_uuid`; dcgm-exporter's
`DCGM_FI_DEV_SM_CLOCK` (MHz), `DCGM_FI_DEV_POWER_USAGE` (W), `DCGM_FI_DEV_GPU_UTIL` (%),
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ since driver load / GPU creation, counter), labelled `gpu`,
`UUID`, `device`, `modelName`, `Hostname`. Every GPU series also carries `simulated="true|false"`.
Counters keep their exact names (prometheus_client would append `_total`), so this module writes the
text format itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from services.common.schemas import CompletionRecord, PowerTelemetry

log = logging.getLogger("muserve.powerd")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric family: name, type, help and its samples (labels, value)."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _escape(value: str) -> str:
    """A label value in the text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """A sample value in the text format."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """Prometheus text exposition format 0.0.4, names exactly as given."""
    lines: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{fam.name}{{{body}}} {_number(value)}" if body else f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"


@dataclass
class EnergyTally:
    """Energy and output tokens of one model's completed requests."""

    energy_j: float = 0.0
    output_tokens: int = 0
    requests: int = 0


class EnergyLedger:
    """Per-model request energy and output tokens on one node, from the workers' completion records."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.tallies: dict[tuple[str, bool], EnergyTally] = {}

    def observe(self, rec: CompletionRecord) -> bool:
        """Count a record of a request that ran on this node with an energy estimate; True if counted."""
        if rec.node != self.node or rec.energy_j is None:
            return False
        tally = self.tallies.setdefault((rec.model, bool(rec.energy_simulated)), EnergyTally())
        tally.energy_j += rec.energy_j
        tally.output_tokens += rec.completion_tokens
        tally.requests += 1
        return True

    def joules_per_output_token(self, model: str, simulated: bool) -> float | None:
        """Energy per output token since powerd started (None before the first token)."""
        tally = self.tallies.get((model, simulated))
        if tally is None or tally.output_tokens == 0:
            return None
        return tally.energy_j / tally.output_tokens


@dataclass
class DaemonStats:
    """powerd's own counters, for the endpoint."""

    policy: str
    dry_run: bool
    clock_changes: int = 0
    refused_clocks: int = 0


def _flag(value: bool) -> str:
    return "true" if value else "false"


def gpu_families(
    node: str,
    telemetry: Iterable[PowerTelemetry],
    uuids: dict[int, str],
    energy_base_j: dict[int, float],
) -> list[Family]:
    """Per-GPU families under Triton and DCGM names, from powerd's latest telemetry."""
    nv_power = Family("nv_gpu_power_usage", "gauge", "GPU power usage in watts")
    nv_energy = Family(
        "nv_energy_consumption", "counter", "GPU energy consumption in joules since powerd started"
    )
    nv_util = Family("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0]")
    sm_clock = Family("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).")
    dcgm_power = Family("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).")
    dcgm_util = Family("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).")
    dcgm_energy = Family(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ); simulated GPUs: since powerd created them.",
    )
    locked = Family(
        "muserve_gpu_locked_clock_mhz",
        "gauge",
        "Graphics clock powerd locked (0: driver default; in dry-run the clock it would lock)",
    )
    max_clock = Family("muserve_gpu_max_clock_mhz", "gauge", "Highest supported graphics clock")
    for tel in telemetry:
        sim = _flag(tel.simulated)
        uuid = uuids.get(tel.gpu) or f"{'SIM' if tel.simulated else 'GPU'}-{node}-{tel.gpu}"
        triton = {"gpu_uuid": uuid, "gpu": str(tel.gpu), "simulated": sim}
        dcgm = {
            "gpu": str(tel.gpu),
            "UUID": uuid,
            "device": f"nvidia{tel.gpu}",
            "modelName": tel.name,
            "Hostname": node,
            "simulated": sim,
        }
        nv_power.samples.append((triton, tel.power_w))
        nv_energy.samples.append((triton, max(tel.energy_j - energy_base_j.get(tel.gpu, tel.energy_j), 0.0)))
        nv_util.samples.append((triton, tel.utilization))
        sm_clock.samples.append((dcgm, float(tel.clock_mhz)))
        dcgm_power.samples.append((dcgm, tel.power_w))
        dcgm_util.samples.append((dcgm, round(100.0 * tel.utilization, 3)))
        dcgm_energy.samples.append((dcgm, tel.energy_j * 1000.0))
        locked.samples.append((dcgm, float(tel.locked_clock_mhz or 0)))
        max_clock.samples.append((dcgm, float(tel.max_clock_mhz)))
    return [nv_power, nv_energy, nv_util, sm_clock, dcgm_power, dcgm_util, dcgm_energy, locked, max_clock]


def muserve_families(node: str, ledger: EnergyLedger, stats: DaemonStats) -> list[Family]:
    """muserve's own families: energy per output token per model, and powerd's decisions."""
    per_token = Family(
        "muserve_energy_joules_per_output_token",
        "gauge",
        "Energy attributed to completed requests per output token, since powerd started",
    )
    energy = Family(
        "muserve_node_request_energy_joules_total",
        "counter",
        "Energy attributed to requests completed on this node (each step split over its batch)",
    )
    tokens = Family("muserve_node_output_tokens_total", "counter", "Output tokens of requests completed here")
    for (model, simulated), tally in sorted(ledger.tallies.items()):
        labels = {"model": model, "Hostname": node, "simulated": _flag(simulated)}
        energy.samples.append((labels, tally.energy_j))
        tokens.samples.append((labels, float(tally.output_tokens)))
        jpt = ledger.joules_per_output_token(model, simulated)
        if jpt is not None:
            per_token.samples.append((labels, jpt))
    node_labels = {"Hostname": node, "policy": stats.policy}
    changes = Family("muserve_powerd_clock_changes_total", "counter", "Clock decisions that changed a lock")
    changes.samples.append((node_labels, float(stats.clock_changes)))
    refused = Family(
        "muserve_powerd_refused_clocks_total", "counter", "Clock requests refused (not a supported clock)"
    )
    refused.samples.append((node_labels, float(stats.refused_clocks)))
    dry = Family("muserve_powerd_dry_run", "gauge", "1 when powerd only logs its clock decisions")
    dry.samples.append((node_labels, 1.0 if stats.dry_run else 0.0))
    return [per_token, energy, tokens, changes, refused, dry]


class MetricsServer:
    """aiohttp server for /metrics and /healthz on powerd's event loop."""

    def __init__(self, body: Callable[[], str]) -> None:
        self.body = body
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> bool:
        """Listen; False (logged) when the port cannot be bound: powerd runs on without an endpoint."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            log.error("metrics endpoint disabled: cannot listen on %s:%d: %s", host, port, exc)
            await runner.cleanup()
            return False
        self.runner = runner
        addresses = runner.addresses  # the bound port, also when port 0 asked for any free one
        self.port = int(addresses[0][1]) if addresses else port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return True

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.body().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
            self.runner = None
