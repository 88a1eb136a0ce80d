"""powerd: one per node; reads queue and step telemetry, sets each GPU's clock, accounts energy."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import subjects
from services.common.codec import CodecError, decode, encode
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import PowerTelemetry, QueueTelemetry, StepTelemetry
from services.common.settings import Settings
from services.powerd.gpu import GpuBackend, GpuError, make_gpu
from services.powerd.policy import ClockPolicy, QueueSnapshot, make_clock_policy
from services.powerd.sim_gpu import SimulatedGpu

log = logging.getLogger("muserve.powerd")


def snapshot_for_gpu(
    node: str, gpu: int, queues: list[QueueTelemetry], sensitivity: dict[str, float] | None = None
) -> QueueSnapshot:
    """The share of each group's queue that lands on one GPU (by its share of the group's slots)."""
    depth = running = 0.0
    work_ms = oldest_ms = rate = 0.0
    slots = pooled = 0
    s: float | None = None
    for q in queues:
        total_slots = sum(w.slots for w in q.workers) or 1
        mine = sum(w.slots for w in q.workers if w.node == node and w.gpu == gpu)
        if mine == 0:
            continue
        share = mine / total_slots
        depth += q.depth * share
        running += q.running * share
        work_ms += (q.predicted_work_ms + q.running_work_ms) * share
        oldest_ms = max(oldest_ms, q.oldest_wait_ms)
        rate += q.arrivals_per_s * share
        slots += mine
        pooled += total_slots
        if sensitivity and q.group in sensitivity:
            s = max(s or 0.0, sensitivity[q.group])  # one clock for the GPU: the most sensitive group
    return QueueSnapshot(
        depth=round(depth),
        running=round(running),
        predicted_work_ms=work_ms,
        oldest_wait_ms=oldest_ms,
        arrivals_per_s=rate,
        slots=max(slots, 1),
        sensitivity=s,
        queue_slots=max(pooled, slots, 1),
    )


class PowerDaemon:
    """Controls the GPUs of one node."""

    def __init__(self, settings: Settings, nc: Client) -> None:
        self.settings = settings
        self.cfg = settings.powerd
        self.nc = nc
        self.gpus: list[GpuBackend] = [
            make_gpu(self.cfg.backend, i, self.cfg.profile) for i in range(self.cfg.gpus)
        ]
        extra = {"slo_scale": self.cfg.slo_scale} if self.cfg.policy == "slo-aware" else {}
        self.policies: list[ClockPolicy] = [make_clock_policy(self.cfg.policy, **extra) for _ in self.gpus]
        # Per group: the highest frequency sensitivity of its models (what the SLO-aware policy plans with).
        self.sensitivity: dict[str, float] = {}
        for group in settings.groups:
            if models := settings.models_in(group):
                self.sensitivity[group] = max(m.sensitivity for m in models)
        self.queues: dict[str, QueueTelemetry] = {}
        self.steps: dict[int, StepTelemetry] = {}
        self.locked: dict[int, int | None] = {g.index: None for g in self.gpus}
        self.dry_run = self.cfg.dry_run
        self.started_s = time.time()
        self.decisions = 0

    def reset_all(self) -> None:
        """Give every GPU back its default clocks (on start, exit and crash recovery)."""
        for gpu in self.gpus:
            if self.dry_run:
                continue
            try:
                gpu.reset_clocks()
            except GpuError as exc:
                log.error("cannot reset clocks of GPU %d: %s", gpu.index, exc)
            self.locked[gpu.index] = None

    async def start(self) -> None:
        """Reset (a previous powerd may have died with clocks locked), subscribe, publish."""
        self.reset_all()
        await self.nc.subscribe(subjects.QUEUE_TELEMETRY_ALL, cb=self._on_queue)
        await self.nc.subscribe(subjects.step_telemetry_node(self.settings.node), cb=self._on_steps)
        await register_discovery(self.nc, "powerd", self.info)
        names = ", ".join(g.name for g in self.gpus)
        log.info(
            "powerd on %s: %s, policy %s%s (pid %d)",
            self.settings.node,
            names,
            self.cfg.policy,
            " [dry-run]" if self.dry_run else "",
            os.getpid(),
        )

    def info(self) -> dict[str, Any]:
        """Status for discovery."""
        return {
            "gpus": [
                {"index": g.index, "name": g.name, "clock_mhz": g.current_clock_mhz()} for g in self.gpus
            ],
            "policy": self.cfg.policy,
            "decisions": self.decisions,
        }

    async def _on_queue(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            tel = decode(QueueTelemetry, msg.data)
            self.queues[tel.group] = tel

    async def _on_steps(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            tel = decode(StepTelemetry, msg.data)
            self.steps[tel.gpu] = tel

    def control(self, now_s: float) -> list[PowerTelemetry]:
        """One control interval: utilization in, clock decision out, telemetry for every GPU."""
        out = []
        horizon = now_s - 3 * self.settings.scheduler.telemetry_interval_ms / 1000.0
        fresh = [q for q in self.queues.values() if q.ts_s >= horizon]
        for gpu, policy in zip(self.gpus, self.policies, strict=True):
            if isinstance(gpu, SimulatedGpu):
                st = self.steps.get(gpu.index)
                util = 0.0
                if st is not None and st.ts_s >= now_s - 2 * st.interval_ms / 1000.0:
                    util = min(st.busy_ms / st.interval_ms, 1.0)
                gpu.set_utilization(util)
            snap = snapshot_for_gpu(self.settings.node, gpu.index, fresh, self.sensitivity)
            clocks = gpu.supported_clocks_mhz()
            want = policy.choose_clock_mhz(snap, clocks, now_s)
            if want != self.locked[gpu.index]:
                self.decisions += 1
                if self.dry_run:
                    log.info("[dry-run] GPU %d: would lock %d MHz (depth %d)", gpu.index, want, snap.depth)
                    self.locked[gpu.index] = want
                else:
                    try:
                        gpu.set_locked_clocks_mhz(want, want)
                        self.locked[gpu.index] = want
                        log.debug(
                            "GPU %d -> %d MHz (depth %d, work %.0f ms)",
                            gpu.index,
                            want,
                            snap.depth,
                            snap.predicted_work_ms,
                        )
                    except GpuError as exc:
                        log.error("GPU %d: cannot lock %d MHz: %s", gpu.index, want, exc)
            out.append(
                PowerTelemetry(
                    node=self.settings.node,
                    gpu=gpu.index,
                    ts_s=now_s,
                    name=gpu.name,
                    clock_mhz=gpu.current_clock_mhz(),
                    max_clock_mhz=gpu.max_clock_mhz,
                    power_w=gpu.power_w(),
                    energy_j=gpu.total_energy_j(),
                    utilization=gpu.utilization(),
                    simulated=gpu.simulated,
                    profile=self.cfg.profile if gpu.simulated else None,
                    policy=policy.name,
                )
            )
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Control loop until stop is set."""
        interval_s = self.cfg.interval_ms / 1000.0
        while not stop.is_set():
            for tel in self.control(time.time()):
                await self.nc.publish(subjects.power_telemetry(tel.node, tel.gpu), encode(tel))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def close(self) -> None:
        """Reset clocks and release the GPUs."""
        self.reset_all()
        for gpu in self.gpus:
            with contextlib.suppress(Exception):
                gpu.close()


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set; clocks are reset however we leave."""
    daemon = PowerDaemon(settings, nc)
    atexit.register(daemon.reset_all)
    try:
        await daemon.start()
        settle()
        await daemon.run(stop)
    finally:
        daemon.close()
        atexit.unregister(daemon.reset_all)


def main() -> None:
    """Entry point of `muserve powerd`."""
    service_main("powerd", serve)
