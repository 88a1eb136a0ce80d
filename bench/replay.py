"""`muserve bench replay`: FCFS vs SSJF vs oracle SJF on one replayed workload, through the real gateway.

Prompts are AlpacaEval's held-out test prompts (never seen by the predictor's training); each request
asks for exactly the true output length of a chosen LLM on that prompt (`ignore_eos` + `max_tokens`, as
serving benchmarks replay traces), so the scheduler sees the prompt and must predict the length. The
workers run SmolLM2 (optionally cut to fewer layers, so a full run fits in minutes) as models that
are predicted as that LLM (`predict_as`), so the predictor uses its verbosity. Arrivals come from the
Azure LLM inference trace (burstiness kept, rate rescaled to a load factor of the measured capacity),
or Poisson / Gamma.

By default the policies run simultaneously: each has its own queue (a model group) and its own worker,
all in one cluster, and every arrival is sent to all of them at once. On a shared machine whose speed
drifts by tens of percent from minute to minute, that makes the drift hit every policy alike; run one
after the other (`mode="sequential"`), the policy that happened to run in a slow minute lost, at load
0.9 by more than any queue order changes. The work-conserving policies keep their workers equally busy
(the same work arrives, and a worker idles only when its queue is empty), so sharing the cores is fair.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nats

from bench.common import machine_info, pct, stream_chat, wait_idle, write_json
from services.common import subjects
from services.launcher import Cluster, ServiceSpec, free_port

POLICIES = ("fcfs", "ssjf", "oracle")
MODES = ("simultaneous", "sequential")
TRACES = {"azure-conv": "AzureLLMInferenceTrace_conv.csv", "azure-code": "AzureLLMInferenceTrace_code.csv"}


@dataclass(frozen=True)
class ReplayRequest:
    """One request of the workload."""

    idx: int
    prompt: str
    tokens: int
    arrival_s: float


@dataclass
class Outcome:
    """What the client saw for one request."""

    idx: int
    tokens: int
    arrival_s: float
    ttft_ms: float = math.nan
    jct_ms: float = math.nan
    queue_ms: float | None = None
    length_class: int | None = None
    predicted_tokens: float | None = None
    score_tokens: float | None = None  # the continuous estimate SSJF orders by
    predictor: str | None = None  # who predicted: the proxy model, its overflow or a median baseline
    error: str | None = None


@dataclass
class PolicyRun:
    """One policy's replay."""

    policy: str
    outcomes: list[Outcome]
    depth: list[tuple[float, int]] = field(default_factory=list)
    wall_s: float = 0.0
    round: int = 0  # repeats: which pass over the policies


def arrival_offsets(
    kind: str, n: int, rate: float, seed: int, data_dir: Path, gamma_cv: float = 2.0
) -> list[float]:
    """n arrival times (s, from 0) with mean rate `rate`: trace inter-arrivals rescaled, or synthetic."""
    rng = random.Random(seed)
    if kind in TRACES:
        with open(data_dir / TRACES[kind], encoding="utf-8") as f:
            stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp() for r in csv.DictReader(f)]
        gaps = [b - a for a, b in itertools.pairwise(stamps) if b >= a]
        start = rng.randrange(0, max(len(gaps) - n, 1))
        window = gaps[start : start + n - 1]
        scale = (1.0 / rate) / (sum(window) / len(window))  # keep the trace's burstiness, set its rate
        gaps = [g * scale for g in window]
    elif kind == "poisson":
        gaps = [rng.expovariate(rate) for _ in range(n - 1)]
    elif kind == "gamma":
        shape = 1.0 / gamma_cv**2
        gaps = [rng.gammavariate(shape, 1.0 / (shape * rate)) for _ in range(n - 1)]
    else:
        raise ValueError(f"unknown arrivals {kind!r}; choose {', '.join([*TRACES, 'poisson', 'gamma'])}")
    out = [0.0]
    for g in gaps:
        out.append(out[-1] + g)
    return out


