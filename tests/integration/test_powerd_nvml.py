"""`muserve powerd` on the NVML backend against the fake libnvidia-ml: locks clocks, resets them on exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats

from services.common import subjects
from services.launcher import EmbeddedNats
from tests.fakenvml import fake_nvml_dir, read_fake_nvml_state

__all__ = ["fake_nvml_dir"]


async def test_powerd_locks_then_resets_on_sigterm(
    nats_server: EmbeddedNats, fake_nvml_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "gpu-state"
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{fake_nvml_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "FAKE_NVML_ENABLE": "1",
        "FAKE_NVML_STATE_FILE": str(state),
        "MUSERVE_NATS_URL": nats_server.url,
        "MUSERVE_NODE": "fakenode",
        "MUSERVE_POWERD__BACKEND": "nvml",
        "MUSERVE_POWERD__POLICY": "queue-threshold",
        "MUSERVE_POWERD__INTERVAL_MS": "100",
    }
    nc = await nats.connect(nats_server.url)
    seen: list[dict[str, object]] = []

    async def on_power(msg: object) -> None:
        seen.append(msgpack.unpackb(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.power_telemetry("fakenode", 0), cb=on_power)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "powerd"], env=env)  # noqa: ASYNC220
    try:
        # Idle queue: the threshold policy locks a low clock on the (fake) V100.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (state.exists() and read_fake_nvml_state(state).get(0)):
            await nc.flush()
            await asyncio.sleep(0.1)
        locked = read_fake_nvml_state(state).get(0)
        assert locked is not None and locked[0] == locked[1] < 1530, locked
        assert seen and seen[-1]["simulated"] is False and seen[-1]["clock_mhz"] == locked[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert read_fake_nvml_state(state).get(0) is None  # reset on exit
    finally:
        if proc.poll() is None:
            proc.kill()
        await nc.close()
