"""A cluster of independent model groups, simulated one process per group and merged into one result.

µ-Serve queues requests per model group and a group's GPUs never take another group's work, so groups
share nothing: each can be simulated on its own core. Requests are routed to groups at random (seeded),
as a mix of equally popular models would be; GPUs are split evenly.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from services.sim.engine import SimConfig, SimResult, simulate
from services.sim.predictor import ConfusionPredictor
from services.sim.workload import Workload

__all__ = ["simulate_groups", "split_workload"]


def split_workload(workload: Workload, groups: int, seed: int) -> list[np.ndarray]:
    """Request indices of each group (random routing, each group's arrivals stay sorted)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    route = np.random.default_rng(seed).integers(0, groups, len(workload))
    return [np.flatnonzero(route == k) for k in range(groups)]


def _subset(workload: Workload, idx: np.ndarray, k: int) -> Workload:
    return Workload(
        f"{workload.name} [group {k}]",
        workload.arrival_s[idx],
        workload.prompt_tokens[idx],
        workload.output_tokens[idx],
    )


def _run(args: tuple[Workload, SimConfig, ConfusionPredictor | None]) -> SimResult:
    return simulate(*args)


def simulate_groups(
    workload: Workload,
    config: SimConfig,
    predictor: ConfusionPredictor | None,
    groups: int,
    processes: int | None = None,
) -> SimResult:
    """Simulate config.gpus GPUs as `groups` independent groups, in up to `processes` processes.

    The merged result holds every request in workload order, every GPU, summed power and the mean clock;
    wall_s is the whole call's wall time (process start-up included).
    """
    started = time.perf_counter()
    if config.gpus < groups:
        raise ValueError(f"need at least one GPU per group: {config.gpus} GPUs, {groups} groups")
    parts = split_workload(workload, groups, config.seed)
    sizes = [config.gpus // groups + (1 if k < config.gpus % groups else 0) for k in range(groups)]
    jobs = [
        (_subset(workload, idx, k), replace(config, gpus=n, seed=config.seed + k, progress=False), predictor)
        for k, (idx, n) in enumerate(zip(parts, sizes, strict=True))
        if len(idx)
    ]
    workers = max(1, min(processes or multiprocessing.cpu_count(), len(jobs)))
    if workers == 1:
        results = [_run(j) for j in jobs]
    else:
        # fork: the children inherit the imported modules, no re-import per process.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_run, jobs))
    return _merge(workload, config, [p for p in parts if len(p)], results, time.perf_counter() - started)


def _merge(
    workload: Workload, config: SimConfig, parts: list[np.ndarray], results: list[SimResult], wall_s: float
) -> SimResult:
    n = len(workload)

    def gather(field: str, dtype: type) -> np.ndarray:
        out: np.ndarray = np.empty(n, dtype=dtype)
        for idx, res in zip(parts, results, strict=True):
            out[idx] = getattr(res, field)
        return out

    bins = max(len(r.timeline_power_w) for r in results)

    def padded(values: np.ndarray, fill: float) -> np.ndarray:
        return np.concatenate([values, np.full(bins - len(values), fill)])

    makespan = max(r.makespan_s for r in results)
    # A group done before the others idles until the common makespan (as one cluster's GPUs would).
    idle_w = [config.profile.idle_power_w * r.config.gpus for r in results]
    power = sum(
        (padded(r.timeline_power_w, w) for r, w in zip(results, idle_w, strict=True)),
        start=np.zeros(bins),
    )
    clock = sum(
        (
            padded(r.timeline_clock_mhz, r.timeline_clock_mhz[-1] if len(r.timeline_clock_mhz) else 0.0)
            * r.config.gpus
            for r in results
        ),
        start=np.zeros(bins),
    ) / max(config.gpus, 1)
    energy = np.concatenate(
        [r.energy_j + config.profile.idle_power_w * max(makespan - r.makespan_s, 0.0) for r in results]
    )
    predictors = {r.predictor for r in results}
    return SimResult(
        config=config,
        workload=f"{workload.name} ({len(results)} groups)",
        arrival_s=workload.arrival_s,
        output_tokens=workload.output_tokens,
        jct_ms=gather("jct_ms", np.float64),
        ttft_ms=gather("ttft_ms", np.float64),
        wait_ms=gather("wait_ms", np.float64),
        slo_ms=gather("slo_ms", np.float64),
        queued=gather("queued", np.bool_),
        energy_j=energy,
        busy_s=np.concatenate([r.busy_s for r in results]),
        clock_busy_mhz_s=np.concatenate([r.clock_busy_mhz_s for r in results]),
        makespan_s=makespan,
        timeline_power_w=power,
        timeline_clock_mhz=clock,
        clock_changes=sum(r.clock_changes for r in results),
        events=sum(r.events for r in results),
        wall_s=wall_s,
        predictor=predictors.pop() if len(predictors) == 1 else ", ".join(sorted(predictors)),
    )
