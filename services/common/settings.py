"""Configuration: pydantic settings, env prefix MUSERVE_, nested by `__` (MUSERVE_WORKER__MAX_SEQS=4)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.subjects import check_token
from services.predictor.artifacts import default_edges_tokens

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"


class ModelSpec(BaseModel):
    """One servable model: its name (the `model` field of requests), kind, weights and scheduling facts."""

    name: str
    kind: Literal["chat", "embedding"]
    # "smollm2" and "minilm" are the packaged weights; anything else is a local HF folder path.
    source: str
    group: str
    max_context_tokens: int = Field(gt=0)
    # Frequency sensitivity s in t(f) = t(fmax) * (s * fmax / f + 1 - s); 1 = compute bound.
    sensitivity: float = Field(default=0.6, ge=0.0, le=1.0)
    # Default exec-time model at max clock until measured: const_ms + ms_per_token * tokens.
    exec_const_ms: float = Field(default=50.0, ge=0.0)
    exec_ms_per_token: float = Field(default=25.0, ge=0.0)
    # Prior for the baseline predictor until real lengths are observed.
    median_tokens: float = Field(default=256.0, gt=0.0)
    # The name the length predictor is asked about (and learns from) for this model: an LLM it was
    # trained on whose verbosity this one shares, e.g. a fine-tune served under a new name. None: name.
    predict_as: str | None = None

    @field_validator("name", "group")
    @classmethod
    def _token(cls, v: str) -> str:
        return check_token(v, "model/group name")

    @property
    def length_model(self) -> str:
        """The model name the length predictor knows this model by."""
        return self.predict_as or self.name


class GroupSpec(BaseModel):
    """A model group: one queue and its policy."""

    # "oracle" orders replayed requests (ignore_eos) by their true length: a benchmark baseline only.
    policy: Literal["fcfs", "ssjf", "oracle"] = "ssjf"
    max_queue: int = Field(default=256, ge=1)
    # Aging bound: promote a request that waited longer than this multiple of its predicted exec time.
    # 6 keeps p99 JCT within 1.2x FCFS's on both low- and high-variance lengths in the simulated study
    # (bench/results/sim-aging.md); 8 overshoots on high variance, 2 gives away most of SSJF's gain.
    aging_factor: float = Field(default=6.0, gt=0.0)
    max_wait_ms: float = Field(default=60_000.0, gt=0.0)
    # Relative SLO of the group's requests (JCT <= slo_scale x predicted exec at max clock); None:
    # powerd.slo_scale. The scheduler publishes slack and attainment against it.
    slo_scale: float | None = Field(default=None, gt=0.0)


def default_models() -> list[ModelSpec]:
    """The catalogue served out of the box."""
    return [
        ModelSpec(
            name=DEFAULT_CHAT_MODEL,
            kind="chat",
            source="smollm2",
            group="chat",
            max_context_tokens=8192,
            sensitivity=0.6,
            exec_const_ms=60.0,
            exec_ms_per_token=40.0,
            median_tokens=256.0,
        ),
        ModelSpec(
            name=DEFAULT_EMBED_MODEL,
            kind="embedding",
            source="minilm",
            group="embed",
            max_context_tokens=512,
            sensitivity=0.9,
            exec_const_ms=20.0,
            exec_ms_per_token=0.0,
            median_tokens=1.0,
        ),
    ]


def default_groups() -> dict[str, GroupSpec]:
    """One SSJF queue for LLMs, one FCFS queue for single-shot models."""
    return {"chat": GroupSpec(policy="ssjf"), "embed": GroupSpec(policy="fcfs")}


class GatewaySettings(BaseModel):
    """HTTP front door."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    request_timeout_s: float = Field(default=300.0, gt=0.0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    default_max_tokens: int = Field(default=256, ge=1)


class SchedulerSettings(BaseModel):
    """Queues, dispatch and durability."""

    # Groups this instance owns (None: all). A group has exactly one scheduler.
    groups: list[str] | None = None
    telemetry_interval_ms: float = Field(default=500.0, gt=0.0)
    worker_lease_ms: float = Field(default=3000.0, gt=0.0)
    # The shipped predictor reads 16 layers of SmolLM2 (~30-50 ms a prompt on 2 CPU cores): a burst of
    # arrivals queues there. Absent predictors answer "no responders" at once; only a hung one waits.
    predictor_timeout_ms: float = Field(default=1000.0, gt=0.0)
    ack_wait_s: float = Field(default=300.0, gt=0.0)
    max_attempts: int = Field(default=3, ge=1)
    # After a restart, wait this long for worker heartbeats before re-dispatching recovered jobs.
    recovery_grace_ms: float = Field(default=2500.0, ge=0.0)
    # Queue telemetry smooths arrival rate and mean exec time over this window (as the simulator does).
    rate_window_s: float = Field(default=20.0, gt=0.0)
    # SLO attainment in queue telemetry: requests completed within this window.
    slo_window_s: float = Field(default=60.0, gt=0.0)


class WorkerSettings(BaseModel):
    """One worker process: one model on one (real or simulated) GPU."""

    model: str = DEFAULT_CHAT_MODEL
    mode: Literal["model", "noop"] = "model"
    max_seqs: int = Field(default=8, ge=1)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    num_hidden_layers: int | None = Field(default=None, ge=1)
    gpu: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    heartbeat_ms: float = Field(default=1000.0, gt=0.0)
    pull_wait_ms: float = Field(default=1000.0, gt=0.0)
    step_telemetry_ms: float = Field(default=500.0, gt=0.0)
    # noop mode (control-plane benchmark): a request gets min(max_tokens, this) tokens at once.
    noop_max_tokens: int = Field(default=4096, ge=1)
    # Stretch each step by the simulated GPU's slowdown at its current clock.
    simulate_clock: bool = True
    # On SIGTERM, running jobs get this long to finish before the worker exits.
    drain_s: float = Field(default=10.0, ge=0.0)


