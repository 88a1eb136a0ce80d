"""Shared benchmark helpers: machine checks, percentiles, report writing."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

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
