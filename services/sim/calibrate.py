"""Measure the real worker engine's step latency and write a step-model calibration for `muserve sim`.

The served model runs in the worker's own ContinuousBatchingEngine on this machine: batches of 1 to
max_seqs sequences with prompts of several lengths decode a fixed number of tokens each (ignore_eos),
and every forward pass's StepStats (batch, summed context, latency) is kept. The fit
(`StepModel.from_mapping`) turns them into decode = a0 + a1 * batch + b * context and
prefill = p0 + p1 * prompt + p2 * prompt^2; `muserve sim --calibration FILE` simulates with them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.machine import cpu_model
from services.sim.step_model import StepModel, calibration_from_step_stats

__all__ = ["DEFAULT_PROMPT_TOKENS", "calibrate_engine", "calibrate_worker"]

DEFAULT_PROMPT_TOKENS = (16, 128, 512)


def calibrate_engine(
    engine: Any,
    *,
    prompt_tokens: Sequence[int] = DEFAULT_PROMPT_TOKENS,
    decode_tokens: int = 48,
    batches: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Run batches x prompt lengths through engine (a ContinuousBatchingEngine); return all StepStats.

    One short warm-up batch runs first and is not kept (one-off allocation costs).
    """
    from services.worker.engine import SamplingParams, SeqRequest

    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2, got {decode_tokens}")
    if not prompt_tokens or min(prompt_tokens) < 1:
        raise ValueError(f"prompt_tokens must be non-empty and >= 1, got {list(prompt_tokens)}")
    sizes = list(batches) if batches is not None else sorted({1, *range(2, engine.max_seqs + 1, 2)})
    if not sizes or min(sizes) < 1 or max(sizes) > engine.max_seqs:
        raise ValueError(f"batch sizes must be in [1, {engine.max_seqs}], got {sizes}")
    longest = max(prompt_tokens) + decode_tokens
    if longest > engine.max_context_tokens:
        raise ValueError(
            f"prompt + decode ({longest}) exceeds the context window {engine.max_context_tokens}"
        )
    rng = random.Random(seed)
    # Token ids from the middle of the vocabulary: plain text pieces, never special tokens.
    lo, hi = engine.vocab_size // 8, engine.vocab_size // 2
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)

    def run(batch: int, prompt: int, tag: str) -> list[Any]:
        for i in range(batch):
            ids = [rng.randrange(lo, hi) for _ in range(prompt)]
            engine.add(SeqRequest(f"{tag}-{i}", ids, params))
        stats: list[Any] = []
        while engine.has_work:
            _, step_stats = engine.step()
            stats.extend(step_stats)
        return stats

    run(1, min(prompt_tokens), "warmup")
    cells = [(b, p) for b in sizes for p in prompt_tokens]
    out: list[Any] = []
    for done, (b, p) in enumerate(cells, start=1):
        out.extend(run(b, p, f"cal-{b}-{p}"))
        if progress is not None:
            progress(done, len(cells))
    return out


def calibrate_worker(
    out_path: Path,
    *,
    cache_dir: Path,
    dtype: str = "bfloat16",
    num_hidden_layers: int | None = None,
    max_seqs: int = 8,
    prompt_tokens: Sequence[int] = DEFAULT_PROMPT_TOKENS,
    decode_tokens: int = 48,
    threads: int | None = None,
    clock_share: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load the served SmolLM2 as the worker does, measure it, write the calibration JSON; return it.

    clock_share is the part of each step that scales with the GPU clock; a CPU cannot measure it, so
    it defaults to the model's configured sensitivity, the s the simulated GPU stretches live steps by.
    """
    import torch
    from tqdm import tqdm

    from services.worker.engine import ContinuousBatchingEngine
    from services.worker.models import ensure_smollm2, load_causal_lm

    if threads is not None:
        torch.set_num_threads(threads)
    path = ensure_smollm2(cache_dir, log=log)
    model, tok = load_causal_lm(path, dtype=dtype, num_hidden_layers=num_hidden_layers)
    engine = ContinuousBatchingEngine(model, tok, max_seqs=max_seqs, seed=seed)
    layers = num_hidden_layers or int(model.config.num_hidden_layers)
    started = time.perf_counter()
    with tqdm(total=1, desc="calibrate worker", unit="cell", disable=not show_progress) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        stats = calibrate_engine(
            engine, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, seed=seed, progress=progress
        )
    shape = f"{layers} layers, {dtype}, max_seqs {max_seqs}"
    source = f"SmolLM2-135M-Instruct ({shape}) measured on {cpu_model()} (CPU)"
    if clock_share is None:
        from services.common.settings import ModelSpec

        clock_share = float(ModelSpec.model_fields["sensitivity"].default)
    data = calibration_from_step_stats(stats, source)
    data["clock_share"] = clock_share
    model_fit = StepModel.from_mapping(data, source=source)
    data["fitted"] = {k: v for k, v in model_fit.to_dict().items() if k != "source"}
    data["measured"] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "steps": len(stats),
        "prompt_tokens": list(prompt_tokens),
        "decode_tokens": decode_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    fit = data["fitted"]
    log(
        f"decode = {fit['decode_memory_ms']:.2f} + {fit['decode_compute_ms_per_seq']:.3f} x batch + "
        f"{fit['decode_memory_ms_per_ctx']:.5f} x context ms; prefill = {fit['prefill_memory_ms']:.2f} + "
        f"{fit['prefill_compute_ms_per_token']:.4f} x prompt + {fit['prefill_compute_ms_per_token_sq']:.2e} "
        f"x prompt^2 ms ({len(stats)} steps)"
    )
    log(f"wrote {out_path}; use it with `muserve sim --calibration {out_path}`")
    return data
