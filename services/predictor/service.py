"""Predictor service: a NATS queue group answering `muserve.v1.predict` with micro-batched predictions."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import subjects, tracing
from services.common.codec import CodecError, decode, encode
from services.common.nats_conn import TaskSet, concurrent
from services.common.runtime import register_discovery, service_main, settle
from services.common.schemas import (
    CompletionRecord,
    ErrorCode,
    ErrorInfo,
    PredictItem,
    PredictReply,
    PredictRequest,
)
from services.common.settings import Settings
from services.predictor.base import LengthPredictor, MedianLengthPredictor
from services.predictor.batcher import MicroBatcher

log = logging.getLogger("muserve.predictor")
_tracer = tracing.tracer("muserve.predictor")

# Longer prompts are cut (head and tail kept) before prediction, so a huge prompt costs no more.
MAX_TEXT_CHARS = 16_384


def median_baseline(settings: Settings) -> MedianLengthPredictor:
    """The honest baseline: each model's median observed length (keyed as the scheduler asks)."""
    priors = {m.length_model: m.median_tokens for m in settings.models}
    return MedianLengthPredictor(settings.predictor.edges_tokens, priors_tokens=priors)


def build_predictor(settings: Settings) -> LengthPredictor:
    """The configured predictor; the proxy model falls back to the baseline, if it cannot load."""
    cfg = settings.predictor
    if cfg.kind == "median":
        return median_baseline(settings)
    try:
        from services.predictor.proxy import ProxyLengthPredictor

        proxy = ProxyLengthPredictor.load(cfg.artifact, threads=cfg.threads, cache_dir=settings.cache)
    except Exception as exc:
        log.warning("proxy predictor unavailable (%s); serving the per-model median baseline instead", exc)
        return median_baseline(settings)
    served = {m.length_model for m in settings.models if m.kind == "chat"}
    unknown = sorted(served - set(proxy.models))
    if unknown:
        log.warning(
            "predictor %s was not trained for %s: it uses its generic model embedding", proxy.ident, unknown
        )
    return proxy


def build_overflow(settings: Settings, primary: LengthPredictor) -> LengthPredictor | None:
    """The cheaper predictor that answers when the primary would keep a call waiting too long."""
    cfg = settings.predictor
    if cfg.overflow == "none" or isinstance(primary, MedianLengthPredictor):
        return None
    if cfg.overflow == "minilm" and primary.name != "proxy-minilm":
        try:
            from services.predictor.artifacts import MINILM_ARTIFACT_DIR
            from services.predictor.proxy import ProxyLengthPredictor

            # The overflow sheds load, so it runs int8, its cheapest form: ~2x less CPU a prompt than
            # bfloat16 (measured 3.3 vs 6.8 ms alone) for ~0.02 less accuracy.
            return ProxyLengthPredictor.load(MINILM_ARTIFACT_DIR, threads=cfg.threads, quantize=True)
        except Exception as exc:
            log.warning("overflow predictor unavailable (%s); the median baseline takes overflow", exc)
    return median_baseline(settings)


def warm_up(predictor: LengthPredictor, settings: Settings) -> None:
    """A few throw-away predictions at the batch sizes and lengths serving will see."""
    model = next((m.length_model for m in settings.models if m.kind == "chat"), "warm-up")
    texts = ["Hi.", "Write a long story about a dragon. " * 40, "Explain continuous batching."]
    for n in (1, 3, 8):
        predictor.predict(
            [PredictItem(request_id=f"warm-{i}", model=model, text=texts[i % 3]) for i in range(n)]
        )


def clip_text(text: str) -> str:
    """Keep head and tail of very long prompts."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    half = MAX_TEXT_CHARS // 2
    return text[:half] + "\n...\n" + text[-half:]


async def serve(settings: Settings, nc: Client, stop: asyncio.Event) -> None:
    """Run until stop is set."""
    if settings.predictor.nice:
        os.nice(settings.predictor.nice)  # before torch starts its threads, so they inherit it
    # One thread for every torch call (load, predict): torch is much slower on a thread it did not start on.
    torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    loop = asyncio.get_running_loop()
    predictor = await loop.run_in_executor(torch_thread, build_predictor, settings)
    overflow = await loop.run_in_executor(torch_thread, build_overflow, settings, predictor)
    heavy = not isinstance(predictor, MedianLengthPredictor)
    if heavy:
        # The first forward passes are slow (allocations, kernel choice): pay them before saying ready,
        # not on a request the scheduler waits on.
        for p in (predictor, overflow):
            if p is not None and not isinstance(p, MedianLengthPredictor):
                await loop.run_in_executor(torch_thread, warm_up, p, settings)
    batcher = MicroBatcher(
        predictor,
        window_ms=settings.predictor.batch_window_ms,
        max_batch=settings.predictor.max_batch,
        executor=torch_thread if heavy else None,
        overflow=overflow,
        max_wait_ms=settings.predictor.max_wait_ms,
        max_busy_share=settings.predictor.max_busy_share,
    )
    tasks = TaskSet()
    started = time.time()

    async def on_predict(msg: Msg) -> None:
        if not msg.reply:
            return
        with tracing.span(_tracer, "predictor.predict", context=tracing.extract(msg.headers)) as span:
            try:
                req = decode(PredictRequest, msg.data)
                items = [i.model_copy(update={"text": clip_text(i.text)}) for i in req.items]
                preds = await batcher.predict(items)
                reply = PredictReply(predictions=preds)
                span.set_attribute("muserve.batch_items", len(items))
            except CodecError as exc:
                reply = PredictReply(error=exc.to_error())
            except Exception as exc:
                log.exception("prediction failed")
                reply = PredictReply(error=ErrorInfo(code=ErrorCode.INTERNAL, message=str(exc)))
        await nc.publish(msg.reply, encode(reply))

    async def on_completion(msg: Msg) -> None:
        try:
            rec = decode(CompletionRecord, msg.data)
        except CodecError:
            return
        if rec.finish_reason in ("stop", "length"):
            # Learn under the name the scheduler asks about (a model's predict_as alias).
            model = settings.length_model(rec.model)
            predictor.observe(model, rec.completion_tokens, rec.prediction)
            if overflow is not None:
                overflow.observe(model, rec.completion_tokens, rec.prediction)

    def info() -> dict[str, Any]:
        return {
            "predictor": predictor.ident,
            "overflow": None if overflow is None else overflow.ident,
            "batches": batcher.batches,
            "items": batcher.items,
            "shed": batcher.shed,
            # Models asked about that the artifact has no embedding for (they get the average LLM's).
            "unknown_models": sorted(getattr(predictor, "fallback_models", ())),
            "uptime_s": time.time() - started,
        }

    await nc.subscribe(subjects.PREDICT, queue=subjects.PREDICTOR_QUEUE, cb=concurrent(tasks, on_predict))
    await nc.subscribe(subjects.COMPLETIONS_ALL, cb=on_completion)
    await register_discovery(nc, "predictor", info)
    settle()
    log.info(
        "predictor %s ready (overflow %s, pid %d)",
        predictor.ident,
        None if overflow is None else overflow.ident,
        os.getpid(),
    )
    await stop.wait()
    await tasks.cancel_all()
    torch_thread.shutdown(wait=False)


def main() -> None:
    """Entry point of `muserve predictor`."""
    service_main("predictor", serve)