def test_prompts_with_lengths(
    data_dir: Path, lengths_model: str, seed: int, max_len: int
) -> list[tuple[int, str, int]]:
    """(idx, prompt, true tokens) of the predictor's held-out test split for one LLM's answers."""
    from services.predictor.data import load_length_data, split_by_prompt

    data = load_length_data(data_dir)
    if lengths_model not in data.models:
        raise ValueError(f"no lengths for model {lengths_model!r} in {data_dir}")
    _, _, test_rows = split_by_prompt(len(data.texts), seed=seed)
    col = data.models.index(lengths_model)
    wanted = set(test_rows.tolist())
    out = []
    for r, c, t in zip(data.rows.tolist(), data.cols.tolist(), data.tokens.tolist(), strict=True):
        if c == col and r in wanted:
            out.append((data.prompt_ids[r], data.texts[r], min(int(t), max_len)))
    return sorted(out)


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, req: ReplayRequest, t0: float
) -> Outcome:
    got = await stream_chat(session, url, model, req.prompt, req.tokens, t0 + req.arrival_s)
    u = got.usage
    return Outcome(
        req.idx,
        req.tokens,
        req.arrival_s,
        ttft_ms=got.ttft_ms,
        jct_ms=got.jct_ms,
        queue_ms=u.get("queue_ms"),
        length_class=u.get("length_class"),
        predicted_tokens=u.get("predicted_tokens"),
        score_tokens=u.get("score_tokens"),
        predictor=u.get("predictor"),
        error=got.error,
    )


async def _replay(
    url: str, nats_url: str, stack: dict[str, str], workload: list[ReplayRequest]
) -> list[PolicyRun]:
    """Every request of the workload to each policy's model (policy -> model) at its arrival time."""
    nc = await nats.connect(nats_url)
    depth: dict[str, list[tuple[float, int]]] = {p: [] for p in stack}
    t0 = time.perf_counter()

    def on_queue(policy: str) -> Any:
        async def cb(msg: Any) -> None:
            depth[policy].append((time.perf_counter() - t0, int(msgpack.unpackb(msg.data)["depth"])))

        return cb

    for policy in stack:
        await nc.subscribe(subjects.queue_telemetry(_group(policy)), cb=on_queue(policy))
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024)) as session:
        outcomes = await asyncio.gather(
            *(_one(session, url, model, r, t0) for model in stack.values() for r in workload)
        )
    wall = time.perf_counter() - t0
    await nc.close()
    n = len(workload)
    return [
        PolicyRun(policy=p, outcomes=list(outcomes[i * n : (i + 1) * n]), depth=depth[p], wall_s=wall)
        for i, p in enumerate(stack)
    ]


async def _status(nats_url: str, service: str) -> dict[str, Any]:
    """A service's discovery status (its JSON info), or {} when it does not answer."""
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(subjects.status(service), b"", timeout=5.0)
        out: dict[str, Any] = json.loads(msg.data)
        return out
    except Exception:
        return {}
    finally:
        await nc.close()


def saturated_tokens_per_s(burst: list[Outcome], slots: int) -> float:
    """Throughput of a burst sent at once, while every slot was still busy (the drain tail left out).

    Once fewer than `slots` requests remain, slots idle and the burst's average understates capacity,
    by however long its last answer happens to be. Cut at that moment; the answers still running then
    count the share of their tokens produced so far (linear over their decode time).
    """
    done = sorted(burst, key=lambda o: o.jct_ms)
    if not done:
        raise ValueError("an empty burst")
    if len(done) <= slots:
        return sum(o.tokens for o in done) / (done[-1].jct_ms / 1000.0)
    cut_ms = done[len(done) - slots].jct_ms  # from here on fewer than `slots` are left
    tokens = 0.0
    for o in done:
        if o.jct_ms <= cut_ms:
            tokens += o.tokens
        elif cut_ms > o.ttft_ms:
            tokens += o.tokens * (cut_ms - o.ttft_ms) / max(o.jct_ms - o.ttft_ms, 1e-9)
    return tokens / (cut_ms / 1000.0)


