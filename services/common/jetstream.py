"""Idempotent JetStream set-up: the jobs stream and each group's durable consumer."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from services.common import subjects

log = logging.getLogger(__name__)

# Dedup window for Nats-Msg-Id (= request id): a retried publish of the same request is stored once.
DUPLICATE_WINDOW_S = 120.0
# Safety net only: jobs are removed when acked; nothing should live this long.
JOB_MAX_AGE_S = 24 * 3600.0


def jobs_stream_config() -> StreamConfig:
    """The work-queue stream that holds every accepted, unfinished job."""
    return StreamConfig(
        name=subjects.JOBS_STREAM,
        subjects=[f"{subjects.PREFIX}.jobs.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=JOB_MAX_AGE_S,
    )


def jobs_consumer_config(group: str, ack_wait_s: float, max_pending: int) -> ConsumerConfig:
    """A group scheduler's durable push consumer: explicit acks, acked only on completion."""
    return ConsumerConfig(
        durable_name=subjects.jobs_consumer(group),
        deliver_subject=subjects.jobs_deliver(group),
        filter_subject=subjects.jobs(group),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_pending,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when its settings drifted; safe to call repeatedly."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s", config.name)
        return
    cur = info.config
    if (
        sorted(cur.subjects or []) != sorted(config.subjects or [])
        or cur.duplicate_window != config.duplicate_window
        or cur.max_age != config.max_age
    ):
        await js.update_stream(config)
        log.info("updated stream %s", config.name)


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, *, recreate: bool = False
) -> None:
    """Create the durable consumer; with recreate=True, drop it first so unacked jobs redeliver at once."""
    assert config.durable_name is not None
    if recreate:
        try:
            await js.delete_consumer(stream, config.durable_name)
            log.info("recreating consumer %s to reclaim unacked jobs", config.durable_name)
        except NotFoundError:
            pass
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        return
    cur = info.config
    if cur.ack_wait != config.ack_wait or cur.max_ack_pending != config.max_ack_pending:
        await js.add_consumer(stream, config)  # add on an existing durable updates it
