"""`muserve demo`: the whole system on this machine, a short mixed workload through the gateway, a summary."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from services.common.settings import DEFAULT_EMBED_MODEL, Settings
from services.launcher import Cluster, default_topology, free_port, prepare_models

# (prompt, max_tokens): short and long answers mixed, so SSJF has something to order.
WORKLOAD: list[tuple[str, int]] = [
    ("What is the capital of France?", 24),
    ("Write a short story about a robot who learns to paint.", 96),
    ("Say hello in five words.", 16),
    ("Explain in a few sentences why the sky is blue.", 64),
    ("List three fruits.", 24),
    ("Give one tip for writing clean Python code.", 48),
    ("Describe the water cycle for a ten-year-old.", 80),
    ("Translate 'good morning' into Spanish.", 16),
]


@dataclass
class Result:
    """One request as the client saw it."""

    prompt: str
    text: str
    usage: dict[str, Any]
    ttft_ms: float
    e2e_ms: float
    finish: str | None


async def stream_chat(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, echo: bool = False
) -> Result:
    """One streamed chat completion, parsed from SSE by hand (no openai package needed)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = math.nan
    parts: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if math.isnan(ttft):
                        ttft = (time.perf_counter() - t0) * 1000.0
                    parts.append(piece)
                    if echo:
                        print(piece, end="", flush=True)
                finish = choice.get("finish_reason") or finish
    return Result(prompt, "".join(parts), usage, ttft, (time.perf_counter() - t0) * 1000.0, finish)


async def embed(session: aiohttp.ClientSession, url: str, texts: list[str]) -> dict[str, Any]:
    """One embeddings request."""
    async with session.post(
        f"{url}/v1/embeddings", json={"model": DEFAULT_EMBED_MODEL, "input": texts}
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        out: dict[str, Any] = await resp.json()
        return out


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def workload(
    url: str, model: str, requests: list[tuple[str, int]], with_embeddings: bool
) -> tuple[list[Result], dict[str, Any]]:
    """The demo's requests: one streamed live, the rest concurrently, plus one embedding request."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        first_prompt, first_max = requests[0]
        print(f"\n> {first_prompt}\n  ", end="", flush=True)
        first = await stream_chat(session, url, model, first_prompt, first_max, echo=True)
        print("\n")
        rest = requests[1:]
        print(
            f"sending {len(rest)} more requests at once (SSJF orders them by predicted length) ...",
            flush=True,
        )
        results = await asyncio.gather(*(stream_chat(session, url, model, p, m) for p, m in rest))
        emb: dict[str, Any] = {}
        if with_embeddings:
            texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "GPU clocks save power."]
            emb = await embed(session, url, texts)
    return [first, *results], emb


def summarize(results: list[Result], emb: dict[str, Any], wall_s: float) -> str:
    """The per-request table and totals."""
    lines = []
    head = (
        f"{'#':>2} {'prompt':<34} {'cls':>3} {'pred':>5} {'tok':>4} {'queue ms':>8} {'ttft ms':>8} "
        f"{'e2e ms':>8} {'energy J*':>9}  finish"
    )
    lines.append(head)
    lines.append("-" * len(head))
    for i, r in enumerate(results):
        u = r.usage
        energy = u.get("energy_j")
        cls = "-" if u.get("length_class") is None else str(u["length_class"])
        lines.append(
            f"{i:>2} {r.prompt[:34]:<34} {cls:>3} "
            f"{u.get('predicted_tokens') or 0:>5.0f} {u.get('completion_tokens', 0):>4} "
            f"{u.get('queue_ms') or 0:>8.1f} {r.ttft_ms:>8.1f} {r.e2e_ms:>8.1f} "
            f"{(energy if energy is not None else float('nan')):>9.2f}  {r.finish}"
        )
    tokens = sum(r.usage.get("completion_tokens", 0) for r in results)
    energy_total = sum(r.usage.get("energy_j") or 0.0 for r in results)
    simulated = any(r.usage.get("energy_simulated") for r in results)
    ttfts = [r.ttft_ms for r in results if not math.isnan(r.ttft_ms)]
    lines.append("")
    lines.append(
        f"totals: {len(results)} chat requests, {tokens} completion tokens in {wall_s:.1f} s "
        f"({tokens / wall_s:.1f} tok/s); TTFT median {statistics.median(ttfts):.0f} ms, "
        f"max {max(ttfts):.0f} ms"
    )
    if energy_total:
        lines.append(
            f"energy: {energy_total:.1f} J, {energy_total / max(tokens, 1):.3f} J/token"
            + ("  (* simulated GPU: V100 power model, not a measurement)" if simulated else "")
        )
    vecs = [d["embedding"] for d in emb.get("data", [])]
    if len(vecs) == 3:
        lines.append(
            f"embeddings ({DEFAULT_EMBED_MODEL}, dim {len(vecs[0])}): "
            f"cos(cat, kitten) = {_cos(vecs[0], vecs[1]):.2f}, "
            f"cos(cat, GPU) = {_cos(vecs[0], vecs[2]):.2f}"
        )
    return "\n".join(lines)


def run_demo(env: dict[str, str], *, requests: int, max_tokens: int, log_dir: Path | None) -> int:
    """Start, run the workload, print, stop. Returns the exit code."""
    settings = Settings()
    model = settings.worker.model
    noop = env.get("MUSERVE_WORKER__MODE") == "noop"
    if not noop:
        print("preparing models (first run converts SmolLM2 from its GGUF, ~30 s) ...", flush=True)
        prepare_models(settings.cache)
    tmp = Path(tempfile.mkdtemp(prefix="muserve-demo-"))
    logs = log_dir or tmp / "logs"
    port = free_port()
    env = {**env, "MUSERVE_GATEWAY__PORT": str(port), "MUSERVE_DATA_DIR": str(tmp)}
    url = f"http://127.0.0.1:{port}"
    # --max-tokens scales the whole mix (48 is the mix's mean).
    mix = (WORKLOAD * (requests // len(WORKLOAD) + 1))[: max(requests, 1)]
    mix = [(p, max(4, round(m * max_tokens / 48.0))) for p, m in mix]
    cluster = Cluster(env, nats_url=env.get("MUSERVE_NATS_URL"), data_dir=tmp, log_dir=logs)
    t_start = time.perf_counter()
    try:
        print(
            f"starting nats-server, scheduler, predictor, gateway, powerd and workers (logs in {logs}) ...",
            flush=True,
        )
        cluster.start(default_topology(env, with_embeddings=not noop))
        cluster.wait_ready(url, [model] + ([] if noop else [DEFAULT_EMBED_MODEL]), timeout_s=600)
        print(f"ready in {time.perf_counter() - t_start:.1f} s: OpenAI API on {url}/v1", flush=True)
        t0 = time.perf_counter()
        results, emb = asyncio.run(workload(url, model, mix, with_embeddings=not noop))
        wall = time.perf_counter() - t0
        print(summarize(results, emb, wall))
        return 0
    except Exception as exc:
        print(f"\ndemo failed: {exc}\n(service logs: {logs})", file=sys.stderr)
        return 1
    finally:
        print("\nstopping services ...", flush=True)
        cluster.stop()
        print("stopped cleanly.", flush=True)
