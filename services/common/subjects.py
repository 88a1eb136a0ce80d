"""Every NATS subject and JetStream name muserve uses, in one place, versioned."""

from __future__ import annotations

import re

PREFIX = "muserve.v1"

# Tokens of a subject must not contain separators or wildcards.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]+")

JOBS_STREAM = "MUSERVE_JOBS"
PREDICT = f"{PREFIX}.predict"
PREDICTOR_QUEUE = "muserve-predictor"
SCHEDULER_QUEUE = "muserve-scheduler"
CANCEL = f"{PREFIX}.cancel"
WORKER_HEARTBEAT_ALL = f"{PREFIX}.workers.heartbeat.>"
QUEUE_TELEMETRY_ALL = f"{PREFIX}.telemetry.queue.>"
COMPLETIONS_ALL = f"{PREFIX}.completions.>"
GENERATE_ALL = f"{PREFIX}.generate.*"
EMBED_ALL = f"{PREFIX}.embed.*"


def check_token(value: str, what: str = "name") -> str:
    """Return value if it is usable as one subject token, else raise ValueError."""
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9_-]+ (it becomes a NATS subject token)")
    return value


def generate(model: str) -> str:
    """Entry subject for text generation on one model."""
    return f"{PREFIX}.generate.{model}"


def embed(model: str) -> str:
    """Entry subject for embeddings on one model."""
    return f"{PREFIX}.embed.{model}"


def jobs(group: str) -> str:
    """JetStream subject holding a model group's accepted jobs."""
    return f"{PREFIX}.jobs.{group}"


def jobs_consumer(group: str) -> str:
    """Durable consumer name of a group's scheduler."""
    return f"sched-{group}"


def jobs_deliver(group: str) -> str:
    """Where JetStream pushes a group's jobs to its scheduler."""
    return f"{PREFIX}.sched.{group}.deliver"


def sched_pull(group: str) -> str:
    """Workers announce free slots here and receive jobs in the reply."""
    return f"{PREFIX}.sched.{group}.pull"


def sched_done(group: str) -> str:
    """Workers report a finished job here (request/reply, retried until confirmed)."""
    return f"{PREFIX}.sched.{group}.done"


def worker_heartbeat(group: str, worker_id: str) -> str:
    """A worker's liveness and in-flight set."""
    return f"{PREFIX}.workers.heartbeat.{group}.{worker_id}"


def worker_cancel(worker_id: str) -> str:
    """The scheduler forwards cancellations of dispatched jobs here."""
    return f"{PREFIX}.worker.{worker_id}.cancel"


def worker_prediction(worker_id: str) -> str:
    """Late predictions of jobs already running on a worker."""
    return f"{PREFIX}.worker.{worker_id}.prediction"


def completions(model: str) -> str:
    """Completion records (true lengths) that predictors learn from."""
    return f"{PREFIX}.completions.{model}"


def queue_telemetry(group: str) -> str:
    """Queue telemetry of one model group."""
    return f"{PREFIX}.telemetry.queue.{group}"


def step_telemetry(node: str, gpu: int) -> str:
    """Aggregated decode-step telemetry of the worker on one GPU."""
    return f"{PREFIX}.telemetry.steps.{node}.{gpu}"


def step_telemetry_node(node: str) -> str:
    """All step telemetry of one node."""
    return f"{PREFIX}.telemetry.steps.{node}.*"


def power_telemetry(node: str, gpu: int) -> str:
    """Clock, power and energy of one GPU, published by powerd."""
    return f"{PREFIX}.telemetry.power.{node}.{gpu}"


def status(service: str) -> str:
    """Per-service status endpoint subject (NATS micro)."""
    return f"{PREFIX}.status.{service}"
