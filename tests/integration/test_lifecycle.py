"""`muserve up` as users run it, deadlines, and the powerd <-> worker closed loop on a simulated GPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import nats

from services.common import subjects
from services.common.settings import DEFAULT_CHAT_MODEL, Settings
from services.launcher import free_port
from tests.integration.harness import LiveCluster, wait_until


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_starts_everything_and_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    env = {**os.environ, "MUSERVE_WORKER__MODE": "noop", "MUSERVE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--noop",
            "--no-embeddings",
            "--port",
            str(port),
            "--nats-port",
            str(nats_port),
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    return r.status == 200
            except (OSError, urllib.error.HTTPError):
                return False

        wait_until(ready, 60, "muserve up to be ready")
        body = json.dumps({"model": DEFAULT_CHAT_MODEL, "prompt": "hi", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        assert (tmp_path / "jetstream").is_dir()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped." in out
        assert not _listening(port) and not _listening(nats_port)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_deadline_gives_504_and_frees_the_worker(live: LiveCluster) -> None:
    body = json.dumps(
        {
            "model": DEFAULT_CHAT_MODEL,
            "prompt": "Go on forever.",
            "max_tokens": 4000,
            "ignore_eos": True,
            "timeout_s": 0.5,
        }
    ).encode()
    req = urllib.request.Request(
        f"{live.gateway}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    t0 = time.monotonic()
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("expected 504")
    except urllib.error.HTTPError as e:
        assert e.code == 504 and json.loads(e.read())["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 5


async def test_deadline_on_nats_entry_aborts_the_running_job(live: LiveCluster) -> None:
    nc = await nats.connect(live.nats_url)
    try:
        payload = msgpack.packb(
            {"prompt": "Go on.", "max_tokens": 4000, "ignore_eos": True, "timeout_s": 0.5}
        )
        reply = msgpack.unpackb(
            (await nc.request(subjects.generate(DEFAULT_CHAT_MODEL), payload, timeout=20)).data
        )
        assert reply["error"]["code"] == "timeout" and reply["usage"]["completion_tokens"] < 4000
    finally:
        await nc.close()


async def test_simulated_clock_stretches_steps_and_prices_energy(live: LiveCluster) -> None:
    node = Settings().node
    nc = await nats.connect(live.nats_url)
    steps: list[dict[str, object]] = []
    power: list[dict[str, object]] = []

    async def on_steps(msg: object) -> None:
        steps.append(msgpack.unpackb(msg.data))  # type: ignore[attr-defined]

    async def on_power(msg: object) -> None:
        power.append(msgpack.unpackb(msg.data))  # type: ignore[attr-defined]

    try:
        await nc.subscribe(subjects.step_telemetry(node, 0), cb=on_steps)
        await nc.subscribe(subjects.power_telemetry(node, 0), cb=on_power)
        reply = msgpack.unpackb(
            (
                await nc.request(
                    subjects.generate(DEFAULT_CHAT_MODEL),
                    msgpack.packb({"prompt": "Hi", "max_tokens": 24, "ignore_eos": True}),
                    timeout=60,
                )
            ).data
        )
        usage = reply["usage"]
        assert usage["energy_simulated"] is True and usage["energy_j"] > 0
        wait_until(lambda: any(s["steps"] for s in steps), 5, "step telemetry with steps")
        busy = [s for s in steps if s["steps"]]
        clock = power[-1]
        assert clock["simulated"] is True and clock["profile"] == "v100"
        # Near-idle queue: the threshold policy runs the GPU below max, and the worker's steps take longer.
        assert clock["clock_mhz"] < clock["max_clock_mhz"], clock
        assert max(float(s["slowdown"]) for s in busy) > 1.0  # type: ignore[arg-type]
    finally:
        await nc.close()
