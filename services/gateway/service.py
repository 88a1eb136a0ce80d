"""Gateway: OpenAI-compatible HTTP (aiohttp) in front of the NATS entry subjects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats.nuid
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError

from services.common import subjects, tracing
from services.common.codec import CodecError, decode, encode, validation_error
from services.common.nats_conn import is_no_responders
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import (
    CancelRequest,
    EmbedRequest,
    EmbedResult,
    ErrorCode,
    ErrorInfo,
    GenerateRequest,
    QueueTelemetry,
    TokenChunk,
    WorkerHeartbeat,
    new_request_id,
)
from services.common.settings import ModelSpec, Settings
from services.gateway import openai_api as oa
from services.gateway.tokens import TokenCounter

log = logging.getLogger("muserve.gateway")
_tracer = tracing.tracer("muserve.gateway")


class ApiError(Exception):
    """An error answered as OpenAI error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_wire(cls, err: ErrorInfo) -> ApiError:
        """From a wire error (status mapped from its code)."""
        return cls(err.http_status, err.message, err.param, err.code.value)

    def response(self) -> web.Response:
        """As an aiohttp JSON response."""
        body = oa.error_body(
            self.message,
            type_=oa.ERROR_TYPES.get(self.status, "server_error"),
            param=self.param,
            code=self.code,
        )
        return web.json_response(body, status=self.status)


class Metrics:
    """Prometheus metrics of the gateway (its own registry, so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "muserve_requests",
            "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "muserve_request_latency_seconds",
            "End-to-end request latency",
            ["endpoint", "model"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.ttft = Histogram(
            "muserve_time_to_first_token_seconds",
            "Time to first token (streamed requests)",
            ["model"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens = Counter("muserve_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.energy = Counter(
            "muserve_request_energy_joules",
            "Energy attributed to requests",
            ["model", "simulated"],
            registry=self.registry,
        )
        self.inflight = Gauge("muserve_inflight_requests", "Requests in flight", registry=self.registry)
        self.queue_depth = Gauge(
            "muserve_queue_depth", "Queued requests per model group", ["group"], registry=self.registry
        )


@dataclass
class Exchange:
    """One request's reply inbox."""

    token: str
    queue: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)


