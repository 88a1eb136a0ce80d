"""Worker service: pulls jobs as slots free up, runs them (continuous batching), streams tokens back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import trace

from services.common import subjects, tracing
from services.common.codec import CodecError, decode, encode
from services.common.nats_conn import TaskSet
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import (
    CancelRequest,
    CompletionRecord,
    DoneAck,
    DoneReport,
    EmbedResult,
    ErrorCode,
    ErrorInfo,
    InflightInfo,
    Job,
    JobKind,
    PowerTelemetry,
    PredictionNote,
    PullReply,
    PullRequest,
    StepTelemetry,
    TokenChunk,
    Usage,
    WorkerHeartbeat,
)
from services.common.settings import ModelSpec, Settings
from services.worker.clock import ClockView
from services.worker.models import chat_prompt_ids

log = logging.getLogger("muserve.worker")
_tracer = tracing.tracer("muserve.worker")


@dataclass
class Active:
    """A job this worker is running."""

    job: Job
    received_s: float
    span_ctx: Any
    prompt_tokens: int = 0
    index: int = 0
    emitted_tokens: int = 0
    first_token_s: float | None = None
    energy_j: float = 0.0
    stretch_ms: float = 0.0  # time added by the simulated clock to the steps this job was in
    text: list[str] = field(default_factory=list)
    prefill_span: trace.Span | None = None
    decode_span: trace.Span | None = None
    error: ErrorInfo | None = None


class StepLoop:
    """The engine's own thread: drains adds/aborts, steps, stretches by the simulated clock."""

    def __init__(self, engine: Any, clock: ClockView, sensitivity: float, on_result: Any) -> None:
        self.engine = engine
        self.clock = clock
        self.sensitivity = sensitivity
        self.on_result = on_result
        self._lock = threading.Lock()
        self._adds: list[Any] = []
        self._aborts: list[str] = []
        self._wake = threading.Event()
        self._stop = False

    def add(self, seq: Any) -> None:
        """Hand a sequence to the engine thread."""
        with self._lock:
            self._adds.append(seq)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to drop a sequence."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    @property
    def pending(self) -> int:
        """Sequences handed over but not yet in the engine."""
        with self._lock:
            return len(self._adds)

    def stop(self) -> None:
        """Stop after the current step."""
        self._stop = True
        self._wake.set()

    def run(self) -> None:
        """Step until stopped (runs on the worker's torch thread)."""
        while not self._stop:
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            errors: list[tuple[str, str]] = []
            for seq in adds:
                try:
                    self.engine.add(seq)
                except ValueError as exc:
                    errors.append((seq.request_id, str(exc)))
            for rid in aborts:
                self.engine.abort(rid)
            if not self.engine.has_work:
                if errors:
                    self.on_result([], [], errors, 1.0)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events, stats = self.engine.step()
            except Exception:
                log.exception("engine step failed")
                time.sleep(0.1)
                continue
            slowdown = self.clock.slowdown(self.sensitivity)
            if slowdown > 1.0:
                # Simulated GPU at a lowered clock: the step takes longer by the µ-Serve latency model.
                time.sleep(sum(s.latency_ms for s in stats) / 1000.0 * (slowdown - 1.0))
            self.on_result(events, stats, errors, slowdown)


