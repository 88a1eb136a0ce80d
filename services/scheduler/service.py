"""Scheduler service: ingress, JetStream durability, worker pulls and telemetry around GroupCore."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace

from services.common import subjects, tracing
from services.common.codec import CodecError, decode, encode
from services.common.jetstream import (
    ensure_consumer,
    ensure_stream,
    jobs_consumer_config,
    jobs_stream_config,
)
from services.common.nats_conn import TaskSet, concurrent, is_no_responders
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import (
    CancelRequest,
    CompletionRecord,
    DoneAck,
    DoneReport,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    ErrorInfo,
    GenerateRequest,
    Job,
    JobKind,
    Prediction,
    PredictionNote,
    PredictItem,
    PredictReply,
    PredictRequest,
    PullReply,
    PullRequest,
    TokenChunk,
    WorkerHeartbeat,
)
from services.common.settings import ModelSpec, Settings
from services.predictor.base import MedianLengthPredictor
from services.scheduler.core import GroupCore
from services.scheduler.exec_model import LinearExecModel
from services.scheduler.request_queue import make_request_queue

log = logging.getLogger("muserve.scheduler")
_tracer = tracing.tracer("muserve.scheduler")

# Cheap guard before any tokenizer sees a prompt: no tokenizer packs more bytes than this into a token
# on real text, so a longer prompt cannot fit the context (the worker still checks exactly).
MAX_BYTES_PER_TOKEN = 32
EXPIRE_TICK_S = 0.2


@dataclass
class ParkedPull:
    """A worker's pull waiting for work (long poll)."""

    reply: str
    worker_id: str
    free_slots: int
    timer: asyncio.TimerHandle | None = None


def error_reply(kind: JobKind, request_id: str, error: ErrorInfo, attempt: int = 1) -> bytes:
    """The final message a client gets when its request fails."""
    if kind is JobKind.EMBED:
        return encode(EmbedResult(request_id=request_id, error=error))
    return encode(
        TokenChunk(request_id=request_id, finished=True, finish_reason="error", error=error, attempt=attempt)
    )