async def _calibrate(
    url: str, models: list[str], mix: list[tuple[int, str, int]], solo_tokens: int, slots: int
) -> dict[str, float]:
    """Saturated throughput per model on the workload's own mix, all models at once as they will replay
    (every slot busy, a queue behind; streamed like the replay: per-token chunks cost CPU here too), and
    one request's time alone (the SLO's base)."""
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024)) as session:
        for model in models:
            await _one(session, url, model, ReplayRequest(-1, "Warm up.", 16, 0.0), time.perf_counter())
        solo = await _one(
            session, url, models[0], ReplayRequest(-1, "Calibrate.", solo_tokens, 0.0), time.perf_counter()
        )
        t = time.perf_counter()
        runs = await asyncio.gather(
            *(_one(session, url, m, ReplayRequest(i, p, n, 0.0), t) for m in models for i, p, n in mix)
        )
        busy_s = time.perf_counter() - t
    failed = [o for o in [solo, *runs] if o.error is not None]
    if failed:
        raise RuntimeError(f"calibration failed: {failed[0].error}")
    per_model = [runs[k * len(mix) : (k + 1) * len(mix)] for k in range(len(models))]
    return {
        "tokens_per_s_full": statistics.fmean(saturated_tokens_per_s(r, slots) for r in per_model),
        "tokens_per_s_burst": sum(n for _, _, n in mix) / busy_s,
        "calibration_requests": float(len(mix)),
        "calibrated_models": float(len(models)),
        "solo_ttft_ms": solo.ttft_ms,
        "solo_ms_per_token": (solo.jct_ms - solo.ttft_ms) / max(solo_tokens - 1, 1),
    }


def _group(policy: str) -> str:
    return f"chat-{policy}"


