"""`muserve bench powerloop`: the live closed loop, SLO-aware clocks vs max clock, on a simulated GPU.

A `muserve up`-like cluster (scheduler, predictor, gateway, powerd, one SmolLM2 worker cut to a few
layers with 2 batch slots) runs twice on the same workload, once per clock policy. The workload is a
low-load phase, a burst, then low load again (Poisson arrivals per phase, rates relative to the
capacity measured at max clock), from AlpacaEval held-out prompts asking for the length alpaca-7b
answered them with (as `muserve bench replay` does; its answers are short, so no length cap is needed:
a binding cap would make the scheduler's length predictions, which never see a replay's max_tokens,
too long, and with them the clock policy's load estimate). While it runs, the bench records from NATS what
powerd publishes (clock, power, energy: all SIMULATED, the GPU is a modelled V100) and what the
scheduler publishes (queue depth, SLO slack and attainment), and per request what the client sees
(JCT, TTFT, the energy estimate in `usage`). The worker is real torch on CPU; only the GPU is a model:
it stretches each step by the clock's slowdown, so clock decisions feed back into latency.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import math
import random
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nats

from bench.common import machine_info, pct, stream_chat, wait_idle, write_json
from services.common import subjects
from services.launcher import Cluster, ServiceSpec, free_port

POLICIES = ("max-clock", "slo-aware")
NODE = "bench"
GROUP = "chat"


@dataclass(frozen=True)
class Phase:
    """A stretch of the workload with one arrival rate (a fraction of the measured capacity)."""

    name: str
    duration_s: float
    load: float


@dataclass(frozen=True)
class LoopRequest:
    """One request of the workload."""

    idx: int
    prompt: str
    tokens: int
    arrival_s: float
    phase: str


@dataclass
class LoopOutcome:
    """What the client saw for one request."""

    idx: int
    tokens: int
    arrival_s: float
    phase: str
    ttft_ms: float = math.nan
    jct_ms: float = math.nan
    queue_ms: float | None = None
    completion_tokens: int | None = None
    energy_j: float | None = None
    energy_simulated: bool | None = None
    error: str | None = None


@dataclass
class Series:
    """Time series recorded from NATS during one run (t in s since the first arrival)."""

    power: list[dict[str, float]] = field(default_factory=list)  # t, clock_mhz, power_w, energy_j, ...
    queue: list[dict[str, float | None]] = field(default_factory=list)  # t, depth, running, slack, ...


@dataclass
class LoopRun:
    """One policy's run."""

    policy: str
    outcomes: list[LoopOutcome]
    series: Series
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def build_workload(
    pool: list[tuple[int, str, int]], phases: list[Phase], capacity_rps: float, seed: int
) -> list[LoopRequest]:
    """Poisson arrivals per phase at load x capacity, prompts drawn from pool (reused if it runs out)."""
    rng = random.Random(seed)
    order = rng.sample(pool, len(pool))
    out: list[LoopRequest] = []
    start = 0.0
    for ph in phases:
        rate = ph.load * capacity_rps
        t = start + rng.expovariate(rate) if rate > 0 else math.inf
        while t < start + ph.duration_s:
            _, prompt, tokens = order[len(out) % len(order)]
            out.append(LoopRequest(len(out), prompt, tokens, t, ph.name))
            t += rng.expovariate(rate)
        start += ph.duration_s
    return out


async def _request(
    session: aiohttp.ClientSession, url: str, model: str, req: LoopRequest, t0: float
) -> LoopOutcome:
    """Stream one chat completion at its arrival time; record TTFT, JCT and the usage block."""
    got = await stream_chat(session, url, model, req.prompt, req.tokens, t0 + req.arrival_s)
    u = got.usage
    return LoopOutcome(
        req.idx,
        req.tokens,
        req.arrival_s,
        req.phase,
        ttft_ms=got.ttft_ms,
        jct_ms=got.jct_ms,
        queue_ms=u.get("queue_ms"),
        completion_tokens=u.get("completion_tokens"),
        energy_j=u.get("energy_j"),
        energy_simulated=u.get("energy_simulated"),
        error=got.error,
    )