class Scheduler:
    """Owns the groups named in settings.scheduler.groups (all by default)."""

    def __init__(self, settings: Settings, nc: Client, js: JetStreamContext) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        cfg = settings.scheduler
        self.owned = cfg.groups if cfg.groups is not None else list(settings.groups)
        now = time.time()
        self.cores: dict[str, GroupCore] = {}
        for g in self.owned:
            spec = settings.groups[g]
            queue = make_request_queue(
                spec.policy, aging_factor=spec.aging_factor, max_wait_ms=spec.max_wait_ms
            )
            self.cores[g] = GroupCore(
                g,
                queue,
                max_queue=spec.max_queue,
                worker_lease_s=cfg.worker_lease_ms / 1000.0,
                max_attempts=cfg.max_attempts,
                recovery_until_s=now + cfg.recovery_grace_ms / 1000.0,
                slo_scale=spec.slo_scale if spec.slo_scale is not None else settings.powerd.slo_scale,
                rate_window_s=cfg.rate_window_s,
                slo_window_s=cfg.slo_window_s,
            )
        self.parked: dict[str, deque[ParkedPull]] = {g: deque() for g in self.owned}
        self.handles: dict[str, Msg] = {}
        self.pending_ingress: set[str] = set()
        self.admitting = {g: 0 for g in self.owned}  # requests between admission check and enqueue
        self.queue_spans: dict[str, trace.Span] = {}
        self.fallback = MedianLengthPredictor(
            settings.predictor.edges_tokens, priors_tokens={m.name: m.median_tokens for m in settings.models}
        )
        self.fallback.name = "fallback-median"
        # exec_ms = const + k * tokens per model, fitted online from completion records.
        self.exec_models = {
            m.name: LinearExecModel(const_ms=m.exec_const_ms, ms_per_token=m.exec_ms_per_token)
            for m in settings.models
        }
        self.tasks = TaskSet()
        self.counters = {g: [0, 0] for g in self.owned}  # arrivals, completions at last telemetry
        self.started_s = now
        self.stats = {"accepted": 0, "rejected": 0, "completed": 0, "failed": 0, "redispatched": 0}

    # -- set-up ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create JetStream objects, subscriptions and loops."""
        await ensure_stream(self.js, jobs_stream_config())
        cfg = self.settings.scheduler
        for g in self.owned:
            # Push delivery: one message per job (no fetch requests on the hot path).
            await self.nc.subscribe(
                subjects.jobs_deliver(g), cb=self._delivery_cb(g), pending_msgs_limit=1_000_000
            )
            ccfg = jobs_consumer_config(
                g, cfg.ack_wait_s, max_pending=self.settings.groups[g].max_queue * 4 + 1024
            )
            # We are the group's only scheduler: recreating the consumer redelivers unacked jobs at once.
            await ensure_consumer(self.js, subjects.JOBS_STREAM, ccfg, recreate=True)
            await self.nc.subscribe(subjects.sched_pull(g), cb=concurrent(self.tasks, self._on_pull))
            await self.nc.subscribe(subjects.sched_done(g), cb=concurrent(self.tasks, self._on_done))
        owns_all = set(self.owned) == set(self.settings.groups)
        if owns_all:
            # Wildcards so that unknown models get an error reply instead of "no responders".
            entry = [subjects.GENERATE_ALL, subjects.EMBED_ALL]
        else:
            models = [m for m in self.settings.models if m.group in self.owned]
            entry = [
                subjects.generate(m.name) if m.kind == "chat" else subjects.embed(m.name) for m in models
            ]
        for subj in entry:
            await self.nc.subscribe(
                subj, queue=subjects.SCHEDULER_QUEUE, cb=concurrent(self.tasks, self._on_entry)
            )
        await self.nc.subscribe(subjects.WORKER_HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.nc.subscribe(subjects.CANCEL, cb=concurrent(self.tasks, self._on_cancel))
        await self.nc.subscribe(subjects.COMPLETIONS_ALL, cb=self._on_completion)
        self.tasks.spawn(self._expire_loop())
        self.tasks.spawn(self._telemetry_loop())
        self.tasks.spawn(self._progress_loop())
        await register_discovery(self.nc, "scheduler", self.info)
        log.info("scheduler ready for groups %s (pid %d)", self.owned, os.getpid())

    def info(self) -> dict[str, Any]:
        """Status for `$SRV` discovery and `muserve status`."""
        now = time.time()
        return {
            "groups": {
                g: {
                    "policy": c.queue.policy.value,
                    "queued": len(c.queue),
                    "jobs": len(c.jobs),
                    "workers": [w.worker_id for w in c.live_workers(now)],
                }
                for g, c in self.cores.items()
            },
            "exec_models": {
                name: {"const_ms": c, "ms_per_token": k, "samples": m.samples}
                for name, m in self.exec_models.items()
                for c, k in [m.coefficients()]
            },
            **self.stats,
            "uptime_s": now - self.started_s,
        }

    # -- ingress -------------------------------------------------------------------------------
    async def _on_entry(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("request on %s without a reply subject dropped", msg.subject)
            return
        kind = JobKind.EMBED if msg.subject.startswith(f"{subjects.PREFIX}.embed.") else JobKind.GENERATE
        model = msg.subject.rsplit(".", 1)[1]
        with tracing.span(_tracer, "scheduler.admit", context=tracing.extract(msg.headers)) as span:
            span.set_attribute("muserve.model", model)
            err, rid = await self._admit(msg, kind, model, span)
            if err is not None:
                self.stats["rejected"] += 1
                span.set_attribute("muserve.error", err.code.value)
                await self.nc.publish(msg.reply, error_reply(kind, rid, err))

    async def _admit(
        self, msg: Msg, kind: JobKind, model: str, span: trace.Span
    ) -> tuple[ErrorInfo | None, str]:
        """Validate, predict, persist and queue one request; returns an error for the client, if any."""
        req: GenerateRequest | EmbedRequest
        try:
            if kind is JobKind.GENERATE:
                req = decode(GenerateRequest, msg.data)
            else:
                req = decode(EmbedRequest, msg.data)
        except CodecError as exc:
            return exc.to_error(), _request_id_of(msg.data)
        rid = req.request_id
        span.set_attribute("muserve.request_id", rid)
        if req.model is not None and req.model != model:
            return ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"payload model {req.model!r} differs from subject model {model!r}",
                param="model",
            ), rid
        spec = self.settings.model(model)
        if spec is None:
            known = ", ".join(m.name for m in self.settings.models)
            return ErrorInfo(
                code=ErrorCode.UNKNOWN_MODEL,
                message=f"unknown model {model!r}; served: {known}",
                param="model",
            ), rid
        want = "chat" if kind is JobKind.GENERATE else "embedding"
        if spec.kind != want:
            return ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"model {model!r} is a {spec.kind} model; it cannot serve {kind.value} requests",
                param="model",
            ), rid
        core = self.cores.get(spec.group)
        if core is None:
            return ErrorInfo(
                code=ErrorCode.NO_WORKER, message=f"group {spec.group!r} is not scheduled here"
            ), rid
        size_err = _size_error(req, spec)
        if size_err is not None:
            return size_err, rid
        now = time.time()
        err = core.check_admission(rid, model, now, admitting=self.admitting[spec.group])
        if err is not None:
            return err, rid

        timeout_s = req.timeout_s or self.settings.gateway.request_timeout_s
        job = Job(
            request_id=rid,
            kind=kind,
            model=model,
            group=spec.group,
            reply_to=msg.reply,
            headers=tracing.inject({}),
            generate=req if isinstance(req, GenerateRequest) else None,
            embed=req if isinstance(req, EmbedRequest) else None,
            predicted_exec_ms=self.exec_models[spec.name].estimate_ms(0),
            accepted_at_s=now,
            deadline_s=now + timeout_s,
        )
        # Persist and predict at once: the stored job needs no prediction (recovery predicts again).
        predicting: asyncio.Task[Prediction] | None = None
        if isinstance(req, GenerateRequest):
            predicting = asyncio.ensure_future(self._predict(rid, model, req.prompt_text()))
        persisting = asyncio.ensure_future(
            self.js.publish(subjects.jobs(spec.group), encode(job), headers={"Nats-Msg-Id": rid})
        )
        fast = self._idle_worker_for(spec)
        if not fast:
            # It will wait in the queue: it must be on JetStream first.
            err = await self._persisted(rid, spec.group, persisting, predicting)
            if err is not None:
                return err, rid
        if isinstance(req, GenerateRequest):
            # Queued under the local median baseline until the predictor answers (a few ms, while queue
            # waits under load are seconds): the predictor is never on a request's critical path.
            self._apply_prediction(job, spec, self._baseline(rid, model))
        # Fast path (nothing queued, a worker waits): its queue position is moot, so it goes out now and
        # JetStream catches up within a millisecond; a job on a live worker survives a scheduler crash.
        core.enqueue(job, time.time())
        self.stats["accepted"] += 1
        if tracing.enabled():
            self.queue_spans[rid] = tracing.start_span(
                _tracer, "scheduler.queue", attributes={"muserve.request_id": rid}
            )
        await self._dispatch(spec.group)
        if fast:
            self.tasks.spawn(self._persisted(rid, spec.group, persisting, None))
        if predicting is not None:
            self.tasks.spawn(self._late_prediction(core, job, spec, predicting))
        return None, rid

    async def _persisted(
        self,
        rid: str,
        group: str,
        persisting: asyncio.Future[Any],
        predicting: asyncio.Task[Prediction] | None,
    ) -> ErrorInfo | None:
        """Wait for JetStream to store a job; an error for the client if it did not."""
        self.pending_ingress.add(rid)
        self.admitting[group] += 1
        try:
            ack = await persisting
        except Exception as exc:
            log.error("cannot persist job %s: %s", rid, exc)
            if predicting is not None:
                predicting.cancel()
            return ErrorInfo(code=ErrorCode.UNAVAILABLE, message="job store (JetStream) unavailable")
        finally:
            self.pending_ingress.discard(rid)
            self.admitting[group] -= 1
        if ack.duplicate:
            if predicting is not None:
                predicting.cancel()
            return ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"request_id {rid!r} was already submitted",
                param="request_id",
            )
        return None

    def _idle_worker_for(self, spec: ModelSpec) -> bool:
        """A parked pull could take this model's request right now (so its queue position is moot)."""
        core = self.cores[spec.group]
        for pp in self.parked[spec.group]:
            w = core.workers.get(pp.worker_id)
            if w is not None and spec.name in w.models:
                return True
        return False

    async def _late_prediction(
        self, core: GroupCore, job: Job, spec: ModelSpec, predicting: asyncio.Task[Prediction]
    ) -> None:
        """Attach the predictor's answer: re-rank the job if it still waits, else tell its worker so
        usage reports it."""
        prediction = await predicting
        self._apply_prediction(job, spec, prediction)
        if core.reestimate(job.request_id):
            return
        state = core.jobs.get(job.request_id)
        if state is not None and state.worker_id is not None:
            note = PredictionNote(
                request_id=job.request_id, prediction=prediction, predicted_exec_ms=job.predicted_exec_ms
            )
            await self.nc.publish(subjects.worker_prediction(state.worker_id), encode(note))

    def _apply_prediction(self, job: Job, spec: ModelSpec, prediction: Prediction) -> None:
        """Attach a prediction and the exec-time estimate SSJF orders by."""
        gen = job.generate
        assert gen is not None
        exec_model = self.exec_models[spec.name]
        tokens = prediction.predicted_tokens
        rank = prediction.score_tokens if prediction.score_tokens is not None else tokens
        if gen.ignore_eos and self.settings.groups[spec.group].policy == "oracle":
            tokens = rank = float(gen.max_tokens)  # a replay's true length: only the oracle may see it
        else:
            # max_tokens caps any answer (with ignore_eos it is a replay's true length, so never used).
            # Nor is a prediction longer than any recent answer of this model credible: an over-long
            # estimate would push the request's aging bound far out and it would starve in the tail.
            caps = [float(gen.max_tokens)] if not gen.ignore_eos else []
            longest = exec_model.longest_tokens()
            if longest is not None:
                caps.append(longest)
            if caps:
                tokens, rank = min(tokens, *caps), min(rank, *caps)
        const_ms, ms_per_token = exec_model.coefficients()
        job.prediction = prediction
        job.predicted_tokens = tokens
        job.ms_per_token = ms_per_token
        job.predicted_exec_ms = const_ms + ms_per_token * tokens
        job.rank_exec_ms = const_ms + ms_per_token * rank

    def _baseline(self, rid: str, model: str) -> Prediction:
        """The local median baseline's prediction (it reads no text, so costs microseconds)."""
        return self.fallback.predict([PredictItem(request_id=rid, model=model, text="")])[0]

    async def _predict(self, rid: str, model: str, text: str) -> Prediction:
        """Ask the predictor service (about the model's predict_as name); else the local baseline."""
        item = PredictItem(request_id=rid, model=model, text=text)
        asked = item.model_copy(update={"model": self.settings.length_model(model)})
        try:
            msg = await self.nc.request(
                subjects.PREDICT,
                encode(PredictRequest(items=[asked])),
                timeout=self.settings.scheduler.predictor_timeout_ms / 1000.0,
                headers=tracing.inject({}),
            )
            if not is_no_responders(msg):
                reply = decode(PredictReply, msg.data)
                if reply.error is None and reply.predictions:
                    return reply.predictions[0]
        except Exception as exc:  # timeout, no responders, garbage: the baseline answers
            log.debug("predictor unavailable for %s: %s", rid, exc)
        return self.fallback.predict([item])[0]

    # -- dispatch ------------------------------------------------------------------------------
    async def _dispatch(self, group: str) -> None:
        """Give queued jobs to parked pulls."""
        core = self.cores[group]
        parked = self.parked[group]
        if not parked or not len(core.queue):
            return
        now = time.time()
        keep: deque[ParkedPull] = deque()
        while parked:
            pp = parked.popleft()
            jobs = core.take(pp.worker_id, pp.free_slots, now) if len(core.queue) else []
            if jobs:
                if pp.timer is not None:
                    pp.timer.cancel()
                await self._send_jobs(pp.reply, jobs)
            else:
                keep.append(pp)
        parked.extend(keep)

    async def _send_jobs(self, reply: str, jobs: list[Job]) -> None:
        for job in jobs:
            span = self.queue_spans.pop(job.request_id, None)
            if span is not None:
                span.end()
        await self.nc.publish(reply, encode(PullReply(jobs=jobs)))

    async def _on_pull(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            pr = decode(PullRequest, msg.data)
        except CodecError as exc:
            log.warning("bad pull request: %s", exc)
            await self.nc.publish(msg.reply, encode(PullReply()))
            return
        core = self.cores.get(pr.group)
        if core is None:
            await self.nc.publish(msg.reply, encode(PullReply()))
            return
        now = time.time()
        worker = core.workers.get(pr.worker_id)
        if worker is not None:
            worker.last_seen_s = now
        jobs = core.take(pr.worker_id, pr.free_slots, now)
        if jobs or pr.wait_ms <= 0:
            await self._send_jobs(msg.reply, jobs)
            return
        pp = ParkedPull(reply=msg.reply, worker_id=pr.worker_id, free_slots=pr.free_slots)
        loop = asyncio.get_running_loop()
        pp.timer = loop.call_later(pr.wait_ms / 1000.0, self._expire_parked, pr.group, pp)
        # A worker has one pull out at a time: a new one replaces any stale one.
        parked = self.parked[pr.group]
        for old in [p for p in parked if p.worker_id == pr.worker_id]:
            parked.remove(old)
            if old.timer is not None:
                old.timer.cancel()
        parked.append(pp)

    def _expire_parked(self, group: str, pp: ParkedPull) -> None:
        parked = self.parked[group]
        if pp in parked:
            parked.remove(pp)
            self.tasks.spawn(self.nc.publish(pp.reply, encode(PullReply())))

    # -- worker reports ------------------------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(WorkerHeartbeat, msg.data)
        except CodecError:
            return
        core = self.cores.get(hb.group)
        if core is None:
            return
        for rid in core.on_heartbeat(hb, time.time()):
            await self._finish(core, rid)
        await self._dispatch(hb.group)

    async def _on_done(self, msg: Msg) -> None:
        try:
            rep = decode(DoneReport, msg.data)
        except CodecError as exc:
            log.warning("bad done report: %s", exc)
            return
        core = self.cores.get(rep.group)
        known = False
        if core is not None:
            job = await self._finish(core, rep.request_id)
            known = job is not None
            if job is not None:
                self.stats["completed" if rep.ok else "failed"] += 1
                if rep.ok:
                    core.observe_completion(job, time.time(), rep.completion_tokens, rep.stretch_ms)
        if msg.reply:
            await self.nc.publish(msg.reply, encode(DoneAck(request_id=rep.request_id, known=known)))

    async def _finish(self, core: GroupCore, request_id: str) -> Job | None:
        """Close a job: forget it and ack its JetStream message (now, or when it is delivered)."""
        job = core.on_done(request_id)
        span = self.queue_spans.pop(request_id, None)
        if span is not None:
            span.end()
        handle = self.handles.pop(request_id, None)
        if handle is not None:
            await handle.ack()
        if job is not None:
            await self._dispatch(core.group)
        return job

    async def _on_completion(self, msg: Msg) -> None:
        """A finished request's true length and exec time refine its model's exec-time fit."""
        try:
            rec = decode(CompletionRecord, msg.data)
        except CodecError:
            return
        model = self.exec_models.get(rec.model)
        if model is not None and rec.finish_reason in ("stop", "length"):
            # Max-clock time when the worker knows it: a lowered clock must not inflate the fit.
            exec_ms = rec.exec_max_clock_ms if rec.exec_max_clock_ms is not None else rec.exec_ms
            model.observe(rec.completion_tokens, exec_ms)
            # The provisional rank of a queued job is this baseline: keep its median current.
            self.fallback.observe(rec.model, rec.completion_tokens)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req = decode(CancelRequest, msg.data)
        except CodecError:
            return
        for core in self.cores.values():
            job, worker_id = core.cancel(req.request_id)
            if job is not None:
                await self._finish(core, req.request_id)
                err = ErrorInfo(code=ErrorCode.CANCELLED, message=f"cancelled: {req.reason}")
                await self.nc.publish(job.reply_to, error_reply(job.kind, job.request_id, err))
                return
            if worker_id is not None:
                await self.nc.publish(subjects.worker_cancel(worker_id), msg.data)
                return

    # -- loops ---------------------------------------------------------------------------------
    def _delivery_cb(self, group: str) -> Callable[[Msg], Awaitable[None]]:
        """JetStream deliveries: attach ack handles, and rebuild the queue after a restart."""
        core = self.cores[group]

        async def on_delivery(m: Msg) -> None:
            # The request id rides in the dedup header: no need to decode the job on the hot path.
            rid = (m.headers or {}).get("Nats-Msg-Id", "")
            if rid and core.is_completed(rid) and rid not in core.jobs:
                await m.ack()
                return
            if rid and (rid in core.jobs or rid in self.pending_ingress):
                self.handles[rid] = m
                return
            try:
                job = decode(Job, m.data)
            except CodecError as exc:
                log.error("dropping undecodable job message: %s", exc)
                await m.term()
                return
            self.handles[job.request_id] = m
            spec = self.settings.model(job.model)
            if job.generate is not None and job.prediction is None and spec is not None:
                # Jobs are stored before their prediction returns: predict again (off the callback).
                self.tasks.spawn(self._recover_with_prediction(core, job, spec))
                return
            core.recover(job)
            log.info("recovered job %s from JetStream", job.request_id)

        return on_delivery

    async def _recover_with_prediction(self, core: GroupCore, job: Job, spec: ModelSpec) -> None:
        assert job.generate is not None
        self._apply_prediction(
            job, spec, await self._predict(job.request_id, job.model, job.generate.prompt_text())
        )
        core.recover(job)
        log.info("recovered job %s from JetStream", job.request_id)

    async def _expire_loop(self) -> None:
        released = False
        while True:
            await asyncio.sleep(EXPIRE_TICK_S)
            now = time.time()
            for g, core in self.cores.items():
                if not core.in_recovery(now):
                    n = core.release_recovered()
                    if n:
                        log.info("re-queued %d recovered jobs in %s", n, g)
                    released = True
                res = core.expire(now)
                for wid in res.lost_workers:
                    log.warning("worker %s lost (no heartbeat for %.1fs)", wid, core.worker_lease_s)
                    self.parked[g] = deque(p for p in self.parked[g] if p.worker_id != wid)
                if res.requeued:
                    log.warning("re-dispatching %d jobs: %s", len(res.requeued), res.requeued)
                    self.stats["redispatched"] += len(res.requeued)
                for f in res.failed:
                    self.stats["failed"] += 1
                    await self._finish(core, f.job.request_id)
                    await self.nc.publish(
                        f.job.reply_to, error_reply(f.job.kind, f.job.request_id, f.error, f.job.attempt)
                    )
                if res.requeued or released:
                    await self._dispatch(g)
            released = False

    async def _telemetry_loop(self) -> None:
        interval_s = self.settings.scheduler.telemetry_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval_s)
            now = time.time()
            for g, core in self.cores.items():
                last_a, last_c = self.counters[g]
                tel = core.telemetry(now, interval_s, core.arrivals - last_a, core.completions - last_c)
                self.counters[g] = [core.arrivals, core.completions]
                await self.nc.publish(subjects.queue_telemetry(g), encode(tel))

    async def _progress_loop(self) -> None:
        """Keep long-waiting jobs' JetStream messages from being redelivered while we hold them."""
        period_s = self.settings.scheduler.ack_wait_s / 3.0
        while True:
            await asyncio.sleep(period_s)
            for handle in list(self.handles.values()):
                with contextlib.suppress(Exception):
                    await handle.in_progress()

    async def stop(self) -> None:
        """Answer parked pulls (empty) and stop loops; jobs stay on JetStream for the next start."""
        for parked in self.parked.values():
            for pp in parked:
                if pp.timer is not None:
                    pp.timer.cancel()
                with contextlib.suppress(Exception):
                    await self.nc.publish(pp.reply, encode(PullReply()))
        await self.tasks.cancel_all()
        for span in self.queue_spans.values():
            span.end()