class PredictorSettings(BaseModel):
    """Length predictor service."""

    # "proxy": the trained MiniLM proxy model; "median": the per-model median baseline.
    kind: Literal["proxy", "median"] = "proxy"
    # Artifact folder of the proxy model (None: the one shipped in services/predictor/artifacts/default,
    # SmolLM2's first 16 layers; services/predictor/artifacts/minilm is the fast, less accurate one).
    artifact: Path | None = None
    # Who answers calls that would wait longer than max_wait_ms behind the proxy model (a burst on a
    # CPU): the shipped MiniLM artifact, the median baseline, or nobody (they wait).
    overflow: Literal["minilm", "median", "none"] = "minilm"
    max_wait_ms: float = Field(default=250.0, gt=0.0)
    # The proxy model may keep the CPU busy this share of the time; the overflow answers the rest (on a
    # 2-core box the gateway, scheduler and NATS need the cores more than a better estimate does).
    max_busy_share: float = Field(default=0.1, gt=0.0, le=1.0)
    # One torch thread: on a shared CPU two threads wait on each other (10-100x slower under load).
    threads: int | None = Field(default=1, ge=1)
    # 0 = opportunistic batching: run at once when idle, batch whatever arrived while busy.
    batch_window_ms: float = Field(default=0.0, ge=0.0)
    max_batch: int = Field(default=64, ge=1)
    # CPU priority (nice) of the predictor process: its work is off every request's critical path, so
    # where it shares cores with the gateway and scheduler it yields to them. 0 keeps normal priority.
    nice: int = Field(default=10, ge=0, le=19)
    # Class edges of the median baseline; the proxy model brings its own. By default the shipped
    # artifact's (p25/p50/p75/p99 of its training answers), so both number classes alike.
    edges_tokens: list[int] = Field(default_factory=default_edges_tokens)

    @field_validator("edges_tokens")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)) or v[0] <= 0:
            raise ValueError("edges_tokens must be positive and strictly increasing")
        return v


class PowerdSettings(BaseModel):
    """Per-node power daemon."""

    backend: Literal["auto", "nvml", "sim"] = "auto"
    profile: str = "v100"
    gpus: int = Field(default=1, ge=1)
    policy: Literal["max-clock", "queue-threshold", "slo-aware"] = "queue-threshold"
    # slo-aware: a request may take slo_scale x its predicted exec time at max clock, waiting included.
    slo_scale: float = Field(default=5.0, gt=0.0)
    interval_ms: float = Field(default=250.0, gt=0.0)
    dry_run: bool = False
    # Prometheus endpoint (DCGM/Triton metric names): http://metrics_host:metrics_port/metrics.
    # 0 disables it; a port already taken only costs the endpoint (powerd logs it and runs on).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9410, ge=0, le=65535)
    # "I locked GPU i at f MHz" is kept in <state_dir>/<node>.json so a restart after a crash knows
    # (default: <data_dir>/powerd).
    state_dir: Path | None = None
    # On NVML GPUs, a watchdog process resets the clocks if powerd dies without doing so (kill -9).
    watchdog: bool = True


class OtelSettings(BaseModel):
    """OpenTelemetry tracing."""

    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Short by default so traces show up quickly; raise for heavy load.
    export_delay_ms: int = Field(default=500, ge=1)


class Settings(BaseSettings):
    """All of muserve's configuration; every field can be set from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="MUSERVE_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    nats_url: str = "nats://127.0.0.1:14222"
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    cache: Path = Path.home() / ".cache" / "muserve"
    data_dir: Path = Path.home() / ".local" / "share" / "muserve"
    log_level: str = "INFO"
    models: list[ModelSpec] = Field(default_factory=default_models)
    groups: dict[str, GroupSpec] = Field(default_factory=default_groups)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    predictor: PredictorSettings = Field(default_factory=PredictorSettings)
    powerd: PowerdSettings = Field(default_factory=PowerdSettings)
    otel: OtelSettings = Field(default_factory=OtelSettings)

    @field_validator("node")
    @classmethod
    def _node_token(cls, v: str) -> str:
        return check_token(v.replace(".", "-"), "node")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in models: {names}")
        for m in self.models:
            if m.group not in self.groups:
                raise ValueError(
                    f"model {m.name!r} names group {m.group!r}, not in groups {list(self.groups)}"
                )
        for g in self.groups:
            check_token(g, "group")
        if self.scheduler.groups is not None:
            unknown = set(self.scheduler.groups) - set(self.groups)
            if unknown:
                raise ValueError(f"scheduler.groups names unknown groups {sorted(unknown)}")
        return self

    def model(self, name: str) -> ModelSpec | None:
        """The catalogue entry for a model name."""
        for m in self.models:
            if m.name == name:
                return m
        return None

    def length_model(self, name: str) -> str:
        """The name the length predictor knows a served model by (its predict_as, else its own)."""
        spec = self.model(name)
        return name if spec is None else spec.length_model

    def models_in(self, group: str) -> list[ModelSpec]:
        """Models served by one group."""
        return [m for m in self.models if m.group == group]