class Gateway:
    """The HTTP server and its NATS side."""

    def __init__(self, settings: Settings, nc: Client) -> None:
        self.settings = settings
        self.nc = nc
        self.inbox_prefix = f"_INBOX.gw{nats.nuid.NUID().next().decode()}."
        self.exchanges: dict[str, Exchange] = {}
        self.metrics = Metrics()
        self.tokens = TokenCounter(settings)
        self.workers: dict[str, tuple[str, float]] = {}  # worker_id -> (model, last seen)
        self.last_queue_telemetry_s = 0.0
        self.started_s = time.time()
        self._predictor_ok = False
        self._predictor_checked_s = -1e9
        self._nuid = nats.nuid.NUID()

    async def start(self) -> None:
        """Subscribe to replies and to what tells us which models are live."""
        await self.nc.subscribe(self.inbox_prefix + "*", cb=self._on_reply)
        await self.nc.subscribe(subjects.WORKER_HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.nc.subscribe(subjects.QUEUE_TELEMETRY_ALL, cb=self._on_queue)
        await register_discovery(self.nc, "gateway", self.info)

    def info(self) -> dict[str, Any]:
        """Status for discovery."""
        return {"inflight": len(self.exchanges), "uptime_s": time.time() - self.started_s}

    async def _on_reply(self, msg: Msg) -> None:
        ex = self.exchanges.get(msg.subject[len(self.inbox_prefix) :])
        if ex is not None:
            ex.queue.put_nowait(msg)

    async def _on_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            hb = decode(WorkerHeartbeat, msg.data)
            now = time.time()
            for m in hb.models:
                self.workers[hb.worker_id] = (m, now)

    async def _on_queue(self, msg: Msg) -> None:
        with contextlib.suppress(CodecError):
            tel = decode(QueueTelemetry, msg.data)
            self.last_queue_telemetry_s = time.time()
            self.metrics.queue_depth.labels(tel.group).set(tel.depth)

    async def predictor_alive(self) -> bool:
        """Whether a predictor answers its status endpoint (cached briefly: /readyz may be polled often)."""
        now = time.monotonic()
        if now - self._predictor_checked_s < 1.0:
            return self._predictor_ok
        try:
            msg = await self.nc.request(subjects.status("predictor"), b"", timeout=0.25)
            self._predictor_ok = not is_no_responders(msg)
        except Exception:  # timeout or no responders: the scheduler's baseline predicts meanwhile
            self._predictor_ok = False
        self._predictor_checked_s = now
        return self._predictor_ok

    def live_workers(self, model: str) -> int:
        """Workers that sent a heartbeat recently for a model."""
        horizon = time.time() - self.settings.scheduler.worker_lease_ms / 1000.0
        return sum(1 for m, seen in self.workers.values() if m == model and seen >= horizon)

    # -- NATS exchange ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def exchange(self, subject: str, payload: bytes) -> AsyncIterator[Exchange]:
        """Publish a request with a private reply inbox; replies arrive on the Exchange's queue."""
        token = self._nuid.next().decode()
        ex = Exchange(token=token)
        self.exchanges[token] = ex
        try:
            await self.nc.publish(
                subject, payload, reply=self.inbox_prefix + token, headers=tracing.inject({})
            )
            yield ex
        finally:
            self.exchanges.pop(token, None)

    async def next_reply(self, ex: Exchange, deadline: float) -> Msg:
        """The next message for this exchange, or ApiError 504 at the deadline."""
        if not ex.queue.empty():
            msg = ex.queue.get_nowait()
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise ApiError(504, "request timed out", code=ErrorCode.TIMEOUT.value)
            try:
                # asyncio.timeout arms one timer; wait_for would also create a task per message.
                async with asyncio.timeout(timeout):
                    msg = await ex.queue.get()
            except TimeoutError:
                raise ApiError(504, "request timed out", code=ErrorCode.TIMEOUT.value) from None
        if is_no_responders(msg):
            raise ApiError(
                503,
                "no scheduler is serving requests (is `muserve scheduler` running?)",
                code=ErrorCode.UNAVAILABLE.value,
            )
        return msg

    async def cancel(self, request_id: str, reason: str) -> None:
        """Tell the scheduler to drop a request nobody waits for any more."""
        with contextlib.suppress(Exception):
            await self.nc.publish(
                subjects.CANCEL, encode(CancelRequest(request_id=request_id, reason=reason))
            )

    # -- request preparation -----------------------------------------------------------------------
    def model_spec(self, name: str, kind: str) -> ModelSpec:
        """The catalogue entry, or 404 / 400."""
        spec = self.settings.model(name)
        if spec is None:
            served = ", ".join(m.name for m in self.settings.models)
            raise ApiError(
                404, f"The model '{name}' does not exist; served models: {served}", "model", "model_not_found"
            )
        if spec.kind != kind:
            raise ApiError(
                400, f"model '{name}' is a {spec.kind} model and cannot serve this endpoint", "model"
            )
        return spec

    def check_context(self, spec: ModelSpec, texts: list[str], max_tokens: int, param: str) -> None:
        """413 when prompt + max_tokens cannot fit (the worker checks again, exactly, with the template)."""
        if max_tokens >= spec.max_context_tokens:
            raise ApiError(
                413,
                f"max_tokens ({max_tokens}) must be below the model's context ({spec.max_context_tokens})",
                "max_tokens",
                ErrorCode.CONTEXT_LENGTH.value,
            )
        budget = spec.max_context_tokens - max_tokens
        n = self.tokens.count_at_least(spec, texts, budget)
        if n is not None and n > budget:
            raise ApiError(
                413,
                f"This model's maximum context length is {spec.max_context_tokens} tokens; "
                f"the prompt has at least "
                f"{n} tokens and max_tokens is {max_tokens}",
                param,
                ErrorCode.CONTEXT_LENGTH.value,
            )


async def read_json(request: web.Request) -> Any:
    """The JSON body, or 400/413 in OpenAI's error shape."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"request body too large (limit {request.app['max_body_bytes']} bytes)",
            None,
            ErrorCode.CONTEXT_LENGTH.value,
        ) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None


def parse(model_cls: type[Any], body: Any) -> Any:
    """Validate a body, naming the offending field on error."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        err = validation_error(exc)
        raise ApiError(400, str(err), err.param) from None


def sse(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def build_app(gw: Gateway) -> web.Application:
    """The aiohttp application (routes and error middleware)."""
    settings = gw.settings
    metrics = gw.metrics

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status >= 400:
                return ApiError(exc.status, exc.reason or "error").response()
            raise
        except Exception:
            log.exception("unhandled error on %s", request.path)
            return ApiError(500, "internal error").response()

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        t0 = time.monotonic()
        body = await read_json(request)
        req_body = parse(oa.ChatBody if chat else oa.CompletionBody, body)
        spec = gw.model_spec(req_body.model, "chat")
        if chat:
            max_tokens = (
                req_body.max_completion_tokens or req_body.max_tokens or settings.gateway.default_max_tokens
            )
            turns = [t.to_wire() for t in req_body.messages]
            texts = [t.content for t in turns]
            gw.check_context(spec, texts, max_tokens, "messages")
        else:
            max_tokens = req_body.max_tokens or 16  # OpenAI's default for /v1/completions
            texts = [req_body.prompt_text()]
            gw.check_context(spec, texts, max_tokens, "prompt")
        rid = req_body.request_id or new_request_id()
        wire = GenerateRequest(
            request_id=rid,
            model=spec.name,
            prompt=None if chat else texts[0],
            messages=turns if chat else None,
            max_tokens=max_tokens,
            temperature=req_body.temperature,
            top_p=req_body.top_p,
            stop=req_body.stop_list(),
            seed=req_body.seed,
            ignore_eos=req_body.ignore_eos,
            stream=req_body.stream,
            timeout_s=min(req_body.timeout_s or math.inf, settings.gateway.request_timeout_s),
        )
        status = 200
        metrics.inflight.inc()
        try:
            with tracing.span(
                _tracer,
                f"POST /v1/{'chat/' if chat else ''}completions",
                context=tracing.extract(request.headers),
                kind=trace.SpanKind.SERVER,
                attributes={"muserve.request_id": rid, "muserve.model": spec.name},
            ):
                if req_body.stream:
                    include_usage = bool(req_body.stream_options and req_body.stream_options.include_usage)
                    return await stream_generate(request, wire, chat, include_usage, t0)
                return await unary_generate(wire, chat, t0)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(endpoint, spec.name, str(status)).inc()
            metrics.latency.labels(endpoint, spec.name).observe(time.monotonic() - t0)

    def account(wire: GenerateRequest, chunk: TokenChunk) -> None:
        u = chunk.usage
        if u is None:
            return
        metrics.tokens.labels(wire.model, "prompt").inc(u.prompt_tokens)
        metrics.tokens.labels(wire.model, "completion").inc(u.completion_tokens)
        if u.energy_j is not None:
            metrics.energy.labels(wire.model, str(bool(u.energy_simulated)).lower()).inc(u.energy_j)

    async def unary_generate(wire: GenerateRequest, chat: bool, t0: float) -> web.Response:
        deadline = t0 + (wire.timeout_s or settings.gateway.request_timeout_s)
        parts: list[str] = []
        async with gw.exchange(subjects.generate(wire.model or ""), encode(wire)) as ex:
            try:
                while True:
                    chunk = decode(TokenChunk, (await gw.next_reply(ex, deadline)).data)
                    if chunk.error is not None:
                        raise ApiError.from_wire(chunk.error)
                    parts.append(chunk.text)
                    if chunk.finished:
                        break
            except ApiError as exc:
                if exc.status == 504:
                    await gw.cancel(wire.request_id, "timeout")
                raise
            except asyncio.CancelledError:
                await gw.cancel(wire.request_id, "client disconnected")
                raise
        account(wire, chunk)
        usage = oa.usage_json(chunk.usage, (time.monotonic() - t0) * 1000.0)
        build = oa.chat_json if chat else oa.completion_json
        return web.json_response(
            build(wire.request_id, wire.model or "", "".join(parts), chunk.finish_reason, usage, oa.now_s())
        )

    async def stream_generate(
        request: web.Request, wire: GenerateRequest, chat: bool, include_usage: bool, t0: float
    ) -> web.StreamResponse:
        deadline = t0 + (wire.timeout_s or settings.gateway.request_timeout_s)
        created = oa.now_s()
        model = wire.model or ""
        rid = wire.request_id
        resp: web.StreamResponse | None = None
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": rid}
        started = False
        attempt: int | None = None
        finished = False
        async with gw.exchange(subjects.generate(model), encode(wire)) as ex:
            try:
                while not finished:
                    try:
                        msgs = [await gw.next_reply(ex, deadline)]
                    except ApiError as exc:
                        if resp is None:
                            raise
                        if exc.status == 504:
                            await gw.cancel(rid, "timeout")
                        await resp.write(sse(oa.error_body(exc.message, type_="timeout", code=exc.code)))
                        break
                    # Whatever else already arrived goes out in the same write (one syscall, one segment).
                    while not ex.queue.empty():
                        msgs.append(ex.queue.get_nowait())
                    out = bytearray()
                    for msg in msgs:
                        chunk = decode(TokenChunk, msg.data)
                        if resp is None and not started:
                            if chunk.error is not None:
                                raise ApiError.from_wire(chunk.error)
                            started = True
                            metrics.ttft.labels(model).observe(time.monotonic() - t0)
                            if chat:
                                out += sse(oa.chat_chunk(rid, model, "", None, created, role=True))
                        if attempt is None:
                            attempt = chunk.attempt
                        elif chunk.attempt != attempt:
                            # A re-dispatch after tokens went out would repeat text: end with an error.
                            err = ErrorInfo(
                                code=ErrorCode.WORKER_LOST, message="worker lost mid-stream; retry"
                            )
                            out += sse(oa.wire_error_body(err))
                            finished = True
                            break
                        if chunk.error is not None:
                            out += sse(oa.wire_error_body(chunk.error))
                            finished = True
                            break
                        finish = chunk.finish_reason if chunk.finished else None
                        if chunk.text or finish:
                            piece = (
                                oa.chat_chunk(rid, model, chunk.text, finish, created)
                                if chat
                                else oa.completion_chunk(rid, model, chunk.text, finish, created)
                            )
                            out += sse(piece)
                        if chunk.finished:
                            finished = True
                            account(wire, chunk)
                            if include_usage:
                                usage = oa.usage_json(chunk.usage, (time.monotonic() - t0) * 1000.0)
                                out += sse(oa.usage_chunk(rid, model, usage, created, chat))
                            break
                    if finished:
                        out += b"data: [DONE]\n\n"
                    if resp is None:
                        if finished:
                            # The whole answer arrived before any byte went out: one plain response
                            # (headers and body in one write, no chunked encoding).
                            return web.Response(body=bytes(out), headers=headers)
                        resp = web.StreamResponse(headers=headers)
                        await resp.prepare(request)
                    await resp.write(bytes(out))
                assert resp is not None
                await resp.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                await gw.cancel(rid, "client disconnected")
                raise
            finally:
                if not finished and resp is not None:
                    await gw.cancel(rid, "stream ended early")
        assert resp is not None
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def embeddings(request: web.Request) -> web.Response:
        t0 = time.monotonic()
        body = parse(oa.EmbeddingBody, await read_json(request))
        spec = gw.model_spec(body.model, "embedding")
        rid = body.request_id or new_request_id()
        wire = EmbedRequest(
            request_id=rid, model=spec.name, input=body.inputs(), timeout_s=settings.gateway.request_timeout_s
        )
        status = 200
        try:
            with tracing.span(
                _tracer,
                "POST /v1/embeddings",
                context=tracing.extract(request.headers),
                kind=trace.SpanKind.SERVER,
            ):
                async with gw.exchange(subjects.embed(spec.name), encode(wire)) as ex:
                    msg = await gw.next_reply(ex, t0 + settings.gateway.request_timeout_s)
                res = decode(EmbedResult, msg.data)
                if res.error is not None:
                    raise ApiError.from_wire(res.error)
                usage = oa.usage_json(res.usage, (time.monotonic() - t0) * 1000.0)
                usage["completion_tokens"] = 0
                return web.json_response(
                    oa.embedding_json(spec.name, res.embeddings, body.encoding_format, usage)
                )
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels("embeddings", spec.name, str(status)).inc()
            metrics.latency.labels("embeddings", spec.name).observe(time.monotonic() - t0)

    async def models(request: web.Request) -> web.Response:
        data = []
        for m in settings.models:
            workers = gw.live_workers(m.name)
            data.append(
                {
                    "id": m.name,
                    "object": "model",
                    "created": int(gw.started_s),
                    "owned_by": "muserve",
                    "muserve": {
                        "kind": m.kind,
                        "group": m.group,
                        "max_context_tokens": m.max_context_tokens,
                        "workers": workers,
                        "ready": workers > 0,
                    },
                }
            )
        return web.json_response({"object": "list", "data": data})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        interval_s = settings.scheduler.telemetry_interval_ms / 1000.0
        scheduler = time.time() - gw.last_queue_telemetry_s < max(3 * interval_s, 2.0)
        ready_models = {m.name: gw.live_workers(m.name) > 0 for m in settings.models}
        ok = gw.nc.is_connected and scheduler and any(ready_models.values())
        # Reported, not required: without a predictor the scheduler's median baseline predicts.
        predictor = await gw.predictor_alive() if gw.nc.is_connected else False
        body = {
            "ready": ok,
            "nats": gw.nc.is_connected,
            "scheduler": scheduler,
            "predictor": predictor,
            "models": ready_models,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def not_found(request: web.Request) -> web.Response:
        raise ApiError(404, f"no route {request.method} {request.path}")

    app = web.Application(middlewares=[errors], client_max_size=settings.gateway.max_body_bytes)
    app["max_body_bytes"] = settings.gateway.max_body_bytes
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set."""
    gw = Gateway(settings, nc)
    await gw.start()
    app = build_app(gw)
    # handler_cancellation: a client that hangs up cancels its handler, which cancels the request.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.gateway.host, settings.gateway.port, reuse_address=True)
    await site.start()
    settle()
    log.info(
        "gateway listening on http://%s:%d (pid %d)",
        settings.gateway.host,
        settings.gateway.port,
        os.getpid(),
    )
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """Entry point of `muserve gateway`."""
    service_main("gateway", serve)