def stacks(policies: tuple[str, ...], mode: str, repeats: int) -> list[tuple[int, tuple[str, ...]]]:
    """(pass, policies run together) in order: all at once per pass, or one at a time (ABC CBA ...)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "simultaneous":
        return [(k, policies) for k in range(repeats)]
    return [
        (k, (p,)) for k in range(repeats) for p in (policies if k % 2 == 0 else tuple(reversed(policies)))
    ]


def _cluster(tmp: Path, env: dict[str, str], models: list[str]) -> tuple[Cluster, str]:
    """Scheduler, predictor, gateway, powerd and one worker (on its own simulated GPU) per model."""
    port = free_port()
    env = {
        **env,
        "MUSERVE_GATEWAY__PORT": str(port),
        "MUSERVE_DATA_DIR": str(tmp),
        "MUSERVE_POWERD__GPUS": str(len(models)),
    }
    specs = [
        ServiceSpec("scheduler"),
        ServiceSpec("predictor"),
        ServiceSpec("gateway"),
        ServiceSpec("powerd"),
    ]
    specs += [
        ServiceSpec("worker", env={"MUSERVE_WORKER__GPU": str(i), "MUSERVE_WORKER__MODEL": m})
        for i, m in enumerate(models)
    ]
    cluster = Cluster(env, data_dir=tmp, log_dir=tmp / "logs", echo=lambda s: None)
    cluster.start(specs)
    return cluster, f"http://127.0.0.1:{port}"


def pooled(runs: list[PolicyRun], policy: str) -> PolicyRun:
    """All passes of one policy as one run (outcomes together, walls added, depth of the first pass)."""
    mine = [r for r in runs if r.policy == policy]
    return PolicyRun(
        policy=policy,
        outcomes=[o for r in mine for o in r.outcomes],
        depth=mine[0].depth if mine else [],
        wall_s=sum(r.wall_s for r in mine),
    )


def policy_ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """SSJF against FCFS and the oracle (what issue 4's targets are stated in); empty without all three."""
    if not {"fcfs", "ssjf", "oracle"} <= summary.keys():
        return {}
    return {
        "ssjf_fcfs_mean": summary["ssjf"]["jct_mean_ms"] / summary["fcfs"]["jct_mean_ms"],
        "ssjf_oracle_mean": summary["ssjf"]["jct_mean_ms"] / summary["oracle"]["jct_mean_ms"],
        "ssjf_fcfs_p99": summary["ssjf"]["jct_p99_ms"] / summary["fcfs"]["jct_p99_ms"],
    }


def rank_quality(outcomes: list[Outcome]) -> dict[str, Any]:
    """How well the estimates SSJF ordered by ranked the true lengths (Kendall tau), and who made them."""
    from services.predictor.evaluate import kendall_tau_b

    pairs: list[tuple[float, int]] = []
    for o in outcomes:
        estimate = o.score_tokens if o.score_tokens is not None else o.predicted_tokens
        if o.error is None and estimate is not None:
            pairs.append((estimate, o.tokens))
    by: dict[str, int] = {}
    for o in outcomes:
        name = (o.predictor or "none").split("@")[0]
        by[name] = by.get(name, 0) + 1
    tau = kendall_tau_b([s for s, _ in pairs], [t for _, t in pairs]) if len(pairs) > 1 else math.nan
    return {"rank_tau": tau, "predictors": dict(sorted(by.items()))}


def summarize(run: PolicyRun, slo: dict[str, float], slo_scale: float) -> dict[str, Any]:
    """JCT/TTFT statistics, throughput, SLO attainment, and how fast the worker decoded in this run.

    The machine is shared: a run whose worker decodes a few percent slower faces a higher load than the
    others at the same arrivals, and at load 0.9 that decides mean JCT more than the queue order does.
    """
    ok = [o for o in run.outcomes if o.error is None and not math.isnan(o.jct_ms)]
    per_token = [
        (o.jct_ms - o.ttft_ms) / (o.tokens - 1) for o in ok if o.tokens > 1 and not math.isnan(o.ttft_ms)
    ]
    ms_per_token = statistics.fmean(per_token) if per_token else math.nan
    jct = [o.jct_ms for o in ok]
    ttft = [o.ttft_ms for o in ok if not math.isnan(o.ttft_ms)]
    met = sum(
        1 for o in ok if o.jct_ms <= slo_scale * (slo["solo_ttft_ms"] + o.tokens * slo["solo_ms_per_token"])
    )
    return {
        "requests": len(run.outcomes),
        "errors": len(run.outcomes) - len(ok),
        "jct_mean_ms": statistics.fmean(jct) if jct else math.nan,
        "jct_p50_ms": pct(jct, 50),
        "jct_p99_ms": pct(jct, 99),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "tokens_per_s": sum(o.tokens for o in ok) / run.wall_s if run.wall_s else math.nan,
        "requests_per_s": len(ok) / run.wall_s if run.wall_s else math.nan,
        "slo_attainment": met / len(run.outcomes) if run.outcomes else math.nan,
        "max_depth": max((d for _, d in run.depth), default=0),
        "decode_ms_per_token": ms_per_token,
        **rank_quality(run.outcomes),
    }


def plot(runs: list[PolicyRun], path: Path) -> None:
    """JCT CDF per policy and queue depth over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        jct = np.sort([o.jct_ms / 1000.0 for o in run.outcomes if o.error is None])
        if jct.size:
            a.plot(jct, np.arange(1, jct.size + 1) / jct.size, label=run.policy)
        if run.depth:
            t, d = zip(*run.depth, strict=True)
            b.step(t, d, where="post", label=run.policy)
    a.set_xlabel("job completion time (s)")
    a.set_ylabel("CDF")
    a.set_title("JCT")
    b.set_xlabel("time since first arrival (s)")
    b.set_ylabel("queued requests")
    b.set_title("queue depth")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mode_note(mode: str, repeats: int) -> str:
    if mode == "simultaneous":
        return (
            "The policies ran simultaneously, each with its own queue and worker on the same arrivals (every "
            "request sent to all of them at once), so the shared machine's speed drifts alike under each; "
            f"{repeats} pass(es)."
        )
    return f"The policies ran one after the other, {repeats} pass(es) (order reversed every other pass)."


def _predictor_note(status: list[dict[str, Any]]) -> str:
    """How many predictions the proxy model made and how many its cheaper overflow answered."""
    shed = sum(int(s.get("shed", 0)) for s in status)
    total = shed + sum(int(s.get("items", 0)) for s in status)
    if not total:
        return ""
    unknown = sorted({m for s in status for m in s.get("unknown_models", [])})
    note = f" ({total} predictions, {shed} of them by the cheaper overflow predictor under load"
    return note + (f"; not trained for {', '.join(unknown)}" if unknown else "") + ")"


def markdown(meta: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """The report."""
    f, s, o = (summary.get(p, {}) for p in POLICIES)
    lines = [
        "# Replay: FCFS vs SSJF vs oracle SJF",
        "",
        f"Measured {meta['machine']['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"commit `{meta['machine']['commit']}`, load average before {meta['load_before']:.2f}. "
        f"Reproduce: `{meta['command']}`.",
        "",
        f"Workload: {meta['requests']} AlpacaEval held-out test prompts (predictor split seed "
        f"{meta['seed']}), each asking for exactly the length `{meta['lengths_model']}` answered it with "
        f"(ignore_eos; capped at {meta['max_len']} tokens; mean {meta['mean_tokens']:.0f}), arrivals "
        f"`{meta['arrivals']}` rescaled to "
        f"load factor {meta['load']} of the measured capacity ({meta['capacity_rps']:.3f} req/s = "
        f"{meta['calibration']['tokens_per_s_full']:.0f} tokens/s, measured streaming "
        f"{meta['calibration']['calibration_requests']:.0f} other test prompts of the same mix at once, "
        "counted while every slot was busy, i.e. without the burst's drain tail, / mean length).",
        f"Worker: SmolLM2-135M-Instruct, {meta['worker']}. Predictor: {meta['predictor']}"
        f"{_predictor_note(meta.get('predictor_status', []))}. "
        "GPU clock fixed at max (simulated V100, `max-clock`): only the queue order differs between runs.",
        _mode_note(meta.get("mode", "sequential"), meta.get("repeats", 1)),
        f"SSJF and oracle promote a request that waited {meta['aging_factor']:g} x its predicted exec time. "
        f"SLO per request: JCT <= {meta['slo_scale']:g} x (solo TTFT + tokens x solo time per token) = "
        f"{meta['slo_scale']:g} x ({meta['calibration']['solo_ttft_ms']:.0f} ms + tokens x "
        f"{meta['calibration']['solo_ms_per_token']:.1f} ms).",
        "",
        "| policy | mean JCT | p50 JCT | p99 JCT | mean TTFT | p99 TTFT | tokens/s | SLO attainment "
        "| max queue | ms/token | vs FCFS | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POLICIES:
        r = summary.get(p)
        if r is None:
            continue
        lines.append(
            f"| {p} | {r['jct_mean_ms'] / 1000:.2f} s | {r['jct_p50_ms'] / 1000:.2f} s | "
            f"{r['jct_p99_ms'] / 1000:.2f} s | "
            f"{r['ttft_mean_ms'] / 1000:.2f} s | {r['ttft_p99_ms'] / 1000:.2f} s | {r['tokens_per_s']:.0f} | "
            f"{100 * r['slo_attainment']:.0f}% | {r['max_depth']} | "
            f"{r.get('decode_ms_per_token', math.nan):.1f} | "
            f"{r.get('decode_ms_per_token', math.nan) / f.get('decode_ms_per_token', math.nan):.2f}x | "
            f"{r['errors']} |"
        )
    if f and s and o:
        ratios = meta["ratios"]
        lines += [
            "",
            f"SSJF / FCFS mean JCT = {ratios['ssjf_fcfs_mean']:.2f} (target <= 0.60); "
            f"SSJF / oracle mean JCT = {ratios['ssjf_oracle_mean']:.2f} (target <= 1.15); "
            f"SSJF / FCFS p99 JCT = {ratios['ssjf_fcfs_p99']:.2f} (target <= 1.20).",
        ]
        if "rank_tau" in s:
            lines += [
                "",
                f"SSJF's estimates ranked the true lengths with Kendall tau {s['rank_tau']:.2f}; "
                "predicted by "
                + ", ".join(f"{k} {v}" for k, v in s["predictors"].items())
                + " (requests; the overflow answers when the proxy model is busy, a median baseline when "
                "the prediction came after dispatch or not at all).",
            ]
        passes = [r for r in meta.get("ratios_per_pass", []) if r]
        if len(passes) > 1:
            lines += [
                "",
                f"{len(passes)} passes over the policies (order reversed every other pass), pooled above. "
                "Per pass, SSJF / FCFS mean JCT: "
                + ", ".join(f"{r['ssjf_fcfs_mean']:.2f}" for r in passes)
                + "; SSJF / oracle: "
                + ", ".join(f"{r['ssjf_oracle_mean']:.2f}" for r in passes)
                + ".",
            ]
    lines += [
        "",
        "ms/token: each answer's time after its first token over its tokens, averaged (vs FCFS: the same "
        "for FCFS's run). The machine is shared: a run whose worker decoded more slowly faced a higher load "
        "than the others at the same arrivals, whatever its queue order: compare policies whose ms/token "
        "agree.",
        "",
        "![JCT CDF and queue depth](replay.png)",
        "",
    ]
    return "\n".join(lines)


def run_replay(
    *,
    data_dir: Path,
    out_dir: Path,
    lengths_model: str = "vicuna-13b",
    arrivals: str = "azure-conv",
    load: float = 0.9,
    requests: int = 100,
    max_len: int = 512,
    max_seqs: int = 2,
    layers: int | None = 4,
    aging_factor: float = 6.0,
    policies: tuple[str, ...] = POLICIES,
    mode: str = "simultaneous",
    slo_scale: float = 5.0,
    seed: int = 0,
    repeats: int = 1,
    command: str = "muserve bench replay",
    echo: Any = print,
    idle_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Calibrate, replay the same workload under each policy, write replay.{json,md,png}.

    mode "simultaneous" replays every policy at once (one worker each); "sequential" one after the
    other, and then repeats > 1 reverses the order every other pass (ABC CBA ...). Figures pool passes.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not policies or len(set(policies)) != len(policies) or not set(policies) <= set(POLICIES):
        raise ValueError(f"policies must be distinct names from {', '.join(POLICIES)}, got {policies}")
    schedule = stacks(policies, mode, repeats)
    load_before = wait_idle(timeout_s=idle_timeout_s, echo=echo)
    name = "".join(c if c.isalnum() or c in "_-" else "-" for c in lengths_model)  # a subject token
    pool = test_prompts_with_lengths(data_dir, lengths_model, seed, max_len)
    rng = random.Random(seed)
    chosen = rng.sample(pool, min(requests, len(pool)))
    # One model (queue + worker) per policy; the predictor is asked about the replayed LLM.
    model_of = {p: f"{name}-{p}" for p in policies}
    env = {
        "MUSERVE_LOG_LEVEL": "WARNING",
        "MUSERVE_WORKER__MAX_SEQS": str(max_seqs),
        # A benchmark measures slow answers rather than cutting them off (at load 0.9 a wait can be long).
        "MUSERVE_GATEWAY__REQUEST_TIMEOUT_S": "3600",
        "MUSERVE_POWERD__POLICY": "max-clock",
        "MUSERVE_MODELS": json.dumps(
            [
                {
                    "name": model_of[p],
                    "kind": "chat",
                    "source": "smollm2",
                    "group": _group(p),
                    "max_context_tokens": 8192,
                    "predict_as": lengths_model,
                }
                for p in policies
            ]
        ),
        "MUSERVE_GROUPS": json.dumps(
            {_group(p): {"policy": p, "max_queue": 100_000, "aging_factor": aging_factor} for p in policies}
        ),
    }
    if layers:
        env["MUSERVE_WORKER__NUM_HIDDEN_LAYERS"] = str(layers)
    if mode == "simultaneous" and len(policies) > 1:
        # Workers sharing the cores run one torch thread each: two threads per worker wait on each other
        # (OpenMP barriers) whenever another process holds a core, and slow down many times over.
        env["MUSERVE_WORKER__THREADS"] = "1"
    runs: list[PolicyRun] = []
    predictor_status: list[dict[str, Any]] = []
    calibration: dict[str, float] = {}
    capacity_rps = 0.0
    workload: list[ReplayRequest] = []
    for k, stack in schedule:
        models = [model_of[p] for p in stack]
        tmp = Path(tempfile.mkdtemp(prefix=f"muserve-replay-{'-'.join(stack)}-"))
        cluster, url = _cluster(tmp, env, models)
        try:
            cluster.wait_ready(url, models, timeout_s=300)
            if not workload:
                mean_tokens = statistics.fmean(t for _, _, t in chosen)
                # Calibrate on other test prompts with the same length mix (not the replayed ones).
                rest = [x for x in pool if x not in chosen] or chosen
                mix = random.Random(seed + 1).sample(rest, min(10 * max_seqs, len(rest)))
                calibration = asyncio.run(_calibrate(url, models, mix, round(mean_tokens), max_seqs))
                capacity_rps = calibration["tokens_per_s_full"] / mean_tokens
                times = arrival_offsets(arrivals, len(chosen), load * capacity_rps, seed, data_dir)
                workload = [ReplayRequest(i, p, t, a) for (i, p, t), a in zip(chosen, times, strict=True)]
                echo(
                    f"capacity {capacity_rps:.3f} req/s per policy; replaying {len(workload)} requests over "
                    f"{workload[-1].arrival_s:.0f} s at load {load}"
                )
            label = " + ".join(stack)
            echo(f"pass {k + 1}/{repeats}: {label} ..." if repeats > 1 else f"{label} ...")
            stack_runs = asyncio.run(
                _replay(url, cluster.nats_url or "", {p: model_of[p] for p in stack}, workload)
            )
            predictor_status.append(
                {
                    "pass": k,
                    "policies": list(stack),
                    **asyncio.run(_status(cluster.nats_url or "", "predictor")),
                }
            )
            for run in stack_runs:
                run.round = k
                runs.append(run)
                done = [o.jct_ms for o in run.outcomes if o.error is None]
                echo(
                    f"  {run.policy}: mean JCT {statistics.fmean(done) / 1000:.2f} s"
                    if done
                    else "  all failed"
                )
        finally:
            cluster.stop()
    summary = {
        p: summarize(pooled(runs, p), calibration, slo_scale) for p in dict.fromkeys(r.policy for r in runs)
    }
    ratios = policy_ratios(summary)
    per_pass = [
        policy_ratios({r.policy: summarize(r, calibration, slo_scale) for r in runs if r.round == k})
        for k in range(repeats)
    ]
    meta = {
        "machine": machine_info(),
        "load_before": load_before,
        "command": command,
        "seed": seed,
        "lengths_model": lengths_model,
        "requests": len(workload),
        "max_len": max_len,
        "mean_tokens": statistics.fmean(r.tokens for r in workload),
        "arrivals": arrivals,
        "load": load,
        "mode": mode,
        "capacity_rps": capacity_rps,
        "calibration": calibration,
        "slo_scale": slo_scale,
        "ratios": ratios,
        "repeats": repeats,
        "ratios_per_pass": per_pass,
        "worker": f"max_seqs {max_seqs}, {layers or 30} of 30 layers, bf16, one per policy"
        + (
            f", {env['MUSERVE_WORKER__THREADS']} torch thread each"
            if "MUSERVE_WORKER__THREADS" in env
            else ""
        ),
        "aging_factor": aging_factor,
        "predictor": "the shipped proxy artifact (SSJF orders by its continuous estimate)",
        "predictor_status": predictor_status,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "replay.json",
        {
            "meta": meta,
            "summary": summary,
            "runs": [
                {
                    "policy": r.policy,
                    "round": r.round,
                    "wall_s": r.wall_s,
                    "outcomes": [asdict(o) for o in r.outcomes],
                    "depth": r.depth,
                }
                for r in runs
            ],
        },
    )
    (out_dir / "replay.md").write_text(markdown(meta, summary))
    plot([pooled(runs, p) for p in summary], out_dir / "replay.png")
    echo(markdown(meta, summary))
    return {"meta": meta, "summary": summary}