async def _closed_loop(
    url: str, model: str, items: list[tuple[int, str, int]], concurrency: int
) -> tuple[list[LoopOutcome], float]:
    """Run items with `concurrency` in flight (every slot busy, no queue); returns outcomes and wall time."""
    timeout = aiohttp.ClientTimeout(total=3600)
    todo = list(enumerate(items))
    done: list[LoopOutcome] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def lane() -> None:
            while todo:
                i, (_, prompt, tokens) = todo.pop(0)
                req = LoopRequest(i, prompt, tokens, 0.0, "warmup")
                done.append(await _request(session, url, model, req, time.perf_counter()))

        t = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    failed = [o for o in done if o.error is not None]
    if failed:
        raise RuntimeError(f"warm-up failed: {failed[0].error}")
    return done, wall


async def _warm_up(
    url: str, model: str, solo: tuple[int, str, int], mix: list[tuple[int, str, int]], slots: int
) -> dict[str, float]:
    """One request alone (the SLO's reference), then the mix `slots` at a time (capacity, exec fit)."""
    (alone,), _ = await _closed_loop(url, model, [solo], 1)
    runs, wall = await _closed_loop(url, model, mix, slots)
    return {
        "solo_ttft_ms": alone.ttft_ms,
        "solo_ms_per_token": (alone.jct_ms - alone.ttft_ms) / max(solo[2] - 1, 1),
        "solo_tokens": float(solo[2]),
        "tokens_per_s_full": sum(o.tokens for o in runs) / wall,
        "warmup_requests": float(len(mix) + 1),
    }


async def _replay(url: str, nats_url: str, model: str, workload: list[LoopRequest]) -> LoopRun:
    """Send the workload on schedule; record power and queue telemetry from NATS meanwhile."""
    nc = await nats.connect(nats_url)
    series = Series()
    t0 = time.perf_counter()
    wall0 = time.time()

    async def on_power(msg: Any) -> None:
        tel = msgpack.unpackb(msg.data)
        series.power.append(
            {
                "t": tel["ts_s"] - wall0,
                "clock_mhz": tel["clock_mhz"],
                "power_w": tel["power_w"],
                "energy_j": tel["energy_j"],
                "utilization": tel["utilization"],
            }
        )

    async def on_queue(msg: Any) -> None:
        tel = msgpack.unpackb(msg.data)
        series.queue.append(
            {
                "t": tel["ts_s"] - wall0,
                "depth": tel["depth"],
                "running": tel["running"],
                "slack_slowdown": tel.get("slack_slowdown"),
                "slo_attainment": tel.get("slo_attainment"),
                "mean_arrivals_per_s": tel.get("mean_arrivals_per_s"),
                "mean_exec_ms": tel.get("mean_exec_ms"),
            }
        )

    await nc.subscribe(subjects.power_telemetry(NODE, 0), cb=on_power)
    await nc.subscribe(subjects.queue_telemetry(GROUP), cb=on_queue)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024)) as session:
        outcomes = await asyncio.gather(*(_request(session, url, model, r, t0) for r in workload))
    wall = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # the last telemetry of the run
    await nc.close()
    return LoopRun(policy="", outcomes=list(outcomes), series=series, wall_s=wall)