def _request_id_of(data: bytes) -> str:
    """Best-effort request id from a payload that failed validation (for the error reply)."""
    try:
        import msgpack

        obj = msgpack.unpackb(data, raw=False)
        if isinstance(obj, dict) and isinstance(obj.get("request_id"), str):
            return str(obj["request_id"])[:128]
    except Exception:
        pass
    return ""


def _size_error(req: GenerateRequest | EmbedRequest, spec: ModelSpec) -> ErrorInfo | None:
    """Reject what cannot fit the model before it costs anything."""
    limit_bytes = spec.max_context_tokens * MAX_BYTES_PER_TOKEN
    if isinstance(req, GenerateRequest):
        if req.max_tokens >= spec.max_context_tokens:
            return ErrorInfo(
                code=ErrorCode.CONTEXT_LENGTH,
                message=f"max_tokens {req.max_tokens} must be below the context of {spec.name} "
                f"({spec.max_context_tokens})",
                param="max_tokens",
            )
        if req.prompt_tokens is not None and req.prompt_tokens + req.max_tokens > spec.max_context_tokens:
            return ErrorInfo(
                code=ErrorCode.CONTEXT_LENGTH,
                message=(
                    f"prompt ({req.prompt_tokens} tokens) + max_tokens ({req.max_tokens}) "
                    f"exceeds the context "
                    f"of {spec.name} ({spec.max_context_tokens} tokens)"
                ),
                param="messages" if req.messages is not None else "prompt",
            )
        size = len(req.prompt_text().encode("utf-8", "replace"))
        if size > limit_bytes:
            return ErrorInfo(
                code=ErrorCode.CONTEXT_LENGTH,
                message=f"prompt of {size} bytes cannot fit the context of {spec.name} "
                f"({spec.max_context_tokens} tokens)",
                param="messages" if req.messages is not None else "prompt",
            )
    else:
        for i, text in enumerate(req.input):
            if len(text.encode("utf-8", "replace")) > limit_bytes * 4:
                # Embedding inputs are truncated to the model's window; only refuse absurd sizes.
                return ErrorInfo(
                    code=ErrorCode.CONTEXT_LENGTH, message=f"input[{i}] is too large", param=f"input.{i}"
                )
    return None


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set."""
    js = nc.jetstream()
    sched = Scheduler(settings, nc, js)
    await sched.start()
    settle()
    await stop.wait()
    await sched.stop()


def main() -> None:
    """Entry point of `muserve scheduler`."""
    service_main("scheduler", serve)
