"""`muserve predictor collect`: record a served model's real output lengths on a prompt set.

The predictor must learn the verbosity of the LLM we actually serve, not only of the models in
public data. This runs that model over prompts (in-process on muserve's own engine, or through a
running muserve gateway) and appends one JSON line per prompt: resumable, with a progress bar.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass(frozen=True)
class Prompt:
    """One prompt to collect an answer length for."""

    idx: int
    text: str


@dataclass(frozen=True)
class Record:
    """One collected answer: its true length in the served model's tokens."""

    idx: int
    model: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    seconds: float
    max_tokens: int
    temperature: float


def read_prompts(path: Path) -> list[Prompt]:
    """AlpacaEval prompts (.jsonl with idx/instruction) or ShareGPT first turns (.json list)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            rows = [json.loads(line) for line in f if line.strip()]
            return [
                Prompt(int(r.get("idx", i)), str(r.get("instruction") or r["prompt"]))
                for i, r in enumerate(rows)
            ]
        data = json.load(f)
    out = []
    for i, item in enumerate(data):
        turns = item.get("conversations") or []
        first = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
        if first:
            out.append(Prompt(i, str(first)))
    return out


def done_indices(out: Path) -> set[int]:
    """Prompts already collected (so a rerun resumes)."""
    if not out.exists():
        return set()
    seen = set()
    with open(out, encoding="utf-8") as f:
        for line in f:
            try:
                seen.add(int(json.loads(line)["idx"]))
            except (ValueError, KeyError):
                continue  # a line cut short by an interrupted run is simply redone
    return seen


def _pending(prompts: list[Prompt], out: Path, limit: int | None) -> list[Prompt]:
    seen = done_indices(out)
    todo = [p for p in prompts if p.idx not in seen]
    return todo[:limit] if limit is not None else todo


def collect_engine(
    prompts: list[Prompt],
    out: Path,
    *,
    model_name: str,
    model_dir: Path,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch: int,
    dtype: str = "bfloat16",
    limit: int | None = None,
) -> int:
    """Run muserve's own continuous-batching engine in this process; returns how many were collected."""
    from services.worker.engine import ContinuousBatchingEngine, SamplingParams, SeqRequest
    from services.worker.models import chat_prompt_ids, load_causal_lm

    todo = _pending(prompts, out, limit)
    if not todo:
        return 0
    model, tok = load_causal_lm(model_dir, dtype=dtype)
    engine = ContinuousBatchingEngine(model, tok, max_seqs=batch)
    queue: Iterator[Prompt] = iter(todo)
    started: dict[str, tuple[Prompt, float, int]] = {}
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc=f"collect {model_name}", unit="prompt") as bar,
    ):
        while True:
            while engine.free_slots > 0:
                p = next(queue, None)
                if p is None:
                    break
                ids = chat_prompt_ids(tok, [{"role": "user", "content": p.text}])
                # A per-prompt seed keeps reruns reproducible whatever the batch composition.
                params = SamplingParams(
                    max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + p.idx
                )
                rid = str(p.idx)
                engine.add(SeqRequest(rid, ids, params))
                started[rid] = (p, time.perf_counter(), len(ids))
            if not engine.has_work:
                break
            events, _ = engine.step()
            for ev in events:
                if not ev.finished:
                    continue
                p, t0, n_prompt = started.pop(ev.request_id)
                rec = Record(
                    p.idx,
                    model_name,
                    n_prompt,
                    ev.num_output_tokens,
                    ev.finish_reason,
                    round(time.perf_counter() - t0, 3),
                    max_tokens,
                    temperature,
                )
                f.write(json.dumps(asdict(rec)) + "\n")
                f.flush()
                written += 1
                bar.update(1)
    return written


async def _collect_http_async(
    todo: list[Prompt],
    out: Path,
    *,
    url: str,
    model_name: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    concurrency: int,
) -> int:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    timeout = aiohttp.ClientTimeout(total=3600)
    with (
        open(out, "a", encoding="utf-8") as f,  # noqa: ASYNC230 - the CLI's own small appends
        tqdm(total=len(todo), desc=f"collect {model_name}", unit="prompt") as bar,
    ):
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(p: Prompt) -> None:
                nonlocal written
                body: dict[str, Any] = {
                    "model": model_name,
                    "messages": [{"role": "user", "content": p.text}],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "seed": seed + p.idx,
                }
                async with sem:
                    t0 = time.perf_counter()
                    async with session.post(f"{url.rstrip('/')}/v1/chat/completions", json=body) as resp:
                        data = await resp.json()
                    if resp.status != 200:
                        tqdm.write(
                            f"prompt {p.idx}: HTTP {resp.status}: {data.get('error', {}).get('message')}"
                        )
                        return
                u = data["usage"]
                rec = Record(
                    p.idx,
                    model_name,
                    u["prompt_tokens"],
                    u["completion_tokens"],
                    data["choices"][0]["finish_reason"],
                    round(time.perf_counter() - t0, 3),
                    max_tokens,
                    temperature,
                )
                f.write(json.dumps(asdict(rec)) + "\n")
                f.flush()
                written += 1
                bar.update(1)

            await asyncio.gather(*(one(p) for p in todo))
    return written


def collect_http(
    prompts: list[Prompt],
    out: Path,
    *,
    url: str,
    model_name: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    concurrency: int,
    limit: int | None = None,
) -> int:
    """Collect through a running muserve gateway (the full serving path)."""
    todo = _pending(prompts, out, limit)
    if not todo:
        return 0
    return asyncio.run(
        _collect_http_async(
            todo,
            out,
            url=url,
            model_name=model_name,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            concurrency=concurrency,
        )
    )


def read_records(path: Path) -> list[Record]:
    """Collected records (incomplete trailing lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(Record(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return out