def scrape(port: int) -> dict[str, float]:
    """powerd's /metrics for GPU 0 and the served model: energy counters and J per output token."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("gpu", "0") == "0":
                out[s.name] = s.value
    return out


def energy_between(power: list[dict[str, float]], t_from: float, t_to: float) -> float:
    """GPU energy (J, from powerd's cumulative integral) between two times, interpolated linearly."""
    ts = [p["t"] for p in power]
    es = [p["energy_j"] for p in power]
    if len(ts) < 2:
        return math.nan

    def at(t: float) -> float:
        i = bisect.bisect_left(ts, t)
        if i <= 0:
            return es[0]
        if i >= len(ts):
            return es[-1]
        w = (t - ts[i - 1]) / max(ts[i] - ts[i - 1], 1e-9)
        return es[i - 1] + w * (es[i] - es[i - 1])

    return at(t_to) - at(t_from)


def summarize(
    run: LoopRun, slo: dict[str, float], slo_scale: float, idle_w: float, common_end_s: float
) -> dict[str, Any]:
    """JCT, SLO attainment, energy (SIMULATED) and how the clock moved, overall and per phase."""
    ok = [o for o in run.outcomes if o.error is None and not math.isnan(o.jct_ms)]

    def met(o: LoopOutcome) -> bool:
        return o.jct_ms <= slo_scale * (slo["solo_ttft_ms"] + o.tokens * slo["solo_ms_per_token"])

    end_s = max((o.arrival_s + o.jct_ms / 1000.0 for o in ok), default=run.wall_s)
    energy_j = energy_between(run.series.power, 0.0, end_s)
    tokens = sum(o.completion_tokens or 0 for o in ok)
    req_energy = [o.energy_j for o in ok if o.energy_j is not None]
    clocks = [p["clock_mhz"] for p in run.series.power if 0.0 <= p["t"] <= end_s]
    phases: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(o.phase for o in run.outcomes):
        mine = [o for o in ok if o.phase == name]
        phases[name] = {
            "requests": sum(1 for o in run.outcomes if o.phase == name),
            "slo_attainment": sum(map(met, mine)) / len(mine) if mine else math.nan,
            "jct_mean_ms": statistics.fmean(o.jct_ms for o in mine) if mine else math.nan,
        }
    return {
        "requests": len(run.outcomes),
        "errors": len(run.outcomes) - len(ok),
        "slo_attainment": sum(map(met, ok)) / len(run.outcomes) if run.outcomes else math.nan,
        "jct_mean_ms": statistics.fmean(o.jct_ms for o in ok) if ok else math.nan,
        "jct_p50_ms": pct([o.jct_ms for o in ok], 50),
        "jct_p99_ms": pct([o.jct_ms for o in ok], 99),
        "ttft_p50_ms": pct([o.ttft_ms for o in ok if not math.isnan(o.ttft_ms)], 50),
        "end_s": end_s,
        "gpu_energy_j_simulated": energy_j,
        # Both runs over the same window: the earlier-finished one idles (idle power at any clock).
        "gpu_energy_common_window_j_simulated": energy_j + idle_w * max(common_end_s - end_s, 0.0),
        "mean_power_w_simulated": energy_j / end_s if end_s > 0 else math.nan,
        "request_energy_j_simulated": sum(req_energy),
        "gpu_j_per_output_token_simulated": energy_j / tokens if tokens else math.nan,
        "request_j_per_output_token_simulated": sum(req_energy) / tokens if tokens else math.nan,
        "output_tokens": tokens,
        "clock_mean_mhz": statistics.fmean(clocks) if clocks else math.nan,
        "clock_min_mhz": min(clocks, default=math.nan),
        "clock_max_mhz": max(clocks, default=math.nan),
        "clock_changes": sum(1 for a, b in itertools.pairwise(clocks) if a != b),
        "max_depth": max((int(q["depth"] or 0) for q in run.series.queue), default=0),
        "phases": phases,
        "powerd_metrics": run.metrics,
    }


def plot(runs: list[LoopRun], phases: list[Phase], path: Path) -> None:
    """Three panels over time: clock (MHz), power (W), queue depth; both policies, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    colours = {"max-clock": "tab:red", "slo-aware": "tab:blue"}
    for run in runs:
        c = colours.get(run.policy)
        pw = [p for p in run.series.power if p["t"] >= -2.0]
        t = [p["t"] for p in pw]
        axes[0].step(t, [p["clock_mhz"] for p in pw], where="post", color=c, label=run.policy)
        axes[1].plot(t, [p["power_w"] for p in pw], color=c, lw=0.9, label=run.policy)
        q = [x for x in run.series.queue if x["t"] is not None and float(x["t"]) >= -2.0]
        axes[2].step(
            [x["t"] for x in q],
            [(x["depth"] or 0) + (x["running"] or 0) for x in q],
            where="post",
            color=c,
            label=f"{run.policy} (queued + running)",
        )
    start = 0.0
    for ph in phases:
        for ax in axes:
            if ph.load > 0.5:
                ax.axvspan(start, start + ph.duration_s, color="0.9", zorder=0)
        axes[0].text(start + 1, 1540, f"{ph.name} ({ph.load:g}x)", fontsize=8, va="bottom")
        start += ph.duration_s
    axes[0].set_ylabel("SM clock (MHz)\nSIMULATED V100")
    axes[1].set_ylabel("board power (W)\nSIMULATED")
    axes[2].set_ylabel("requests in system")
    axes[2].set_xlabel("time since first arrival (s)")
    axes[0].set_title("Live closed loop: powerd clock policy on a simulated V100, real SmolLM2 worker on CPU")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def simulated_twin(
    workload: list[LoopRequest],
    policies: tuple[str, ...],
    slo: dict[str, float],
    *,
    layers: int | None,
    max_seqs: int,
    sensitivity: float,
    slo_scale: float,
    profile: str,
    echo: Any = print,
) -> dict[str, Any]:
    """The same workload through `muserve sim`, its step model calibrated from this worker's engine.

    The simulator's fidelity check: same arrivals, prompts (chat-templated, in SmolLM2 tokens) and
    lengths, one GPU with the worker's slots, the same clock policies and the same client-side SLO.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from services.common.settings import Settings
    from services.sim.calibrate import calibrate_worker
    from services.sim.predictor import load_confusion_predictor
    from services.sim.step_model import StepModel
    from services.sim.workload import Workload
    from services.worker.models import chat_prompt_ids, ensure_smollm2

    cache = Settings().cache
    with tempfile.TemporaryDirectory(prefix="muserve-twin-") as tmp:
        cal_path = Path(tmp) / "calibration.json"
        echo("simulated twin: calibrating the worker engine ...")
        cal = calibrate_worker(
            cal_path,
            cache_dir=cache,
            num_hidden_layers=layers,
            max_seqs=max_seqs,
            clock_share=sensitivity,
            show_progress=False,
            log=lambda _m: None,
        )
        step_model = StepModel.from_json(cal_path)
    tok = AutoTokenizer.from_pretrained(ensure_smollm2(cache))
    prompt_tokens = [len(chat_prompt_ids(tok, [{"role": "user", "content": r.prompt}])) for r in workload]
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    w = Workload(
        "powerloop workload",
        np.array([workload[i].arrival_s for i in order], dtype=np.float64),
        np.array([prompt_tokens[i] for i in order], dtype=np.int64),
        np.array([workload[i].tokens for i in order], dtype=np.int64),
    )
    budget_ms = slo_scale * (slo["solo_ttft_ms"] + w.output_tokens * slo["solo_ms_per_token"])
    predictor = load_confusion_predictor(None)
    # The engine alone on an idle machine is faster than the live worker, which shares the 2 cores with
    # the control plane and streams every token: "in situ" scales the fitted step model to the solo
    # TTFT and time per token the client measured at max clock on the live cluster (the warm-up).
    ctx = float(np.mean(w.prompt_tokens + w.output_tokens / 2.0))
    k_dec = slo["solo_ms_per_token"] / step_model.decode_ms(1, ctx)
    k_pre = slo["solo_ttft_ms"] / step_model.prefill_ms(float(np.mean(w.prompt_tokens)))
    in_situ = replace(
        step_model,
        decode_memory_ms=step_model.decode_memory_ms * k_dec,
        decode_compute_ms_per_seq=step_model.decode_compute_ms_per_seq * k_dec,
        decode_memory_ms_per_ctx=step_model.decode_memory_ms_per_ctx * k_dec,
        decode_compute_ms_per_ctx=step_model.decode_compute_ms_per_ctx * k_dec,
        prefill_memory_ms=step_model.prefill_memory_ms * k_pre,
        prefill_compute_ms_per_token=step_model.prefill_compute_ms_per_token * k_pre,
        prefill_compute_ms_per_token_sq=step_model.prefill_compute_ms_per_token_sq * k_pre,
        source=f"{step_model.source}, x{k_dec:.2f} (decode) / x{k_pre:.2f} (prefill) to live solo times",
    )
    out: dict[str, Any] = {
        "step_model": step_model.to_dict(),
        "in_situ_scale": {"decode": k_dec, "prefill": k_pre},
        "calibration_steps": cal["measured"]["steps"],
        "policies": {},
    }
    variants = {"engine": step_model, "in_situ": in_situ}
    for variant, model in variants.items():
        for policy in policies:
            out["policies"][f"{variant}/{policy}"] = _twin_run(
                w, model, policy, budget_ms, predictor, profile, max_seqs, sensitivity, slo_scale
            )
    return out


def _twin_run(
    w: Any,
    step_model: Any,
    policy: str,
    budget_ms: Any,
    predictor: Any,
    profile: str,
    max_seqs: int,
    sensitivity: float,
    slo_scale: float,
) -> dict[str, float]:
    """One simulated run of the twin and the figures the live table shows."""
    import numpy as np

    from services.powerd.sim_gpu import get_profile
    from services.sim.engine import SimConfig, simulate

    res = simulate(
        w,
        SimConfig(
            profile=get_profile(profile),
            step_model=step_model,
            gpus=1,
            slots=max_seqs,
            scheduling="ssjf",
            clock_policy=policy,
            sensitivity=sensitivity,
            slo_scale=slo_scale,
            aging_factor=2.0,
        ),
        predictor,
    )
    return {
        "slo_attainment_client_slo": float(np.mean(res.jct_ms <= budget_ms)),
        "slo_attainment_sim_slo": res.slo_attainment,
        "jct_mean_ms": float(res.jct_ms.mean()),
        "jct_p99_ms": float(np.percentile(res.jct_ms, 99)),
        "energy_j_simulated": res.total_energy_j,
        "makespan_s": res.makespan_s,
    }


def markdown(meta: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """The report."""
    cal = meta["calibration"]
    lines = [
        "# Live closed loop: SLO-aware clocks vs max clock (GPU SIMULATED)",
        "",
        f"Measured {meta['machine']['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"commit `{meta['machine']['commit']}` (plus uncommitted changes), load average before "
        f"{meta['load_before']:.2f}. Reproduce: `{meta['command']}` (~{meta['bench_wall_s'] / 60:.0f} min).",
        "",
        "**Everything about power, energy and clocks here is SIMULATED**: the GPU is powerd's modelled "
        f"{meta['profile']} (P = idle + (TDP - idle) x util x (f/fmax)^2.5; latency t(f) = t(fmax) x "
        f"(s fmax/f + 1 - s), s = {meta['sensitivity']}). The worker is real (SmolLM2-135M-Instruct, "
        f"{meta['worker']}, torch on CPU); it sleeps each step by the simulated slowdown, so a lower clock "
        "really lengthens requests and the loop is closed through the real scheduler, NATS and gateway.",
        "",
        f"Workload: {meta['requests']} AlpacaEval held-out prompts (predictor split seed {meta['seed']}), "
        f"each asking for exactly the length `{meta['lengths_model']}` answered it with (ignore_eos, capped "
        f"at {meta['max_len']} tokens, mean {meta['mean_tokens']:.0f}); Poisson arrivals in phases "
        + ", ".join(f"{p['name']} {p['duration_s']:g} s at {p['load']:g}x" for p in meta["phases"])
        + f" of the capacity measured at max clock ({meta['capacity_rps']:.2f} req/s = "
        f"{cal['tokens_per_s_full']:.0f} tokens/s with every slot busy). Each run first warms up with "
        f"{cal['warmup_requests']:.0f} other prompts, {meta['slots']} at a time (the scheduler's exec-time "
        f"fit needs 16 completions), then idles {meta['settle_s']:g} s (the telemetry's rate window), "
        "identically for both policies.",
        f"SLO per request (client side): JCT <= {meta['slo_scale']:g} x (solo TTFT + tokens x solo time per "
        f"token at max clock) = {meta['slo_scale']:g} x ({cal['solo_ttft_ms']:.0f} ms + tokens x "
        f"{cal['solo_ms_per_token']:.1f} ms). Scheduler SSJF; powerd interval "
        f"{meta['powerd_interval_ms']:g} ms.",
        "",
        "| policy | SLO attainment | mean JCT | p50 JCT | p99 JCT | GPU energy (SIM) | same window (SIM) "
        "| mean power (SIM) | J/output token (SIM) | mean clock | clock range | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in meta["policies"]:
        r = summary.get(p)
        if r is None:
            continue
        lines.append(
            f"| {p} | {100 * r['slo_attainment']:.1f}% | {r['jct_mean_ms'] / 1000:.2f} s | "
            f"{r['jct_p50_ms'] / 1000:.2f} s | {r['jct_p99_ms'] / 1000:.2f} s | "
            f"{r['gpu_energy_j_simulated'] / 1000:.2f} kJ | "
            f"{r['gpu_energy_common_window_j_simulated'] / 1000:.2f} kJ | "
            f"{r['mean_power_w_simulated']:.0f} W | {r['gpu_j_per_output_token_simulated']:.2f} | "
            f"{r['clock_mean_mhz']:.0f} MHz | {r['clock_min_mhz']:.0f}-{r['clock_max_mhz']:.0f} MHz | "
            f"{r['errors']} |"
        )
    lines += ["", "Per phase (SLO attainment / mean JCT):", ""]
    names = list(next(iter(summary.values()))["phases"]) if summary else []
    lines.append("| policy | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for p in meta["policies"]:
        r = summary.get(p)
        if r is None:
            continue
        cells = [
            f"{100 * r['phases'][n]['slo_attainment']:.0f}% / {r['phases'][n]['jct_mean_ms'] / 1000:.2f} s"
            for n in names
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if "ratios" in meta:
        ra = meta["ratios"]
        lines += [
            "",
            f"SLO-aware / max-clock (SIMULATED): GPU energy {ra['energy']:.2f} over each run's own span, "
            f"{ra['energy_common']:.2f} over the same window; request energy (per-step estimate in `usage`) "
            f"{ra['request_energy']:.2f}; mean JCT {ra['jct_mean']:.2f}; SLO attainment "
            f"{100 * summary['slo-aware']['slo_attainment']:.1f}% vs "
            f"{100 * summary['max-clock']['slo_attainment']:.1f}%.",
        ]
    twin = meta.get("simulated_twin")
    if twin:
        sm = twin["step_model"]
        lines += [
            "",
            "## The same workload in the simulator (fidelity check)",
            "",
            f"`muserve sim`'s engine on this workload: one GPU with {meta['slots']} slots, SSJF, the same "
            "clock policies and the same client-side SLO, its step model calibrated from this worker's "
            f"engine just before ({twin['calibration_steps']} steps measured, as `muserve calibrate`): "
            f"decode {sm['decode_memory_ms']:.1f} + {sm['decode_compute_ms_per_seq']:.2f} x batch + "
            f"{sm['decode_memory_ms_per_ctx']:.4f} x context ms, clock share s = {sm['clock_share']}. "
            "The predictor enters as its shipped confusion matrix; NATS, HTTP and Python overheads are "
            "not simulated.",
            "",
            "| policy | SLO attainment live / sim | mean JCT live / sim | p99 JCT live / sim "
            "| energy live / sim (SIM) |",
            "|---|---|---|---|---|",
        ]
        for variant, label in (
            ("engine", "engine as measured"),
            ("in_situ", "scaled to the live solo times"),
        ):
            for p in meta["policies"]:
                r, t = summary.get(p), twin["policies"].get(f"{variant}/{p}")
                if r is None or t is None:
                    continue
                lines.append(
                    f"| {p}, {label} | {100 * r['slo_attainment']:.1f}% / "
                    f"{100 * t['slo_attainment_client_slo']:.1f}% | "
                    f"{r['jct_mean_ms'] / 1000:.2f} / {t['jct_mean_ms'] / 1000:.2f} s | "
                    f"{r['jct_p99_ms'] / 1000:.2f} / {t['jct_p99_ms'] / 1000:.2f} s | "
                    f"{r['gpu_energy_j_simulated'] / 1000:.2f} / {t['energy_j_simulated'] / 1000:.2f} kJ |"
                )
        tp = twin["policies"]
        energy = {k: v["energy_j_simulated"] for k, v in tp.items()}
        ratios = [
            f"{label} {energy[f'{v}/slo-aware'] / energy[f'{v}/max-clock']:.2f}"
            for v, label in (("engine", "twin (engine)"), ("in_situ", "twin (in situ)"))
            if f"{v}/slo-aware" in energy and f"{v}/max-clock" in energy
        ]
        if ratios and "ratios" in meta:
            k = twin["in_situ_scale"]
            lines += [
                "",
                f"Energy slo-aware / max-clock: live {meta['ratios']['energy']:.2f}, "
                + ", ".join(ratios)
                + ". "
                f"In situ = the fitted step model scaled x{k['decode']:.2f} (decode) and x{k['prefill']:.2f} "
                "(prefill) so that a request alone takes what the client measured on the live cluster at "
                "max clock (the engine alone on an idle machine is faster than the worker sharing 2 cores "
                "with the control plane; the TTFT also holds gateway, scheduler and predictor time).",
            ]
    lines += [
        "",
        "GPU energy is powerd's integral of the modelled board power from the first arrival to the last "
        "completion (idle power included); 'same window' extends the run that finished first at idle power "
        "to the other's end. J/output token divides it by the output tokens; the per-request estimate in "
        "`usage.energy_j` (busy power x stretched step time, split over the batch) leaves idle power out. "
        "The power model has no memory-power term, so savings on memory-bound decode are optimistic "
        "(an upper bound until measured on a GPU).",
        "",
        "![clock, power and queue over time](powerloop.png)",
        "",
    ]
    return "\n".join(lines)


def _cluster(tmp: Path, env: dict[str, str]) -> tuple[Cluster, str, int]:
    port, metrics_port = free_port(), free_port()
    env = {
        **env,
        "MUSERVE_GATEWAY__PORT": str(port),
        "MUSERVE_DATA_DIR": str(tmp),
        "MUSERVE_POWERD__METRICS_PORT": str(metrics_port),
    }
    specs = [
        ServiceSpec("scheduler"),
        ServiceSpec("predictor"),
        ServiceSpec("gateway"),
        ServiceSpec("powerd", env={"MUSERVE_POWERD__GPUS": "1"}),
        ServiceSpec("worker", env={"MUSERVE_WORKER__GPU": "0"}),
    ]
    cluster = Cluster(env, data_dir=tmp, log_dir=tmp / "logs", echo=lambda s: None)
    cluster.start(specs)
    return cluster, f"http://127.0.0.1:{port}", metrics_port


def run_powerloop(
    *,
    data_dir: Path,
    out_dir: Path,
    lengths_model: str = "alpaca-7b",
    max_len: int = 512,
    max_seqs: int = 2,
    layers: int | None = 4,
    phases: list[Phase] | None = None,
    policies: tuple[str, ...] = POLICIES,
    slo_scale: float = 5.0,
    sensitivity: float = 0.6,
    warmup: int = 16,
    settle_s: float = 21.0,
    seed: int = 0,
    command: str = "muserve bench powerloop",
    echo: Any = print,
    idle_timeout_s: float = 60.0,
    twin_sim: bool = True,
) -> dict[str, Any]:
    """Run the workload under each clock policy (max-clock first: it calibrates), write the reports."""
    from bench.replay import test_prompts_with_lengths
    from services.powerd.sim_gpu import get_profile

    t_bench = time.monotonic()
    phases = phases or [Phase("low", 45.0, 0.15), Phase("burst", 40.0, 0.8), Phase("low again", 45.0, 0.15)]
    load_before = wait_idle(timeout_s=idle_timeout_s, echo=echo)
    name = lengths_model.replace(".", "-")
    pool = test_prompts_with_lengths(data_dir, lengths_model, seed, max_len)
    rng = random.Random(seed)
    shuffled = rng.sample(pool, len(pool))
    solo_item, mix, replay_pool = shuffled[0], shuffled[1 : 1 + warmup], shuffled[1 + warmup :]
    profile = "v100"
    env = {
        "MUSERVE_LOG_LEVEL": "WARNING",
        "MUSERVE_NODE": NODE,
        "MUSERVE_WORKER__MAX_SEQS": str(max_seqs),
        "MUSERVE_POWERD__PROFILE": profile,
        "MUSERVE_POWERD__SLO_SCALE": str(slo_scale),
        "MUSERVE_MODELS": json.dumps(
            [
                {
                    "name": name,
                    "kind": "chat",
                    "source": "smollm2",
                    "group": GROUP,
                    "max_context_tokens": 8192,
                    "sensitivity": sensitivity,
                }
            ]
        ),
        "MUSERVE_WORKER__MODEL": name,
        "MUSERVE_GROUPS": json.dumps(
            {
                GROUP: {"policy": "ssjf", "max_queue": 100_000, "aging_factor": 2.0},
                "embed": {"policy": "fcfs"},
            }
        ),
    }
    if layers:
        env["MUSERVE_WORKER__NUM_HIDDEN_LAYERS"] = str(layers)
    ordered = sorted(policies, key=lambda p: p != "max-clock")  # max clock calibrates
    runs: list[LoopRun] = []
    calibration: dict[str, float] = {}
    workload: list[LoopRequest] = []
    capacity_rps = 0.0
    for policy in ordered:
        tmp = Path(tempfile.mkdtemp(prefix=f"muserve-powerloop-{policy}-"))
        cluster, url, metrics_port = _cluster(tmp, {**env, "MUSERVE_POWERD__POLICY": policy})
        try:
            cluster.wait_ready(url, [name], timeout_s=300)
            echo(f"{policy}: warming up ({len(mix) + 1} requests) ...")
            cal = asyncio.run(_warm_up(url, name, solo_item, mix, max_seqs))
            if not workload:
                if policy != "max-clock":
                    echo("warning: calibrating at a policy other than max-clock")
                calibration = cal
                mean_tokens = statistics.fmean(t for _, _, t in replay_pool)
                capacity_rps = cal["tokens_per_s_full"] / mean_tokens
                workload = build_workload(replay_pool, phases, capacity_rps, seed)
                echo(
                    f"capacity {capacity_rps:.2f} req/s; {len(workload)} requests over "
                    f"{sum(p.duration_s for p in phases):.0f} s"
                )
            # Idle one telemetry window, so the warm-up's arrivals are out of the smoothed rate.
            time.sleep(settle_s)
            echo(f"{policy}: replaying ...")
            run = asyncio.run(_replay(url, cluster.nats_url or "", name, workload))
            run.policy = policy
            try:
                run.metrics = scrape(metrics_port)
            except OSError as exc:
                echo(f"  could not scrape powerd metrics: {exc}")
            runs.append(run)
            done = [o.jct_ms for o in run.outcomes if o.error is None]
            echo(f"  {policy}: mean JCT {statistics.fmean(done) / 1000:.2f} s" if done else "  all failed")
        finally:
            cluster.stop()
    idle_w = get_profile(profile).idle_power_w
    ends = [
        max((o.arrival_s + o.jct_ms / 1000.0 for o in r.outcomes if o.error is None), default=r.wall_s)
        for r in runs
    ]
    common_end = max(ends, default=0.0)
    summary = {r.policy: summarize(r, calibration, slo_scale, idle_w, common_end) for r in runs}
    meta: dict[str, Any] = {
        "machine": machine_info(),
        "load_before": load_before,
        "command": command,
        "seed": seed,
        "lengths_model": lengths_model,
        "requests": len(workload),
        "max_len": max_len,
        "mean_tokens": statistics.fmean(r.tokens for r in workload) if workload else math.nan,
        "phases": [asdict(p) for p in phases],
        "capacity_rps": capacity_rps,
        "calibration": calibration,
        "slo_scale": slo_scale,
        "sensitivity": sensitivity,
        "profile": get_profile(profile).name,
        "slots": max_seqs,
        "policies": list(ordered),
        "worker": f"max_seqs {max_seqs}, {layers or 30} of 30 layers, bf16",
        "powerd_interval_ms": 250.0,
        "settle_s": settle_s,
        "simulated": True,
    }
    if {"max-clock", "slo-aware"} <= summary.keys():
        a, b = summary["slo-aware"], summary["max-clock"]
        meta["ratios"] = {
            "energy": a["gpu_energy_j_simulated"] / b["gpu_energy_j_simulated"],
            "energy_common": a["gpu_energy_common_window_j_simulated"]
            / b["gpu_energy_common_window_j_simulated"],
            "request_energy": a["request_energy_j_simulated"] / b["request_energy_j_simulated"],
            "jct_mean": a["jct_mean_ms"] / b["jct_mean_ms"],
        }
    twin: dict[str, Any] | None = None
    if twin_sim and workload:
        twin = simulated_twin(
            workload,
            tuple(ordered),
            calibration,
            layers=layers,
            max_seqs=max_seqs,
            sensitivity=sensitivity,
            slo_scale=slo_scale,
            profile=profile,
            echo=echo,
        )
        meta["simulated_twin"] = twin
    meta["bench_wall_s"] = time.monotonic() - t_bench
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "powerloop.json",
        {
            "meta": meta,
            "summary": summary,
            "runs": [
                {
                    "policy": r.policy,
                    "wall_s": r.wall_s,
                    "outcomes": [asdict(o) for o in r.outcomes],
                    "power": r.series.power,
                    "queue": r.series.queue,
                }
                for r in runs
            ],
        },
    )
    (out_dir / "powerloop.md").write_text(markdown(meta, summary))
    plot(runs, phases, out_dir / "powerloop.png")
    echo(markdown(meta, summary))
    return {"meta": meta, "summary": summary}
