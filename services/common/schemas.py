"""Wire schemas: every message muserve puts on NATS, as pydantic v2 models (msgpack-encoded)."""

from __future__ import annotations

import random
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MAX_STOP_STRINGS = 8
MAX_EMBED_INPUTS = 256


def new_request_id() -> str:
    """A fresh 128-bit request id (also the JetStream de-duplication id); ids need not be secret."""
    return f"{random.getrandbits(128):032x}"


class Wire(BaseModel):
    """Base of all wire messages: versioned, strict about unknown versions, tolerant of extra keys."""

    model_config = ConfigDict(extra="ignore", frozen=False, populate_by_name=True)

    v: int = SCHEMA_VERSION

    @model_validator(mode="after")
    def _check_version(self) -> Wire:
        if self.v > SCHEMA_VERSION or self.v < 1:
            raise ValueError(f"unsupported schema version {self.v}; this build speaks {SCHEMA_VERSION}")
        return self


class ErrorCode(StrEnum):
    """Error codes on the wire; each maps to one HTTP status at the gateway."""

    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    CONTEXT_LENGTH = "context_length_exceeded"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.CONTEXT_LENGTH: 413,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}


class ErrorInfo(BaseModel):
    """An error reply: a code, a human message, and the offending field if any."""

    code: ErrorCode
    message: str
    param: str | None = None

    @property
    def http_status(self) -> int:
        """HTTP status the gateway answers with."""
        return HTTP_STATUS[self.code]


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(Wire):
    """A text-generation request, as sent on `muserve.v1.generate.<model>`."""

    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    timeout_s: float | None = Field(default=None, gt=0.0)
    # Counted by the gateway when it has the tokenizer; workers always count again.
    prompt_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self

    def prompt_text(self) -> str:
        """The prompt's text (chat turns joined), for predictors and size checks."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return "\n".join(m.content for m in self.messages)


class EmbedRequest(Wire):
    """An embedding request, as sent on `muserve.v1.embed.<model>`."""

    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)
    model: str | None = None
    input: list[str] = Field(min_length=1, max_length=MAX_EMBED_INPUTS)
    timeout_s: float | None = Field(default=None, gt=0.0)


class Prediction(BaseModel):
    """What the length predictor says about one request."""

    length_class: int
    # Expected tokens of the class for this model (unbiased for summing queued work).
    predicted_tokens: float
    predictor: str
    # The predictor's continuous point estimate, when it has one: finer than the class for ordering.
    score_tokens: float | None = None


class Usage(BaseModel):
    """Token counts plus muserve's timings, prediction and energy of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    exec_ms: float | None = None
    length_class: int | None = None
    predicted_tokens: float | None = None
    # The continuous estimate SSJF ordered by, when the predictor gave one.
    score_tokens: float | None = None
    predictor: str | None = None
    energy_j: float | None = None
    energy_simulated: bool | None = None
    worker_id: str | None = None
    attempt: int = 1


class TokenChunk(Wire):
    """One piece of a streamed answer; the last one has finished=True and usage (or an error)."""

    request_id: str
    index: int = 0
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    attempt: int = 1


class EmbedResult(Wire):
    """The single reply to an EmbedRequest."""

    request_id: str
    embeddings: list[list[float]] = Field(default_factory=list)
    usage: Usage | None = None
    error: ErrorInfo | None = None
    finished: bool = True


class JobKind(StrEnum):
    """What a job asks of a worker."""

    GENERATE = "generate"
    EMBED = "embed"


class Job(Wire):
    """An accepted request as the scheduler persists it on JetStream and hands it to a worker."""

    request_id: str
    kind: JobKind
    model: str
    group: str
    reply_to: str
    headers: dict[str, str] = Field(default_factory=dict)
    generate: GenerateRequest | None = None
    embed: EmbedRequest | None = None
    prediction: Prediction | None = None
    predicted_exec_ms: float = 0.0
    # The exec estimate's parts: tokens expected (prediction capped by max_tokens) and cost per token.
    predicted_tokens: float = 0.0
    ms_per_token: float = 0.0
    # What SSJF orders by when it differs from predicted_exec_ms (a continuous score, or the oracle's truth).
    rank_exec_ms: float | None = None
    accepted_at_s: float
    deadline_s: float | None = None
    attempt: int = 1
    # Set at dispatch so the worker can report queue wait without clock sync (same host).
    dispatched_at_s: float | None = None


class PredictItem(BaseModel):
    """One request to predict."""

    request_id: str
    model: str
    text: str


class PredictRequest(Wire):
    """A batch of requests to predict (usually one; the predictor batches across messages)."""

    items: list[PredictItem] = Field(min_length=1, max_length=1024)


class PredictReply(Wire):
    """Predictions in the order of the request's items, or an error."""

    predictions: list[Prediction] = Field(default_factory=list)
    error: ErrorInfo | None = None