class Worker:
    """One worker process: one model, one (real or simulated) GPU."""

    def __init__(self, settings: Settings, nc: Client) -> None:
        self.settings = settings
        self.cfg = settings.worker
        spec = settings.model(self.cfg.model)
        if spec is None:
            raise SystemExit(f"worker.model {self.cfg.model!r} is not in the catalogue")
        self.spec: ModelSpec = spec
        self.nc = nc
        self.kind = "noop" if self.cfg.mode == "noop" else spec.kind
        self.worker_id = f"{settings.node}-gpu{self.cfg.gpu}-{uuid.uuid4().hex[:6]}"
        self.slots = self.cfg.max_seqs
        self.clock = ClockView(enabled=self.cfg.simulate_clock)
        self.active: dict[str, Active] = {}
        self.pending_done: dict[str, DoneReport] = {}
        self.early_notes: dict[str, PredictionNote] = {}
        self.tasks = TaskSet()
        self.loop = asyncio.get_running_loop()
        self.slot_freed = asyncio.Event()
        self.drained = asyncio.Event()  # set whenever no job is running
        self.engine: Any = None
        self.tokenizer: Any = None
        self.embedder: Any = None
        self.step_loop: StepLoop | None = None
        self.embed_queue: asyncio.Queue[Active] = asyncio.Queue()
        self.stats: dict[str, Any] = {
            "steps": 0,
            "busy_ms": 0.0,
            "tokens": 0,
            "batch": [],
            "lat": [],
            "slow": 1.0,
        }
        self.totals = {"jobs": 0, "tokens": 0, "energy_j": 0.0}
        self.stopping = False
        # Every torch call of this process runs on this one thread (see load()).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    # -- set-up ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the model on the torch thread (it takes seconds), then start stepping there."""
        if self.kind == "noop":
            return
        await asyncio.get_running_loop().run_in_executor(self.torch_thread, self._load_sync)
        if self.step_loop is not None:
            # Same OS thread as the load: torch runs ~1.6x slower in a thread other than its first one.
            self.torch_thread.submit(self.step_loop.run)

    def _load_sync(self) -> None:
        from services.worker.catalog import resolve_model_dir

        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)

        path = resolve_model_dir(self.spec, self.settings.cache, log=log.info)
        if self.kind == "embedding":
            from services.worker.embedder import Embedder

            self.embedder = Embedder(path, num_hidden_layers=self.cfg.num_hidden_layers)
            return
        from services.worker.engine import ContinuousBatchingEngine
        from services.worker.models import load_causal_lm

        model, tok = load_causal_lm(path, dtype=self.cfg.dtype, num_hidden_layers=self.cfg.num_hidden_layers)
        self.tokenizer = tok
        self.engine = ContinuousBatchingEngine(
            model, tok, max_seqs=self.cfg.max_seqs, max_context_tokens=self.spec.max_context_tokens
        )
        # Warm-up so the first request does not pay one-off costs.
        from services.worker.engine import SamplingParams, SeqRequest

        ids = tok("Hello")["input_ids"]
        self.engine.add(SeqRequest("warmup", list(ids), SamplingParams(max_tokens=2, temperature=0.0)))
        while self.engine.has_work:
            self.engine.step()
        self.step_loop = StepLoop(self.engine, self.clock, self.spec.sensitivity, self._on_step_threadsafe)

    async def start(self) -> None:
        """Subscribe and start loops."""
        await self.nc.subscribe(subjects.worker_cancel(self.worker_id), cb=self._on_cancel)
        await self.nc.subscribe(subjects.worker_prediction(self.worker_id), cb=self._on_prediction)
        await self.nc.subscribe(subjects.power_telemetry(self.settings.node, self.cfg.gpu), cb=self._on_power)
        await self._heartbeat()
        self.tasks.spawn(self._heartbeat_loop())
        self.tasks.spawn(self._pull_loop())
        self.tasks.spawn(self._telemetry_loop())
        if self.kind == "embedding":
            self.tasks.spawn(self._embed_loop())
        await register_discovery(self.nc, "worker", self.info)
        log.info(
            "worker %s ready: model=%s kind=%s slots=%d (pid %d)",
            self.worker_id,
            self.spec.name,
            self.kind,
            self.slots,
            os.getpid(),
        )

    def info(self) -> dict[str, Any]:
        """Status for discovery."""
        return {
            "worker_id": self.worker_id,
            "model": self.spec.name,
            "kind": self.kind,
            "slots": self.slots,
            "active": len(self.active),
            **self.totals,
        }

    def free_slots(self) -> int:
        """Slots not taken by running or handed-over jobs."""
        return self.slots - len(self.active)

    # -- pulling work -------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        wait_ms = self.cfg.pull_wait_ms
        while not self.stopping:
            free = self.free_slots()
            if free <= 0:
                self.slot_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.slot_freed.wait(), timeout=1.0)
                continue
            req = PullRequest(
                worker_id=self.worker_id,
                group=self.spec.group,
                models=[self.spec.name],
                free_slots=free,
                wait_ms=wait_ms,
            )
            try:
                msg = await self.nc.request(
                    subjects.sched_pull(self.spec.group), encode(req), timeout=wait_ms / 1000.0 + 2.0
                )
                reply = decode(PullReply, msg.data)
            except (TimeoutError, NatsTimeout, NoRespondersError):
                await asyncio.sleep(0.2)  # scheduler restarting; our heartbeats keep our jobs ours
                continue
            except Exception as exc:
                if self.stopping:
                    return
                log.warning("pull failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for job in reply.jobs:
                await self._accept(job)

    async def _accept(self, job: Job) -> None:
        now = time.time()
        if job.request_id in self.active:
            return  # a duplicate dispatch: we already run it
        note = self.early_notes.pop(job.request_id, None)
        if note is not None:
            job.prediction = note.prediction
            job.predicted_exec_ms = note.predicted_exec_ms
        ctx = tracing.extract(job.headers)
        act = Active(job=job, received_s=now, span_ctx=ctx)
        act.prefill_span = tracing.start_span(
            _tracer,
            "worker.prefill",
            context=ctx,
            attributes={"muserve.request_id": job.request_id, "muserve.worker": self.worker_id},
        )
        self.active[job.request_id] = act
        if self.kind == "noop":
            await self._run_noop(act)
        elif self.kind == "embedding":
            self.embed_queue.put_nowait(act)
        else:
            await self._submit_generate(act)

    async def _submit_generate(self, act: Active) -> None:
        from services.worker.engine import SamplingParams, SeqRequest

        job = act.job
        gen = job.generate
        if gen is None:
            await self._fail(
                act, ErrorInfo(code=ErrorCode.INVALID_REQUEST, message="generate job without a request")
            )
            return
        try:
            if gen.messages is not None:
                ids = chat_prompt_ids(self.tokenizer, [m.model_dump() for m in gen.messages])
            else:
                ids = self.tokenizer(gen.prompt, add_special_tokens=False)["input_ids"]
            ids = list(ids)
        except Exception as exc:
            await self._fail(
                act, ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=f"cannot tokenize prompt: {exc}")
            )
            return
        act.prompt_tokens = len(ids)
        limit = self.spec.max_context_tokens
        if not ids:
            await self._fail(
                act, ErrorInfo(code=ErrorCode.INVALID_REQUEST, message="prompt is empty", param="prompt")
            )
            return
        if len(ids) + gen.max_tokens > limit:
            await self._fail(
                act,
                ErrorInfo(
                    code=ErrorCode.CONTEXT_LENGTH,
                    message=(
                        f"prompt ({len(ids)} tokens) + max_tokens ({gen.max_tokens}) exceeds the context "
                        f"of {self.spec.name} ({limit} tokens)"
                    ),
                    param="messages" if gen.messages is not None else "prompt",
                ),
            )
            return
        params = SamplingParams(
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            stop=tuple(gen.stop),
            seed=gen.seed,
            ignore_eos=gen.ignore_eos,
        )
        assert self.step_loop is not None
        self.step_loop.add(SeqRequest(job.request_id, ids, params))

    # -- engine results (thread -> loop) ----------------------------------------------------
    def _on_step_threadsafe(
        self, events: list[Any], stats: list[Any], errors: list[tuple[str, str]], slow: float
    ) -> None:
        # One task per engine step; its publishes go out together in the client's next flush.
        asyncio.run_coroutine_threadsafe(self._on_step(events, stats, errors, slow), self.loop)

    async def _on_step(
        self, events: list[Any], stats: list[Any], errors: list[tuple[str, str]], slow: float
    ) -> None:
        now = time.time()
        power_w = self.clock.busy_power_w()
        for st in stats:
            stretched_ms = st.latency_ms * slow
            self.stats["steps"] += 1
            self.stats["busy_ms"] += stretched_ms
            self.stats["tokens"] += st.num_tokens if st.kind == "decode" else st.batch_size
            self.stats["batch"].append(st.batch_size)
            self.stats["lat"].append(stretched_ms)
            self.stats["slow"] = slow
            n = len(st.request_ids)
            share = power_w * stretched_ms / 1000.0 / n if power_w is not None and n else 0.0
            for rid in st.request_ids:
                act = self.active.get(rid)
                if act is not None:
                    act.stretch_ms += stretched_ms - st.latency_ms
                    act.energy_j += share
        for rid, why in errors:
            act = self.active.get(rid)
            if act is not None:
                code = ErrorCode.CONTEXT_LENGTH if "context" in why else ErrorCode.INVALID_REQUEST
                await self._fail(act, ErrorInfo(code=code, message=why))
        for ev in events:
            act = self.active.get(ev.request_id)
            if act is None:
                continue
            act.prompt_tokens = ev.num_prompt_tokens or act.prompt_tokens
            if act.first_token_s is None and ev.token_ids:
                act.first_token_s = now
                if act.prefill_span is not None:
                    act.prefill_span.end()
                act.decode_span = tracing.start_span(
                    _tracer,
                    "worker.decode",
                    context=act.span_ctx,
                    attributes={"muserve.request_id": ev.request_id},
                )
            act.emitted_tokens = ev.num_output_tokens
            gen = act.job.generate
            stream = gen is not None and gen.stream
            if ev.finished:
                if ev.finish_reason == "error" and act.error is None:
                    act.error = ErrorInfo(code=ErrorCode.INTERNAL, message=ev.error or "engine error")
                await self._finish(act, ev.finish_reason, ev.text)
            elif stream and ev.text:
                await self._publish_chunk(act, ev.text)
            elif ev.text:
                act.text.append(ev.text)

    async def _publish_chunk(self, act: Active, text: str) -> None:
        chunk = TokenChunk(request_id=act.job.request_id, index=act.index, text=text, attempt=act.job.attempt)
        act.index += 1
        await self.nc.publish(act.job.reply_to, encode(chunk))

    def _usage(self, act: Active, now: float) -> Usage:
        job = act.job
        dispatched = job.dispatched_at_s or act.received_s
        pred = job.prediction
        simulated = self.clock.simulated
        return Usage(
            prompt_tokens=act.prompt_tokens,
            completion_tokens=act.emitted_tokens,
            total_tokens=act.prompt_tokens + act.emitted_tokens,
            queue_ms=max(dispatched - job.accepted_at_s, 0.0) * 1000.0,
            ttft_ms=None if act.first_token_s is None else (act.first_token_s - job.accepted_at_s) * 1000.0,
            exec_ms=(now - act.received_s) * 1000.0,
            length_class=pred.length_class if pred else None,
            predicted_tokens=pred.predicted_tokens if pred else None,
            score_tokens=pred.score_tokens if pred else None,
            predictor=pred.predictor if pred else None,
            energy_j=act.energy_j if simulated is not None else None,
            energy_simulated=simulated,
            worker_id=self.worker_id,
            attempt=job.attempt,
        )

    async def _finish(self, act: Active, reason: str | None, text: str = "") -> None:
        """Send the final chunk (with usage) and report completion."""
        now = time.time()
        job = act.job
        self.active.pop(job.request_id, None)
        if not self.active:
            self.drained.set()
        usage = self._usage(act, now)
        gen = job.generate
        stream = gen is not None and gen.stream
        if not stream:
            act.text.append(text)
            text = "".join(act.text)
        error = act.error
        if reason == "abort" and error is None:
            error = ErrorInfo(code=ErrorCode.CANCELLED, message="request cancelled")
        if job.kind is JobKind.GENERATE:
            final = TokenChunk(
                request_id=job.request_id,
                index=act.index,
                text=text,
                finished=True,
                finish_reason="error" if act.error else reason,
                usage=usage,
                error=error,
                attempt=job.attempt,
            )
            await self.nc.publish(job.reply_to, encode(final))
        for span in (act.prefill_span, act.decode_span):
            if span is not None and span.is_recording():
                span.end()
        self.totals["jobs"] += 1
        self.totals["tokens"] += act.emitted_tokens
        self.totals["energy_j"] += act.energy_j
        report = DoneReport(
            request_id=job.request_id,
            worker_id=self.worker_id,
            group=job.group,
            model=job.model,
            ok=act.error is None,
            finish_reason=reason,
            prompt_tokens=act.prompt_tokens,
            completion_tokens=act.emitted_tokens,
            exec_ms=usage.exec_ms or 0.0,
            ttft_ms=usage.ttft_ms,
            energy_j=usage.energy_j,
            attempt=job.attempt,
            stretch_ms=act.stretch_ms,
        )
        if job.kind is JobKind.GENERATE:
            # What predictors learn from: the true length next to the prediction.
            record = CompletionRecord(
                request_id=job.request_id,
                model=job.model,
                prompt_tokens=act.prompt_tokens,
                completion_tokens=act.emitted_tokens,
                finish_reason=reason,
                prediction=job.prediction,
                queue_ms=usage.queue_ms or 0.0,
                exec_ms=usage.exec_ms or 0.0,
                energy_j=usage.energy_j,
                energy_simulated=usage.energy_simulated,
                worker_id=self.worker_id,
                node=self.settings.node,
                gpu=self.cfg.gpu,
                exec_max_clock_ms=max((usage.exec_ms or 0.0) - act.stretch_ms, 0.0),
            )
            await self.nc.publish(subjects.completions(job.model), encode(record))
        self.pending_done[job.request_id] = report
        self.tasks.spawn(self._report_done(report))
        self.slot_freed.set()

    async def _fail(self, act: Active, error: ErrorInfo) -> None:
        act.error = error
        if act.prefill_span is not None:
            act.prefill_span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
        await self._finish(act, "error")

    async def _report_done(self, report: DoneReport) -> None:
        """Tell the scheduler; kept in pending_done (and heartbeats) until it confirms."""
        try:
            msg = await self.nc.request(subjects.sched_done(report.group), encode(report), timeout=2.0)
            decode(DoneAck, msg.data)
            self.pending_done.pop(report.request_id, None)
        except Exception as exc:
            log.debug("done report for %s not confirmed yet: %s", report.request_id, exc)

    # -- other job kinds -----------------------------------------------------------------------
    async def _run_noop(self, act: Active) -> None:
        """Control-plane benchmark mode: answer at once without a model, max_tokens tokens of " tok"."""
        gen = act.job.generate
        n = min(gen.max_tokens if gen is not None else 1, self.cfg.noop_max_tokens)
        act.first_token_s = time.time()
        if act.prefill_span is not None:
            act.prefill_span.end()
        if gen is not None and gen.stream:
            for _ in range(n - 1):
                await self._publish_chunk(act, " tok")
            act.emitted_tokens = n
            await self._finish(act, "length", " tok")
        else:
            act.emitted_tokens = n
            await self._finish(act, "length", " tok" * n)

    async def _embed_loop(self) -> None:
        """Single-shot model: embed whatever jobs are waiting, as one batch."""
        while not self.stopping:
            first = await self.embed_queue.get()
            batch = [first]
            while not self.embed_queue.empty():
                batch.append(self.embed_queue.get_nowait())
            texts: list[str] = []
            for act in batch:
                assert act.job.embed is not None
                texts.extend(act.job.embed.input)
            t0 = time.perf_counter()
            try:
                vectors, counts = await asyncio.get_running_loop().run_in_executor(
                    self.torch_thread, self.embedder.embed, texts
                )
            except Exception as exc:
                log.exception("embedding failed")
                for act in batch:
                    await self._fail_embed(act, ErrorInfo(code=ErrorCode.INTERNAL, message=str(exc)))
                continue
            lat_ms = (time.perf_counter() - t0) * 1000.0
            slow = self.clock.slowdown(self.spec.sensitivity)
            if slow > 1.0:
                await asyncio.sleep(lat_ms / 1000.0 * (slow - 1.0))
            stretched_ms = lat_ms * slow
            power_w = self.clock.busy_power_w()
            self.stats["steps"] += 1
            self.stats["busy_ms"] += stretched_ms
            self.stats["batch"].append(len(texts))
            self.stats["lat"].append(stretched_ms)
            i = 0
            now = time.time()
            for act in batch:
                assert act.job.embed is not None
                n = len(act.job.embed.input)
                act.prompt_tokens = sum(counts[i : i + n])
                act.first_token_s = now
                if power_w is not None:
                    act.energy_j = power_w * stretched_ms / 1000.0 * n / len(texts)
                res = EmbedResult(
                    request_id=act.job.request_id, embeddings=vectors[i : i + n], usage=self._usage(act, now)
                )
                i += n
                await self.nc.publish(act.job.reply_to, encode(res))
                await self._finish(act, "stop")

    async def _fail_embed(self, act: Active, error: ErrorInfo) -> None:
        act.error = error
        self.tasks.spawn(
            self.nc.publish(act.job.reply_to, encode(EmbedResult(request_id=act.job.request_id, error=error)))
        )
        await self._finish(act, "error")

    # -- control -------------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        try:
            req = decode(CancelRequest, msg.data)
        except CodecError:
            return
        act = self.active.get(req.request_id)
        if act is None:
            return
        act.error = ErrorInfo(code=ErrorCode.CANCELLED, message=f"cancelled: {req.reason}")
        if self.step_loop is not None:
            self.step_loop.abort(req.request_id)

    async def _on_prediction(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            note = decode(PredictionNote, msg.data)
            act = self.active.get(note.request_id)
            if act is not None:
                act.job.prediction = note.prediction
                act.job.predicted_exec_ms = note.predicted_exec_ms
            else:
                # The note can overtake its job (different subscriptions): keep it for _accept.
                self.early_notes[note.request_id] = note
                while len(self.early_notes) > 1024:
                    self.early_notes.pop(next(iter(self.early_notes)))

    async def _on_power(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            self.clock.update(decode(PowerTelemetry, msg.data))

    async def _heartbeat(self) -> None:
        hb = WorkerHeartbeat(
            worker_id=self.worker_id,
            group=self.spec.group,
            node=self.settings.node,
            gpu=self.cfg.gpu,
            models=[self.spec.name],
            kind=self.kind,  # type: ignore[arg-type]
            slots=self.slots,
            free_slots=max(self.free_slots(), 0),
            inflight=[
                InflightInfo(request_id=r, emitted_tokens=a.emitted_tokens) for r, a in self.active.items()
            ],
            unconfirmed_done=list(self.pending_done),
            ts_s=time.time(),
        )
        await self.nc.publish(subjects.worker_heartbeat(self.spec.group, self.worker_id), encode(hb))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_ms / 1000.0)
            await self._heartbeat()
            now = time.time()
            for report in list(self.pending_done.values()):
                self.tasks.spawn(self._report_done(report))
            for rid, act in list(self.active.items()):
                deadline = act.job.deadline_s
                if deadline is not None and now > deadline and act.error is None:
                    act.error = ErrorInfo(code=ErrorCode.TIMEOUT, message="request timed out while running")
                    if self.step_loop is not None:
                        self.step_loop.abort(rid)

    async def _telemetry_loop(self) -> None:
        interval_s = self.cfg.step_telemetry_ms / 1000.0
        subject = subjects.step_telemetry(self.settings.node, self.cfg.gpu)
        while True:
            await asyncio.sleep(interval_s)
            st = self.stats
            lat: list[float] = st["lat"]
            batch: list[int] = st["batch"]
            tel = StepTelemetry(
                worker_id=self.worker_id,
                node=self.settings.node,
                gpu=self.cfg.gpu,
                ts_s=time.time(),
                interval_ms=interval_s * 1000.0,
                steps=st["steps"],
                busy_ms=min(st["busy_ms"], interval_s * 1000.0),
                tokens=st["tokens"],
                mean_batch=statistics.fmean(batch) if batch else 0.0,
                p50_step_ms=statistics.median(lat) if lat else None,
                max_step_ms=max(lat) if lat else None,
                slowdown=st["slow"],
            )
            self.stats = {"steps": 0, "busy_ms": 0.0, "tokens": 0, "batch": [], "lat": [], "slow": st["slow"]}
            await self.nc.publish(subject, encode(tel))

    async def stop(self) -> None:
        """Stop pulling; running jobs get up to drain_s to finish (the scheduler re-dispatches the rest)."""
        self.stopping = True
        self.drained.clear()
        if self.active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), self.cfg.drain_s)
        if self.active:
            log.warning(
                "stopping with %d jobs unfinished; the scheduler re-dispatches them", len(self.active)
            )
        if self.step_loop is not None:
            self.step_loop.stop()
        await self.tasks.cancel_all()
        self.torch_thread.shutdown(wait=False)


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set."""
    worker = Worker(settings, nc)
    await worker.load()
    await worker.start()
    settle()
    await stop.wait()
    await worker.stop()


def main() -> None:
    """Entry point of `muserve worker`."""
    service_main("worker", serve)
