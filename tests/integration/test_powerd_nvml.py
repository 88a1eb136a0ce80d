"""`muserve powerd` on the NVML backend against the fake libnvidia-ml: locks clocks, resets them on exit,
after a SIGKILL (next start, or the watchdog), and serves DCGM/Triton metrics over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgpack
import nats
from prometheus_client.parser import text_string_to_metric_families

from services.common import subjects
from services.launcher import EmbeddedNats, free_port
from tests.fakenvml import fake_nvml_dir, read_fake_nvml_log, read_fake_nvml_state

__all__ = ["fake_nvml_dir"]


def powerd_env(nats_url: str, lib_dir: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """A powerd on the fake NVML, with its state under tmp (never the user's data dir)."""
    return {
        **os.environ,
        "LD_LIBRARY_PATH": f"{lib_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "FAKE_NVML_ENABLE": "1",
        "FAKE_NVML_STATE_FILE": str(tmp / "gpu-state"),
        "FAKE_NVML_LOG_FILE": str(tmp / "gpu-log"),
        "FAKE_NVML_PERSIST": "1",  # a lock outlives the process that set it, as on hardware
        "MUSERVE_NATS_URL": nats_url,
        "MUSERVE_NODE": "fakenode",
        "MUSERVE_DATA_DIR": str(tmp / "data"),
        "MUSERVE_POWERD__BACKEND": "nvml",
        "MUSERVE_POWERD__POLICY": "queue-threshold",
        "MUSERVE_POWERD__INTERVAL_MS": "100",
        "MUSERVE_POWERD__METRICS_PORT": "0",
        **extra,
    }


def start_powerd(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "services.cli", "powerd"], env=env)


async def wait_for(pred: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def locked_low(state: Path) -> bool:
    lock = read_fake_nvml_state(state).get(0) if state.exists() else None
    return lock is not None and lock[0] == lock[1] < 1530


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_powerd_locks_then_resets_on_sigterm(
    nats_server: EmbeddedNats, fake_nvml_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "gpu-state"
    env = powerd_env(nats_server.url, fake_nvml_dir, tmp_path)
    nc = await nats.connect(nats_server.url)
    seen: list[dict[str, object]] = []

    async def on_power(msg: object) -> None:
        seen.append(msgpack.unpackb(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.power_telemetry("fakenode", 0), cb=on_power)
    proc = start_powerd(env)
    try:
        # Idle queue: the threshold policy locks a low clock on the (fake) V100.
        await wait_for(lambda: locked_low(state) and seen, 30, "a low clock lock")
        locked = read_fake_nvml_state(state)[0]
        assert locked is not None
        await wait_for(lambda: seen[-1]["clock_mhz"] == locked[0], 5, "telemetry of the lock")
        assert seen[-1]["simulated"] is False and seen[-1]["locked_clock_mhz"] == locked[0]
        note = tmp_path / "data" / "powerd" / "fakenode.json"
        assert json.loads(note.read_text())["locked_mhz"] == {"0": locked[0]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert read_fake_nvml_state(state).get(0) is None  # reset on exit
        assert not note.exists()  # nothing left locked, nothing to note
    finally:
        if proc.poll() is None:
            proc.kill()
        await nc.close()


async def test_next_start_resets_clocks_after_sigkill(
    nats_server: EmbeddedNats, fake_nvml_dir: Path, tmp_path: Path
) -> None:
    state, log = tmp_path / "gpu-state", tmp_path / "gpu-log"
    port = free_port()
    env = powerd_env(
        nats_server.url,
        fake_nvml_dir,
        tmp_path,
        MUSERVE_POWERD__WATCHDOG="false",  # only the next start can clean up
        MUSERVE_POWERD__METRICS_PORT=str(port),
    )
    first = start_powerd(env)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for(lambda: locked_low(state), 30, "the first powerd's lock")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        await asyncio.sleep(0.5)
        assert locked_low(state)  # nobody reset it: the GPU stays locked at a low clock
        note = json.loads((tmp_path / "data" / "powerd" / "fakenode.json").read_text())
        assert note["pid"] == first.pid
        second = start_powerd(env)
        pid = second.pid
        await wait_for(lambda: any(e[0] == pid for e in read_fake_nvml_log(log)), 30, "the second powerd")
        mine = [e for e in read_fake_nvml_log(log) if e[0] == pid]
        assert mine[0][1:3] == ("reset", 0), mine  # its first act on the GPU was the reset
        # Its metrics endpoint reports the real (fake) GPU, labelled not simulated.
        await wait_for(lambda: locked_low(state), 30, "the second powerd's own lock")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        (sample,) = families["nv_gpu_power_usage"].samples
        assert sample.labels["simulated"] == "false" and sample.labels["gpu_uuid"].startswith("GPU-fa4e")
        (clock,) = families["DCGM_FI_DEV_SM_CLOCK"].samples
        assert clock.value < 1530 and clock.labels["modelName"] == "Tesla V100-SXM2-16GB"
        stop(second)
        assert second.returncode == 0 and read_fake_nvml_state(state).get(0) is None
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()


async def test_watchdog_resets_clocks_when_powerd_is_sigkilled(
    nats_server: EmbeddedNats, fake_nvml_dir: Path, tmp_path: Path
) -> None:
    state, log = tmp_path / "gpu-state", tmp_path / "gpu-log"
    proc = start_powerd(powerd_env(nats_server.url, fake_nvml_dir, tmp_path))
    try:
        await wait_for(lambda: locked_low(state), 30, "a low clock lock")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # No restart: the watchdog (a separate process) sees its pipe close and resets the GPU.
        await wait_for(lambda: read_fake_nvml_state(state).get(0, 1) is None, 15, "the watchdog's reset")
        last = read_fake_nvml_log(log)[-1]
        assert last[1:3] == ("reset", 0) and last[0] != proc.pid
        assert not (tmp_path / "data" / "powerd" / "fakenode.json").exists()
        watchdog_pid = last[0]
        await wait_for(lambda: not Path(f"/proc/{watchdog_pid}").exists(), 10, "the watchdog to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