class PredictionNote(Wire):
    """A prediction that arrived after its job was dispatched (the fast path does not wait for it)."""

    request_id: str
    prediction: Prediction
    predicted_exec_ms: float


class PullRequest(Wire):
    """A worker announces free slots; the reply carries up to that many jobs."""

    worker_id: str
    group: str
    models: list[str]
    free_slots: int = Field(ge=1)
    wait_ms: float = Field(default=1000.0, ge=0.0, le=60_000.0)


class PullReply(Wire):
    """Jobs handed to a worker (possibly none, when the long poll expired)."""

    jobs: list[Job] = Field(default_factory=list)


class InflightInfo(BaseModel):
    """One job a worker is running, and how many tokens it has streamed so far."""

    request_id: str
    emitted_tokens: int = 0


class WorkerHeartbeat(Wire):
    """A worker's liveness, capacity and in-flight set."""

    worker_id: str
    group: str
    node: str
    gpu: int
    models: list[str]
    kind: Literal["chat", "embedding", "noop"]
    slots: int
    free_slots: int
    inflight: list[InflightInfo] = Field(default_factory=list)
    # Completions sent but not yet confirmed by a scheduler (survives a scheduler restart).
    unconfirmed_done: list[str] = Field(default_factory=list)
    ts_s: float


class DoneReport(Wire):
    """A worker finished (or failed) a job; the scheduler acks it on JetStream."""

    request_id: str
    worker_id: str
    group: str
    model: str
    ok: bool = True
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    exec_ms: float = 0.0
    ttft_ms: float | None = None
    energy_j: float | None = None
    attempt: int = 1
    # Time the (simulated or locked) clock added to this job's steps beyond max clock.
    stretch_ms: float = 0.0


class DoneAck(Wire):
    """The scheduler's confirmation of a DoneReport."""

    request_id: str
    known: bool


class CompletionRecord(Wire):
    """A finished request's true length next to its prediction (predictors learn from these)."""

    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    prediction: Prediction | None = None
    queue_ms: float
    exec_ms: float
    # Added later (optional, so older workers still validate): where it ran, its energy estimate, and
    # its exec time without the simulated-clock stretch (what the scheduler's max-clock fit wants).
    energy_j: float | None = None
    energy_simulated: bool | None = None
    worker_id: str | None = None
    node: str | None = None
    gpu: int | None = None
    exec_max_clock_ms: float | None = None


class CancelRequest(Wire):
    """Stop a request (client went away or timed out)."""

    request_id: str
    reason: str = "cancelled"


class WorkerRef(BaseModel):
    """Where a worker runs."""

    worker_id: str
    node: str
    gpu: int
    slots: int


class QueueTelemetry(Wire):
    """A model group's queue state, published at a fixed interval."""

    group: str
    ts_s: float
    depth: int
    running: int
    predicted_work_ms: float
    running_work_ms: float
    # Running requests that already outlived their prediction (their remaining work was revised up).
    mispredicted: int = 0
    oldest_wait_ms: float
    arrivals_per_s: float
    completions_per_s: float
    workers: list[WorkerRef] = Field(default_factory=list)
    policy: str
    # Added for the SLO-aware clock policy (optional: None from an older scheduler). Smoothed over
    # `window_s`: arrival rate and mean predicted exec time (at max clock) of the arrivals in it.
    window_s: float | None = None
    mean_arrivals_per_s: float | None = None
    mean_exec_ms: float | None = None
    # Relative SLO: a request may take slo_scale x its predicted exec time at max clock, waiting included.
    slo_scale: float | None = None
    # Most urgent request (queued or running): time left to its deadline / its predicted work left.
    slack_slowdown: float | None = None
    # Share of the requests completed in the last `slo_window_s` that met their SLO (None: none did).
    slo_attainment: float | None = None
    # The same share counting only the misses the clock caused (met at max clock, missed at the clock
    # they ran at): the feedback a clock policy should act on (misses in a burst beyond capacity at
    # max clock are not its doing).
    clock_slo_attainment: float | None = None
    slo_completions: int = 0
    slo_window_s: float | None = None


class StepTelemetry(Wire):
    """A worker's decode steps aggregated over one interval."""

    worker_id: str
    node: str
    gpu: int
    ts_s: float
    interval_ms: float
    steps: int
    busy_ms: float
    tokens: int
    mean_batch: float
    p50_step_ms: float | None = None
    max_step_ms: float | None = None
    slowdown: float


class PowerTelemetry(Wire):
    """What powerd did to one GPU and what it measured."""

    node: str
    gpu: int
    ts_s: float
    name: str
    clock_mhz: int
    max_clock_mhz: int
    power_w: float
    energy_j: float
    utilization: float
    simulated: bool
    profile: str | None = None
    policy: str
    # Added later: the clock powerd locked (None: driver default) and whether it only logs decisions.
    locked_clock_mhz: int | None = None
    dry_run: bool = False
