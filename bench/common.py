"""Shared benchmark helpers: machine checks, percentiles, report writing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from services.common.machine import cpu_model


def loadavg_1m() -> float:
    """1-minute load average (the machine is shared; we record how busy it was)."""
    return os.getloadavg()[0]


def wait_idle(max_load: float = 0.6, timeout_s: float = 60.0, echo: Any = print) -> float:
    """Wait (bounded) until the 1-minute load average drops below max_load; returns the last reading."""
    deadline = time.monotonic() + timeout_s
    load = loadavg_1m()
    warned = False
    while load > max_load and time.monotonic() < deadline:
        if not warned:
            echo(f"machine busy (load {load:.2f}); waiting up to {timeout_s:.0f}s for it to settle ...")
            warned = True
        time.sleep(2.0)
        load = loadavg_1m()
    if load > max_load:
        echo(f"warning: measuring on a busy machine (load {load:.2f}); figures will be noisy")
    return load


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = cpu_model()
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def pct(values: list[float] | np.ndarray, q: float) -> float:
    """Percentile (linear interpolation); NaN for no values."""
    arr = np.asarray(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@dataclass
class Streamed:
    """What the client saw of one streamed chat completion (times from when it was sent)."""

    ttft_ms: float = math.nan
    jct_ms: float = math.nan
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


async def stream_chat(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, tokens: int, send_at_s: float
) -> Streamed:
    """At perf_counter() == send_at_s, stream a chat completion of exactly `tokens` tokens (ignore_eos).

    Records the first content token, the end and the final usage block; a failure is a result too.
    """
    out = Streamed()
    delay = send_at_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    out.error = str(obj["error"].get("message"))
                    break
                choices = obj.get("choices")
                if choices and math.isnan(out.ttft_ms) and choices[0]["delta"].get("content"):
                    out.ttft_ms = (time.perf_counter() - start) * 1000.0
                if obj.get("usage"):
                    out.usage = obj["usage"]
    except Exception as exc:  # a client-side failure is a result too
        out.error = repr(exc)
        return out
    out.jct_ms = (time.perf_counter() - start) * 1000.0
    return out
