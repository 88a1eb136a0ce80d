"""powerd: one per node; reads queue and step telemetry, sets each GPU's clock, accounts energy."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import subjects
from services.common.codec import CodecError, decode, encode
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import CompletionRecord, PowerTelemetry, QueueTelemetry, StepTelemetry
from services.common.settings import Settings
from services.powerd.gpu import GpuBackend, GpuError, GpuInvalidArgumentError, make_gpu
from services.powerd.lockfile import LockFile
from services.powerd.metrics import DaemonStats, EnergyLedger, MetricsServer, gpu_families, muserve_families
from services.powerd.metrics import render as render_metrics
from services.powerd.policy import ClockPolicy, QueueSnapshot, make_clock_policy
from services.powerd.sim_gpu import SimulatedGpu
from services.powerd.watchdog import spawn_watchdog, stop_watchdog

log = logging.getLogger("muserve.powerd")


def snapshot_for_gpu(
    node: str, gpu: int, queues: list[QueueTelemetry], sensitivity: dict[str, float] | None = None
) -> QueueSnapshot:
    """The share of each group's queue that lands on one GPU (by its share of the group's slots)."""
    depth = running = 0.0
    work_ms = oldest_ms = rate = mean_exec_ms = 0.0
    slots = pooled = 0
    s: float | None = None
    slo_scale: float | None = None
    slack: float | None = None
    attainment: float | None = None
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
        # The smoothed rate when the scheduler publishes one (a 0.5 s count of arrivals is mostly noise).
        rate += (q.mean_arrivals_per_s if q.mean_arrivals_per_s is not None else q.arrivals_per_s) * share
        slots += mine
        pooled += total_slots
        if sensitivity and q.group in sensitivity:
            s = max(s or 0.0, sensitivity[q.group])  # one clock for the GPU: the most sensitive group
        # Several groups on one GPU: plan for the longest requests and the tightest SLO and slack.
        mean_exec_ms = max(mean_exec_ms, q.mean_exec_ms or 0.0)
        slo_scale = _lowest(slo_scale, q.slo_scale)
        slack = _lowest(slack, q.slack_slowdown)
        # The clock's own share of the misses when the scheduler reports it (misses at max clock are not
        # the clock's doing); an older scheduler's overall attainment otherwise.
        own = q.clock_slo_attainment if q.clock_slo_attainment is not None else q.slo_attainment
        attainment = _lowest(attainment, own)
    return QueueSnapshot(
        depth=round(depth),
        running=round(running),
        predicted_work_ms=work_ms,
        oldest_wait_ms=oldest_ms,
        arrivals_per_s=rate,
        slots=max(slots, 1),
        sensitivity=s,
        queue_slots=max(pooled, slots, 1),
        mean_exec_ms=mean_exec_ms,
        slo_scale=slo_scale,
        slack_slowdown=slack,
        slo_attainment=attainment,
    )


def _lowest(a: float | None, b: float | None) -> float | None:
    """min() of two optional numbers (None: unknown)."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def lock_state_path(settings: Settings) -> Path:
    """Where powerd notes the clocks it locked on this node."""
    folder = settings.powerd.state_dir or settings.data_dir / "powerd"
    return folder / f"{settings.node}.json"


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
        self.lock_file = LockFile(lock_state_path(settings))
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.stats = DaemonStats(policy=self.cfg.policy, dry_run=self.dry_run)
        self.ledger = EnergyLedger(settings.node)
        self.latest: dict[int, PowerTelemetry] = {}
        self.energy_base_j: dict[int, float] = {}
        self.uuids = {g.index: g.uuid for g in self.gpus if g.uuid}
        self.real_gpus = [g.index for g in self.gpus if not g.simulated]
        self.metrics = MetricsServer(self.metrics_text)

    def reset_all(self) -> None:
        """Give every GPU back its default clocks (on start, exit and crash recovery); never in dry-run."""
        if self.dry_run:
            return
        for gpu in self.gpus:
            try:
                gpu.reset_clocks()
                self.locked[gpu.index] = None
            except GpuError as exc:
                log.error("cannot reset clocks of GPU %d: %s", gpu.index, exc)
        self._record_locks()

    def _record_locks(self) -> None:
        """Keep the on-disk note of locked real GPUs in step with what is locked (never in dry-run)."""
        if not self.dry_run and self.real_gpus:
            self.lock_file.write(self.settings.node, {i: self.locked[i] for i in self.real_gpus})

    def recover(self) -> None:
        """A previous powerd on this node may have died with clocks locked: say so, and reset."""
        prev = self.lock_file.read()
        if prev is not None and prev.locked_mhz:
            what = ", ".join(f"GPU {i} at {f} MHz" for i, f in sorted(prev.locked_mhz.items()))
            if self.dry_run:
                log.warning(
                    "powerd pid %d left %s locked; dry-run does not touch GPUs: run powerd without "
                    "dry-run (or `nvidia-smi -rgc`) to reset them",
                    prev.pid,
                    what,
                )
            else:
                log.warning("powerd pid %d exited with %s locked (crash?): resetting", prev.pid, what)
        # On NVML a reset is always safe, so do it whatever the file says (it may be lost or stale).
        self.reset_all()

    async def start(self) -> None:
        """Reset (a previous powerd may have died with clocks locked), subscribe, publish."""
        self.recover()
        if not self.dry_run and self.cfg.watchdog and self.real_gpus:
            self.watchdog = spawn_watchdog(self.lock_file.path)
        await self.nc.subscribe(subjects.QUEUE_TELEMETRY_ALL, cb=self._on_queue)
        await self.nc.subscribe(subjects.step_telemetry_node(self.settings.node), cb=self._on_steps)
        await self.nc.subscribe(subjects.COMPLETIONS_ALL, cb=self._on_completion)
        if self.cfg.metrics_port:
            await self.metrics.start(self.cfg.metrics_host, self.cfg.metrics_port)
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
            "dry_run": self.dry_run,
            "refused_clocks": self.stats.refused_clocks,
            "metrics_port": self.metrics.port,
            "watchdog_pid": self.watchdog.pid if self.watchdog is not None else None,
        }

    def metrics_text(self) -> str:
        """The /metrics body, from the latest control interval's telemetry."""
        families = gpu_families(self.settings.node, self.latest.values(), self.uuids, self.energy_base_j)
        return render_metrics([*families, *muserve_families(self.settings.node, self.ledger, self.stats)])

    async def _on_queue(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            tel = decode(QueueTelemetry, msg.data)
            self.queues[tel.group] = tel

    async def _on_steps(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            tel = decode(StepTelemetry, msg.data)
            self.steps[tel.gpu] = tel

    async def _on_completion(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            self.ledger.observe(decode(CompletionRecord, msg.data))

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
                self.apply_clock(gpu, want, snap)
            tel = PowerTelemetry(
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
                locked_clock_mhz=self.locked[gpu.index],
                dry_run=self.dry_run,
            )
            self.energy_base_j.setdefault(gpu.index, tel.energy_j)
            self.latest[gpu.index] = tel
            out.append(tel)
        return out

    def apply_clock(self, gpu: GpuBackend, want: int, snap: QueueSnapshot) -> bool:
        """Lock one GPU at `want` MHz (dry-run: only log it); a clock the GPU does not support is refused."""
        try:
            if self.dry_run:
                gpu.validate_locked_clocks_mhz(want, want)
                log.info("[dry-run] GPU %d: would lock %d MHz (depth %d)", gpu.index, want, snap.depth)
            else:
                gpu.set_locked_clocks_mhz(want, want)
                log.debug(
                    "GPU %d -> %d MHz (depth %d, work %.0f ms)",
                    gpu.index,
                    want,
                    snap.depth,
                    snap.predicted_work_ms,
                )
        except GpuInvalidArgumentError as exc:
            self.stats.refused_clocks += 1
            log.error("GPU %d: refused clock %r: %s", gpu.index, want, exc)
            return False
        except GpuError as exc:
            log.error("GPU %d: cannot lock %d MHz: %s", gpu.index, want, exc)
            return False
        self.locked[gpu.index] = want
        self.stats.clock_changes += 1
        self._record_locks()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Control loop until stop is set."""
        interval_s = self.cfg.interval_ms / 1000.0
        while not stop.is_set():
            for tel in self.control(time.time()):
                await self.nc.publish(subjects.power_telemetry(tel.node, tel.gpu), encode(tel))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def close(self) -> None:
        """Reset clocks, release the GPUs, then let the watchdog go (nothing is left locked for it)."""
        self.reset_all()
        for gpu in self.gpus:
            with contextlib.suppress(Exception):
                gpu.close()
        if self.watchdog is not None:
            stop_watchdog(self.watchdog)
            self.watchdog = None


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set; clocks are reset however we leave."""
    daemon = PowerDaemon(settings, nc)
    atexit.register(daemon.reset_all)
    try:
        await daemon.start()
        settle()
        await daemon.run(stop)
    finally:
        await daemon.metrics.stop()
        daemon.close()
        atexit.unregister(daemon.reset_all)


def main() -> None:
    """Entry point of `muserve powerd`."""
    service_main("powerd", serve)
