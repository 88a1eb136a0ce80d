"""`muserve bench overhead`: what the control plane adds, measured with a no-op worker.

Everything real except the model: HTTP gateway -> NATS -> scheduler (predictor call, JetStream persist,
SSJF queue, worker pull) -> no-op worker -> token chunks streamed back through the gateway. Open-loop
Poisson arrivals at each rate; side by side in the same run: a 1-token answer (the overhead per request),
a 16-token stream (the cost per streamed token), the raw NATS entry (no HTTP gateway), and one NATS
request/reply hop to the predictor service for scale.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nats

from bench.common import machine_info, pct, wait_idle, write_json
from services.common import subjects
from services.common.settings import DEFAULT_CHAT_MODEL
from services.launcher import Cluster, ServiceSpec, free_port

TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
WARMUP_S = 2.0
# Second gateway path: the answer streams back as this many chunks (per-token cost = the difference).
STREAM_TOKENS = 16


async def _http_one(
    session: aiohttp.ClientSession, url: str, tokens: int, out: list[float], errs: list[str]
) -> None:
    body = {"model": DEFAULT_CHAT_MODEL, "prompt": "hello", "max_tokens": tokens, "stream": True}
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                errs.append(f"HTTP {resp.status}: {data[:200]!r}")
                return
            if not data.rstrip().endswith(b"data: [DONE]") or data.count(b"data: ") < tokens + 1:
                errs.append("stream did not end with [DONE]")
                return
    except Exception as exc:
        errs.append(repr(exc))
        return
    out.append((time.perf_counter() - t0) * 1000.0)


async def _nats_entry_one(nc: Any, out: list[float], errs: list[str]) -> None:
    payload = msgpack.packb({"prompt": "hello", "max_tokens": 4})
    t0 = time.perf_counter()
    try:
        msg = await nc.request(subjects.generate(DEFAULT_CHAT_MODEL), payload, timeout=5)
        if msgpack.unpackb(msg.data).get("error"):
            errs.append(str(msgpack.unpackb(msg.data)["error"]))
            return
    except Exception as exc:
        errs.append(repr(exc))
        return
    out.append((time.perf_counter() - t0) * 1000.0)


async def _nats_hop_one(nc: Any, out: list[float], errs: list[str]) -> None:
    payload = msgpack.packb({"items": [{"request_id": "x", "model": DEFAULT_CHAT_MODEL, "text": "hello"}]})
    t0 = time.perf_counter()
    try:
        await nc.request(subjects.PREDICT, payload, timeout=5)
    except Exception as exc:
        errs.append(repr(exc))
        return
    out.append((time.perf_counter() - t0) * 1000.0)


async def _open_loop(
    fire: Any, rate: float, duration_s: float, seed: int
) -> tuple[list[float], list[str], float]:
    """Poisson arrivals at `rate` for `duration_s`; returns latencies, errors and the achieved rate."""
    rng = random.Random(seed)
    lat: list[float] = []
    errs: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    t_next = start
    n = 0
    while True:
        t_next += rng.expovariate(rate)
        if t_next - start > duration_s:
            break
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(lat, errs)))
        n += 1
    await asyncio.gather(*tasks)
    return lat, errs, n / duration_s


PATHS = ("gateway", f"gateway_{STREAM_TOKENS}tok", "nats_entry", "nats_hop")


async def _measure(
    gateway: str, nats_url: str, rates: list[float], duration_s: float, repeats: int, echo: Any
) -> dict[str, Any]:
    url = f"{gateway}/v1/completions"
    conn = aiohttp.TCPConnector(limit=512)
    nc = await nats.connect(nats_url)
    results: dict[str, Any] = {name: {} for name in PATHS}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:

        def http_fire(lat: list[float], errs: list[str]) -> Any:
            return _http_one(session, url, 1, lat, errs)

        def stream_fire(lat: list[float], errs: list[str]) -> Any:
            return _http_one(session, url, STREAM_TOKENS, lat, errs)

        def entry_fire(lat: list[float], errs: list[str]) -> Any:
            return _nats_entry_one(nc, lat, errs)

        def hop_fire(lat: list[float], errs: list[str]) -> Any:
            return _nats_hop_one(nc, lat, errs)

        await _open_loop(http_fire, 50.0, WARMUP_S, seed=0)  # warm connections, JIT caches, JetStream
        for rep in range(repeats):
            for rate in rates:
                for name, fire in zip(PATHS, (http_fire, stream_fire, entry_fire, hop_fire), strict=True):
                    lat, errs, achieved = await _open_loop(
                        fire, rate, duration_s, seed=1000 * rep + int(rate)
                    )
                    runs = results[name].setdefault(str(int(rate)), [])
                    runs.append(
                        {
                            "repeat": rep,
                            "achieved_rps": achieved,
                            "n": len(lat),
                            "errors": len(errs),
                            "error_samples": errs[:3],
                            "p50_ms": pct(lat, 50),
                            "p90_ms": pct(lat, 90),
                            "p99_ms": pct(lat, 99),
                            "max_ms": max(lat) if lat else float("nan"),
                            "mean_ms": statistics.fmean(lat) if lat else float("nan"),
                            "latencies_ms": lat,
                        }
                    )
                    echo(
                        f"  repeat {rep + 1}/{repeats} {rate:>5.0f} req/s {name:<13}: "
                        f"p50 {pct(lat, 50):6.2f} ms"
                        f"  p99 {pct(lat, 99):6.2f} ms  ({len(lat)} ok, {len(errs)} errors)"
                    )
    await nc.close()
    return results


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """Runs with their latency distribution as 101 percentiles (p0..p100) instead of every sample."""
    out: dict[str, Any] = {}
    for name, by_rate in results.items():
        out[name] = {
            rate: [
                {
                    **{k: v for k, v in r.items() if k != "latencies_ms"},
                    "percentiles_ms": [round(pct(r["latencies_ms"], q), 3) for q in range(101)],
                }
                for r in runs
            ]
            for rate, runs in by_rate.items()
        }
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per path and rate: median over repeats of p50/p99, pooled percentiles, errors."""
    out: dict[str, Any] = {}
    for name, by_rate in results.items():
        out[name] = {}
        for rate, runs in by_rate.items():
            pooled = [x for r in runs for x in r["latencies_ms"]]
            out[name][rate] = {
                "p50_ms_median": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                "p50_ms_pooled": pct(pooled, 50),
                "p99_ms_pooled": pct(pooled, 99),
                "requests": len(pooled),
                "errors": sum(r["errors"] for r in runs),
                "achieved_rps_median": statistics.median(r["achieved_rps"] for r in runs),
            }
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report."""
    streamed = f"gateway_{STREAM_TOKENS}tok"
    lines = [
        "# Control-plane overhead (no-op worker)",
        "",
        f"Measured {meta['machine']['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
        f"commit `{meta['machine']['commit']}`, load average before the run {meta['load_before']:.2f}.",
        f"Open-loop Poisson arrivals, {meta['duration_s']:.0f} s per rate and path, {meta['repeats']} "
        f"repeats (figures are medians over repeats). Reproduce: `{meta['command']}`.",
        "",
        "Paths, all through real processes on this machine (the load generator shares its 2 cores):",
        "",
        "- `gateway`: HTTP POST /v1/completions with `stream: true`, `max_tokens: 1` -> gateway -> NATS -> "
        "scheduler (admission, JetStream persist, predictor request, SSJF queue, parked worker pull) -> "
        "no-op worker -> one final chunk carrying the token -> gateway -> SSE response complete at the "
        "client. "
        "When a worker is idle the scheduler dispatches without waiting for the prediction "
        "(docs/architecture.md). This is the control-plane overhead per request.",
        f"- `{streamed}`: the same with `max_tokens: {STREAM_TOKENS}`: {STREAM_TOKENS} token chunks "
        "stream back; the difference to `gateway` is the cost of streaming.",
        "- `nats_entry`: the same request as a raw NATS request on the entry subject (no HTTP).",
        "- `nats_hop`: one NATS request/reply to the predictor service, for scale.",
        "",
        f"Target: `gateway` p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms at 200 req/s.",
        "",
        f"| rate (req/s) | gateway p50 | gateway p99 | {streamed} p50 | {streamed} p99 | per extra token "
        "| nats_entry p50 | nats_entry p99 | nats_hop p50 | nats_hop p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    g = summary["gateway"]
    for rate in g:
        st, e, h = summary[streamed][rate], summary["nats_entry"][rate], summary["nats_hop"][rate]
        errs = g[rate]["errors"] + st["errors"] + e["errors"] + h["errors"]
        per_token = (st["p50_ms_median"] - g[rate]["p50_ms_median"]) / (STREAM_TOKENS - 1)
        lines.append(
            f"| {rate} | {g[rate]['p50_ms_median']:.2f} ms | {g[rate]['p99_ms_median']:.2f} ms | "
            f"{st['p50_ms_median']:.2f} ms | {st['p99_ms_median']:.2f} ms | {per_token * 1000:.0f} µs | "
            f"{e['p50_ms_median']:.2f} ms | {e['p99_ms_median']:.2f} ms | {h['p50_ms_median']:.2f} ms | "
            f"{h['p99_ms_median']:.2f} ms | {errs} |"
        )
    top = g.get("200")
    if top is not None:
        ok = top["p50_ms_median"] <= TARGET_P50_MS and top["p99_ms_median"] <= TARGET_P99_MS
        lines += [
            "",
            f"At 200 req/s: p50 {top['p50_ms_median']:.2f} ms, p99 {top['p99_ms_median']:.2f} ms -> "
            f"target {'met' if ok else 'NOT met'}. Runs of the gateway path at 200 req/s (p50 / p99): "
            + ", ".join(f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms" for r in meta["runs_200"])
            + ".",
        ]
    lines += ["", "![latency CDF](overhead.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency CDFs per rate for the gateway path (pooled over repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, style in (("gateway", "-"), (f"gateway_{STREAM_TOKENS}tok", "-."), ("nats_entry", "--")):
        for rate, runs in results[name].items():
            pooled = np.sort([x for r in runs for x in r["latencies_ms"]])
            if pooled.size:
                ax.plot(
                    pooled, np.arange(1, pooled.size + 1) / pooled.size, style, label=f"{name} {rate} req/s"
                )
    ax.axvline(TARGET_P50_MS, color="grey", lw=0.8, ls=":")
    ax.axvline(TARGET_P99_MS, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms, log)")
    ax.set_ylabel("CDF")
    ax.set_title("muserve control-plane latency, no-op worker")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_overhead(
    rates: list[float],
    *,
    duration_s: float,
    repeats: int,
    out_dir: Path,
    echo: Any = print,
    idle_timeout_s: float = 60.0,
) -> int:
    """Start a no-op cluster, measure, write overhead.{json,md,png}; returns an exit code."""
    load = wait_idle(timeout_s=idle_timeout_s, echo=echo)
    tmp = Path(tempfile.mkdtemp(prefix="muserve-bench-"))
    port = free_port()
    env = {
        "MUSERVE_WORKER__MODE": "noop",
        "MUSERVE_WORKER__MAX_SEQS": "512",
        "MUSERVE_GATEWAY__PORT": str(port),
        "MUSERVE_LOG_LEVEL": "WARNING",
        "MUSERVE_OTEL__EXPORTER": "none",
        "MUSERVE_DATA_DIR": str(tmp),
        "MUSERVE_GROUPS": json.dumps(
            {"chat": {"policy": "ssjf", "max_queue": 4096}, "embed": {"policy": "fcfs"}}
        ),
    }
    specs = [
        ServiceSpec("scheduler"),
        ServiceSpec("predictor"),
        ServiceSpec("gateway"),
        ServiceSpec("powerd"),
        ServiceSpec("worker", env={"MUSERVE_WORKER__GPU": "0"}),
    ]
    cluster = Cluster(env, data_dir=tmp, log_dir=tmp / "logs", echo=echo)
    gateway = f"http://127.0.0.1:{port}"
    try:
        cluster.start(specs)
        cluster.wait_ready(gateway, [DEFAULT_CHAT_MODEL], timeout_s=120)
        echo(f"measuring rates {rates} req/s, {duration_s:.0f} s each, {repeats} repeats ...")
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        assert cluster.nats_url is not None
        results = asyncio.run(_measure(gateway, cluster.nats_url, rates, duration_s, repeats, echo))
    finally:
        cluster.stop()
    summary = summarize(results)
    meta = {
        "machine": machine_info(),
        "load_before": load,
        "duration_s": duration_s,
        "repeats": repeats,
        "rates": rates,
        "runs_200": [
            {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]} for r in results["gateway"].get("200", [])
        ],
        "command": " ".join(["muserve", "bench", "overhead", *sys.argv[3:]]),
        "worker": "noop (answers max_tokens tokens at once), max_seqs 512",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / "overhead.png")
    write_json(out_dir / "overhead.json", {"meta": meta, "summary": summary, "runs": compact(results)})
    (out_dir / "overhead.md").write_text(markdown(summary, meta))
    echo(markdown(summary, meta))
    errors = sum(v["errors"] for path in summary.values() for v in path.values())
    return 1 if errors else 0
