"""`muserve sim`: {FCFS, SSJF, oracle} x {max clock, queue threshold, SLO-aware}, JSON + Markdown + PNG.

Every energy and power figure here comes from the simulated GPU's power model (GpuProfile.power_at),
and the reports say so (SIMULATED).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.common.machine import cpu_model
from services.powerd.sensitivity import estimate_sensitivity, resolve_model_shape
from services.powerd.sim_gpu import GpuProfile, get_profile
from services.sim.engine import SimConfig, SimResult, simulate
from services.sim.groups import simulate_groups
from services.sim.predictor import ConfusionPredictor, load_confusion_predictor
from services.sim.step_model import StepModel
from services.sim.workload import Workload, make_workload

__all__ = ["CLOCK_POLICIES", "SCHEDULING", "SimPlan", "parse_loads", "provision_gpus", "run_sim"]

SCHEDULING = ("fcfs", "ssjf", "oracle")
CLOCK_POLICIES = ("max-clock", "queue-threshold", "slo-aware")
REPORT = "sim"
TARGETS = {"own_load_ratio": 1.5, "low_load_ratio": 2.6, "slo_attainment": 0.99, "speed_wall_s": 60.0}


@dataclass(frozen=True)
class SimPlan:
    """What one `muserve sim` run compares."""

    data_dir: Path | None
    out_dir: Path
    profile: str = "V100"
    model: str = "llama-3.2-3b"
    workload: str = "azure-conv"
    requests: int | None = None  # None: the whole trace (Poisson/Gamma: 10,000)
    slots: int = 8
    gpus: int | None = None  # None: the smallest cluster on which FCFS at max clock meets the SLO target
    low_load: float = 0.5
    slo_scale: float = 5.0
    sensitivity: float | None = None
    confusion: Path | None = None
    calibration: Path | None = None
    sweep_loads: tuple[float, ...] = (0.25, 0.75, 1.25)
    speed_gpus: int = 1000
    speed_requests: int = 1_000_000
    # The speed run's cluster as this many independent model groups, one process each (None: a group
    # per CPU core; 1: one queue feeding every GPU, in this process).
    speed_groups: int | None = None
    seed: int = 0
    progress: bool = True
    command: str = ""


def provision_gpus(
    workload: Workload,
    base: SimConfig,
    predictor: ConfusionPredictor,
    target: float = TARGETS["slo_attainment"],
    max_gpus: int = 256,
) -> tuple[int, dict[int, float]]:
    """Smallest GPU count on which FCFS at max clock meets `target` SLO attainment (and the search)."""
    tried: dict[int, float] = {}
    lo, hi = 1, None
    n = max(1, round(workload.rate_per_s))  # a first guess; doubled until it meets the target
    while True:
        cfg = replace(base, gpus=n, scheduling="fcfs", clock_policy="max-clock", progress=False)
        tried[n] = simulate(workload, cfg, predictor).slo_attainment
        if tried[n] >= target:
            hi = n
            break
        lo = n + 1
        if n >= max_gpus:
            raise ValueError(f"even {max_gpus} GPUs miss the SLO target at max clock")
        n = min(n * 2, max_gpus)
    while lo < hi:
        mid = (lo + hi) // 2
        if mid not in tried:
            cfg = replace(base, gpus=mid, scheduling="fcfs", clock_policy="max-clock", progress=False)
            tried[mid] = simulate(workload, cfg, predictor).slo_attainment
        if tried[mid] >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi, dict(sorted(tried.items()))


def _grid(workload: Workload, base: SimConfig, predictor: ConfusionPredictor) -> dict[str, SimResult]:
    """The 3 x 3 comparison on one workload."""
    out: dict[str, SimResult] = {}
    for sched in SCHEDULING:
        for pol in CLOCK_POLICIES:
            cfg = replace(base, scheduling=sched, clock_policy=pol, progress=False)
            out[f"{sched}/{pol}"] = simulate(workload, cfg, predictor)
    return out


def _summaries(runs: dict[str, SimResult]) -> dict[str, dict[str, Any]]:
    """Per-run summaries plus the energy ratio against max clock under the same scheduling."""
    out: dict[str, dict[str, Any]] = {}
    for key, res in runs.items():
        sched = key.split("/")[0]
        ref = runs.get(f"{sched}/max-clock")
        s = res.summary()
        s["energy_ratio_vs_max_clock"] = round(ref.total_energy_j / res.total_energy_j, 3) if ref else None
        base = runs.get("fcfs/max-clock")
        s["energy_ratio_vs_fcfs_max_clock"] = (
            round(base.total_energy_j / res.total_energy_j, 3) if base else None
        )
        out[key] = s
    return out


def _git_commit() -> str:
    """Short commit of the checkout, "+dirty" with uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _plot(path: Path, own: dict[str, SimResult], low: dict[str, SimResult], sweep: dict[str, Any]) -> None:
    """Power timelines, JCT CDFs and the energy ratio over load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = {"max-clock": "tab:red", "queue-threshold": "tab:orange", "slo-aware": "tab:green"}
    styles = {"fcfs": ":", "ssjf": "-", "oracle": "--"}
    for ax, runs, title in ((axes[0, 0], own, "own load"), (axes[0, 1], low, "low load")):
        for pol in CLOCK_POLICIES:
            res = runs[f"ssjf/{pol}"]
            bins = res.timeline_power_w
            width = max(int(60.0 / res.config.timeline_bin_s), 1)  # 1-minute moving mean
            smooth = np.convolve(bins, np.ones(width) / width, mode="same") if len(bins) > width else bins
            t_min = (np.arange(len(bins)) + 0.5) * res.config.timeline_bin_s / 60.0
            ax.plot(t_min, smooth, color=colors[pol], label=f"{pol} ({res.total_energy_j / 1e6:.2f} MJ)")
        ax.set_title(f"Cluster power, SSJF, {title} ({runs['ssjf/max-clock'].config.gpus} GPUs) - SIMULATED")
        ax.set_xlabel("time (min)")
        ax.set_ylabel("power (W, SIMULATED, 1-min mean)")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    for key, res in own.items():
        sched, pol = key.split("/")
        jct = np.sort(res.jct_ms) / 1000.0
        ax.plot(jct, np.linspace(0, 1, len(jct)), styles[sched], color=colors[pol], label=key, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("JCT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("JCT CDF, own load (all 9 combinations)")
    ax.legend(fontsize=7, ncol=3)
    ax = axes[1, 1]
    loads = sorted(float(k) for k in sweep)
    for pol in CLOCK_POLICIES[1:]:
        ratios = [sweep[f"{x:g}"][pol]["energy_ratio_vs_max_clock"] for x in loads]
        ax.plot(loads, ratios, "o-", color=colors[pol], label=f"{pol}: energy ratio vs max clock")
        for x, pol_row in zip(loads, (sweep[f"{x:g}"][pol] for x in loads), strict=True):
            label = f"{100 * pol_row['slo_attainment']:.1f}%"
            xy = (x, pol_row["energy_ratio_vs_max_clock"])
            ax.annotate(label, xy, fontsize=7, textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("load (x the trace's own rate), same cluster")
    ax.set_ylabel("energy(max clock) / energy(policy), SIMULATED")
    ax.set_title("SSJF: energy saving over load (labels: SLO attainment)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of the 3 x 3 comparison."""
    rows = [
        "| scheduling | clock policy | energy (MJ, SIMULATED) | vs max clock | mean power (W, SIMULATED) "
        "| SLO attainment | mean JCT (s) | p50 JCT (s) | p99 JCT (s) | mean busy clock (MHz) "
        "| clock changes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summaries.items():
        sched, pol = key.split("/")
        rows.append(
            f"| {sched} | {pol} | {s['energy_j'] / 1e6:.3f} | {s['energy_ratio_vs_max_clock']:.2f}x | "
            f"{s['mean_power_w']:.0f} | {100 * s['slo_attainment']:.2f}% | {s['mean_jct_ms'] / 1e3:.2f} | "
            f"{s['p50_jct_ms'] / 1e3:.2f} | {s['p99_jct_ms'] / 1e3:.2f} | {s['mean_busy_clock_mhz']:.0f} | "
            f"{s['clock_changes']} |"
        )
    return rows


def _markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    m = report["setup"]
    t = report["targets"]
    lines = [
        "# Simulated power-aware serving: scheduling x clock policy",
        "",
        f"Produced {report['created']} on {report['cpu']} ({report['cpus']} cores), "
        f"commit `{report['commit']}`, in {report['seconds']:.0f} s, by "
        f"`{report['command'] or 'muserve sim'}`.",
        "",
        "**Every energy and power figure below is SIMULATED**: the GPU is the `"
        + m["profile"]
        + "` profile of `services/powerd/sim_gpu.py` (spec-sheet clocks, idle and peak power, "
        "P = idle + u (max - idle) (f / fmax)^2.5), not a measurement.",
        "",
        "## Setup",
        "",
        f"- Model: `{m['model']}`; step latency: {m['step_model']['source']} "
        f"(decode {m['decode_ms_batch1']:.2f} ms at batch 1, {m['decode_ms_full']:.2f} ms at batch "
        f"{m['slots']} with 1,000 context tokens each; a 1,000-token prefill "
        f"{m['prefill_ms_1000']:.0f} ms, at max clock).",
        f"- Sensitivity given to the SLO-aware policy: s = {m['sensitivity']['value']:.3f} "
        f"(source: {m['sensitivity']['source']}; {m['sensitivity']['detail']}).",
        f"- Predictor: {m['predictor']} (SSJF/FCFS); oracle = true lengths.",
        f"- Workload: {m['workload']}, {m['requests']} requests, {m['rate_per_s']:.2f} req/s over "
        f"{m['duration_s'] / 60:.0f} min; low load = the same trace at {m['low_load']:g}x its rate.",
        f"- Cluster: {m['gpus']} GPUs x {m['slots']} slots, one SSJF/FCFS queue, least-loaded dispatch; "
        f"{m['gpus_rule']}",
        f"- SLO per request: JCT <= {m['slo_scale']:g} x its time alone at max clock "
        "(the replay benchmark's rule).",
        f"- Control: powerd decision every {m['control_interval_s']:g} s per GPU from a QueueSnapshot "
        f"(arrival rate and mean predicted exec over {m['rate_window_s']:g} s, SLO attainment over "
        f"{m['attainment_window_s']:g} s).",
        "",
        f"## Own load ({m['rate_per_s']:.2f} req/s on {m['gpus']} GPUs)",
        "",
        *_table(report["own_load"]),
        "",
        f"## Low load ({m['low_load']:g}x: {m['rate_per_s'] * m['low_load']:.2f} req/s on {m['gpus']} GPUs)",
        "",
        *_table(report["low_load"]),
        "",
        "## SSJF over load (same cluster)",
        "",
        "| load | policy | energy ratio vs max clock | SLO attainment | mean JCT (s) | p99 JCT (s) |",
        "|---|---|---|---|---|---|",
    ]
    for load, by_policy in sorted(report["sweep"].items(), key=lambda kv: float(kv[0])):
        for pol, s in by_policy.items():
            lines.append(
                f"| {load} | {pol} | {s['energy_ratio_vs_max_clock']:.2f}x | "
                f"{100 * s['slo_attainment']:.2f}% | {s['mean_jct_ms'] / 1e3:.2f} | "
                f"{s['p99_jct_ms'] / 1e3:.2f} |"
            )
    sp = report.get("speed")
    lines += ["", "## Simulator speed", ""]
    if sp:
        g = int(sp.get("groups", 1))
        topology = (
            f"as {g} independent model groups of ~{sp['gpus'] // g} GPUs (each its own queue, requests "
            f"routed at random), one process per group on {g} cores"
            if g > 1
            else "one queue feeding every GPU, one process"
        )
        lines.append(
            f"{sp['gpus']} GPUs {topology}, {sp['requests']:,} requests ({sp['workload']}, "
            f"{sp['rate_per_s']:.0f} req/s, "
            f"{sp['sim_duration_s']:.0f} s simulated), SSJF x SLO-aware: **{sp['wall_s']:.1f} s wall** "
            f"({sp['events']:,} events, {sp['events'] / sp['wall_s']:,.0f} events/s; workload built in "
            f"{sp['workload_s']:.1f} s). SLO attainment {100 * sp['slo_attainment']:.2f}%, "
            f"{sp['energy_j'] / 1e9:.3f} GJ SIMULATED."
        )
    else:
        lines.append("Not run (`--no-speed`).")
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, row in t.items():
        lines.append(f"| {name} | {row['value']} | {'yes' if row['met'] else '**no**'} |")
    lines += [
        "",
        "![power timelines, JCT CDFs, energy over load](sim.png)",
        "",
        "## Caveats",
        "",
        "- The power model has no memory-power term: a memory-bound decode step at a low SM clock is charged "
        "almost only idle power, so savings on memory-bound LLM decoding are optimistic compared with a real "
        "board (HBM power does not scale with the SM clock).",
        "- Busy means any sequence is running: a GPU with one sequence draws full busy power (u = 1).",
        "- Step latencies are roofline estimates unless a calibration file is given; the clock-bound "
        "share of each term follows the roofline (per-sequence matmuls and attention FLOPs scale with "
        "1/f, weight and KV reads do not), so prefill (s ~0.9) suffers more from low clocks than decode "
        "(s ~0.1).",
        "- The policy is told one sensitivity per model (the roofline's serving mix); the simulated GPU "
        "applies each phase's own, so the policy's model is deliberately imperfect, as it would be on "
        "hardware.",
        "- Exec-time observations are converted to max-clock time before they feed the exec-time model "
        "(as the live scheduler does with the workers' `exec_max_clock_ms`).",
    ]
    return "\n".join(lines) + "\n"


def run_sim(plan: SimPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run everything, write sim.json / sim.md / sim.png into plan.out_dir, return the report."""
    started = time.perf_counter()
    profile: GpuProfile = get_profile(plan.profile)
    shape, _ = resolve_model_shape(plan.model)
    step_model = StepModel.roofline(shape, profile)
    if plan.calibration is not None:
        step_model = StepModel.from_json(plan.calibration, base=step_model)
    predictor = load_confusion_predictor(plan.confusion)
    own = make_workload(plan.workload, data_dir=plan.data_dir, requests=plan.requests, seed=plan.seed)
    mean_prompt, mean_out = float(own.prompt_tokens.mean()), float(own.output_tokens.mean())
    sens: dict[str, Any]
    if plan.sensitivity is not None:
        sens = {"value": plan.sensitivity, "source": "given", "detail": "--sensitivity"}
    elif step_model.clock_share is not None:
        sens = {
            "value": step_model.clock_share,
            "source": "calibration",
            "detail": f"clock_share of {plan.calibration}",
        }
    else:
        est = estimate_sensitivity(
            shape, profile, plan.slots, mean_prompt + mean_out / 2.0, mean_prompt, mean_out
        )
        sens = {"value": est.value, "source": est.source.value, "detail": est.detail}
    sens_value = float(sens["value"])
    base = SimConfig(
        profile=profile,
        step_model=step_model,
        slots=plan.slots,
        sensitivity=sens_value,
        slo_scale=plan.slo_scale,
        seed=plan.seed,
    )
    if plan.gpus is None:
        gpus, search = provision_gpus(own, base, predictor)
        rule = (
            f"{gpus} = the smallest cluster on which FCFS at max clock meets the "
            f"{100 * TARGETS['slo_attainment']:.0f}% SLO target at the trace's own load (searched: "
            + ", ".join(f"{n} GPUs {100 * a:.1f}%" for n, a in search.items())
            + ")."
        )
    else:
        gpus, search, rule = plan.gpus, {}, f"{plan.gpus} GPUs as given."
    base = replace(base, gpus=gpus)
    log(f"{shape.name} on {gpus} x {profile.name} (SIMULATED), s = {sens['value']:.3f} ({sens['source']})")
    low = own.scaled(plan.low_load)
    log("own load: 3 x 3 runs")
    own_runs = _grid(own, base, predictor)
    log("low load: 3 x 3 runs")
    low_runs = _grid(low, base, predictor)
    sweep: dict[str, Any] = {}
    for x in sorted({*plan.sweep_loads, 1.0, plan.low_load}):
        if x == 1.0:
            runs = {p: own_runs[f"ssjf/{p}"] for p in CLOCK_POLICIES}
        elif x == plan.low_load:
            runs = {p: low_runs[f"ssjf/{p}"] for p in CLOCK_POLICIES}
        else:
            log(f"sweep: load {x:g}")
            w = own.scaled(x)
            runs = {
                p: simulate(w, replace(base, scheduling="ssjf", clock_policy=p), predictor)
                for p in CLOCK_POLICIES
            }
        ref = runs["max-clock"].total_energy_j
        sweep[f"{x:g}"] = {
            p: {**r.summary(), "energy_ratio_vs_max_clock": round(ref / r.total_energy_j, 3)}
            for p, r in runs.items()
        }
    speed: dict[str, Any] | None = None
    if plan.speed_gpus > 0 and plan.speed_requests > 0:
        log(f"speed run: {plan.speed_gpus} GPUs, {plan.speed_requests:,} requests")
        t0 = time.perf_counter()
        big = make_workload(
            plan.workload,
            data_dir=plan.data_dir,
            requests=plan.speed_requests,
            load=plan.speed_gpus / gpus,
            seed=plan.seed,
        )
        workload_s = time.perf_counter() - t0
        groups = plan.speed_groups or max(1, min(os.cpu_count() or 1, plan.speed_gpus))
        speed_cfg = replace(
            base, gpus=plan.speed_gpus, scheduling="ssjf", clock_policy="slo-aware", progress=plan.progress
        )
        if groups == 1:
            res = simulate(big, speed_cfg, predictor)
        else:
            res = simulate_groups(big, speed_cfg, predictor, groups)
        speed = {
            "gpus": plan.speed_gpus,
            "groups": groups,
            "requests": len(big),
            "workload": big.name,
            "rate_per_s": big.rate_per_s,
            "sim_duration_s": res.makespan_s,
            "workload_s": round(workload_s, 3),
            "wall_s": round(res.wall_s, 3),
            "events": res.events,
            "slo_attainment": round(res.slo_attainment, 5),
            "energy_j": round(res.total_energy_j, 1),
        }
    own_s, low_s = _summaries(own_runs), _summaries(low_runs)
    targets: dict[str, dict[str, Any]] = {}
    for label, table, need in (
        ("own load: SSJF energy ratio slo-aware vs max clock >= 1.5", own_s, TARGETS["own_load_ratio"]),
        ("low load: SSJF energy ratio slo-aware vs max clock >= 2.6", low_s, TARGETS["low_load_ratio"]),
    ):
        v = table["ssjf/slo-aware"]["energy_ratio_vs_max_clock"]
        targets[label] = {"value": f"{v:.2f}x", "met": v >= need}
    for label, table in (("own load", own_s), ("low load", low_s)):
        att = table["ssjf/slo-aware"]["slo_attainment"]
        targets[f"{label}: SSJF x slo-aware SLO attainment >= 99%"] = {
            "value": f"{100 * att:.2f}%",
            "met": att >= TARGETS["slo_attainment"],
        }
    if speed is not None:
        targets["speed: 1,000 GPUs and 1M requests in < 60 s"] = {
            "value": f"{speed['wall_s']:.1f} s ({speed['gpus']} GPUs, {speed['requests']:,} requests)",
            "met": speed["wall_s"] < TARGETS["speed_wall_s"]
            and speed["gpus"] >= 1000
            and speed["requests"] >= 1_000_000,
        }
    cfg_any = base
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "command": plan.command,
        "simulated": True,
        "note": "All energy and power figures are SIMULATED (GpuProfile power model), not measured.",
        "setup": {
            "profile": profile.name,
            "model": shape.name,
            "slots": plan.slots,
            "gpus": gpus,
            "gpus_rule": rule,
            "provisioning_search": {str(k): v for k, v in search.items()},
            "workload": own.name,
            "requests": len(own),
            "rate_per_s": own.rate_per_s,
            "duration_s": own.duration_s,
            "low_load": plan.low_load,
            "slo_scale": plan.slo_scale,
            "sensitivity": sens,
            "predictor": predictor.source,
            "confusion": predictor.matrix.round(4).tolist(),
            "step_model": step_model.to_dict(),
            "decode_ms_batch1": step_model.decode_ms(1, 1000),
            "decode_ms_full": step_model.decode_ms(plan.slots, 1000 * plan.slots),
            "prefill_ms_1000": step_model.prefill_ms(1000),
            "control_interval_s": cfg_any.control_interval_s,
            "rate_window_s": cfg_any.rate_window_s,
            "attainment_window_s": cfg_any.attainment_window_s,
            "seed": plan.seed,
        },
        "own_load": own_s,
        "low_load": low_s,
        "sweep": sweep,
        "speed": speed,
        "targets": targets,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{REPORT}.md").write_text(_markdown(report))
    _plot(out / f"{REPORT}.png", own_runs, low_runs, sweep)
    log(f"report written to {out / (REPORT + '.md')}")
    return report


def parse_loads(text: str) -> tuple[float, ...]:
    """'0.25,0.75' -> (0.25, 0.75)."""
    return tuple(float(x) for x in text.split(",") if x.strip())
