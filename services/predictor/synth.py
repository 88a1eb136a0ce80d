"""Synthetic prompts for distillation: the served LLM writes new instructions after a few example ones.

A distilled predictor generalises with the number of prompts its teacher labels, and this machine has
few real ones (483 train prompts, ShareGPT's 994 first turns). SmolLM2 shown four example
instructions ("Instruction: ...", blank line, four times, then "Instruction:") writes a fifth in the
same style (self-instruct, Wang et al. 2023); the teacher then labels it like any unlabeled prompt.
The examples must be prompts the student may train on (train split, ShareGPT), never held-out ones;
an output equal to an excluded text (whitespace and case aside) is dropped.

Batches are cached as JSON lines (one per batch, with its index), so an interrupted run resumes; batch b
is drawn from seed and b alone, so resuming gives what one run would have.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

INSTRUCTION = "Instruction:"
# Longer examples make a longer context for every generated token; most AlpacaEval prompts are shorter.
MAX_EXAMPLE_CHARS = 400
MIN_WORDS = 3


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def example_context(examples: Sequence[str]) -> str:
    """The few-shot context: each example as an instruction paragraph, then an open one."""
    return "".join(f"{INSTRUCTION} {' '.join(e.split())}\n\n" for e in examples) + INSTRUCTION


def first_instruction(generated: str) -> str:
    """The generated instruction: the text up to the first blank line or the next "Instruction:"."""
    text = generated.split("\n\n", 1)[0].split(INSTRUCTION, 1)[0]
    return " ".join(text.split())


def cache_path(cache_dir: Path, seeds: Sequence[str], seed: int, examples: int, max_new_tokens: int) -> Path:
    """Where the batches for these seed prompts and settings are cached (keyed by their hash)."""
    h = hashlib.sha256()
    for s in (*seeds, str(seed), str(examples), str(max_new_tokens)):
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return cache_dir / "synthetic-prompts" / f"{h.hexdigest()[:16]}.jsonl"


def synthesize_prompts(
    model_dir: Path,
    seeds: Sequence[str],
    n: int,
    *,
    exclude: Iterable[str] = (),
    seed: int = 0,
    batch_size: int = 16,
    examples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    cache_file: Path | None = None,
    num_hidden_layers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[str]:
    """n new prompts written by the causal LM in model_dir after random examples from seeds.

    Distinct, at least MIN_WORDS words, none equal to a seed or an excluded text. cache_file (JSON
    lines, one per batch) makes the run resumable.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = [s for s in seeds if s.strip() and len(s) <= MAX_EXAMPLE_CHARS]
    if len(pool) < examples:
        raise ValueError(
            f"need at least {examples} seed prompts of <= {MAX_EXAMPLE_CHARS} characters, got {len(pool)}"
        )
    banned = {_norm(t) for t in exclude} | {_norm(s) for s in seeds}
    done: dict[int, list[str]] = {}
    if cache_file is not None and cache_file.is_file():
        with open(cache_file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[int(row["batch"])] = [str(t) for t in row["texts"]]

    out: list[str] = []
    seen: set[str] = set()

    def accept(texts: Iterable[str]) -> None:
        for t in texts:
            key = _norm(t)
            if len(out) < n and len(t.split()) >= MIN_WORDS and key not in banned and key not in seen:
                seen.add(key)
                out.append(t)

    model: Any = None
    tokenizer: Any = None
    bar = tqdm(total=n, desc="synthetic prompts", unit="prompt", disable=not progress)
    b = 0
    # A batch where nothing new is accepted 50 times over means the model only repeats itself.
    misses = 0
    while len(out) < n:
        before = len(out)
        if b not in done:
            if model is None:
                from services.worker.models import load_causal_lm

                model, tokenizer = load_causal_lm(model_dir, "bfloat16", num_hidden_layers)
                tokenizer.padding_side = "left"
            done[b] = _generate_batch(
                model, tokenizer, pool, seed, b, batch_size, examples, max_new_tokens, temperature, top_p
            )
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with open(cache_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"batch": b, "texts": done[b]}) + "\n")
        accept(done[b])
        bar.update(len(out) - before)
        misses = misses + 1 if len(out) == before else 0
        if misses >= 50:
            log(f"synthetic prompts: stopped at {len(out)} of {n}: the last 50 batches added nothing new")
            break
        b += 1
    bar.close()
    return out


def _generate_batch(
    model: Any,
    tokenizer: Any,
    pool: Sequence[str],
    seed: int,
    batch: int,
    batch_size: int,
    examples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[str]:
    """One batch of generated instructions (cleaned, not yet filtered); drawn from (seed, batch) alone."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    rng = random.Random(f"{seed}:{batch}")
    contexts = [example_context(rng.sample(list(pool), examples)) for _ in range(batch_size)]
    enc = tokenizer(contexts, return_tensors="pt", padding=True)
    start = enc.input_ids.shape[1]

    class _AllEnded(StoppingCriteria):  # type: ignore[misc]  # transformers is untyped here
        """Stop once every row has ended its instruction (a blank line)."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return all("\n\n" in t or INSTRUCTION in t for t in texts)

    torch.manual_seed(seed * 1_000_003 + batch)
    with torch.inference_mode():
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            pad_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_AllEnded()]),
        )
    return [first_instruction(t) for t in tokenizer.batch_decode(ids[:, start:], skip_special_tokens=True)]


def distillation_prompts(
    data_dir: Path,
    *,
    split_seed: int,
    synthetic: int,
    model_dir: Path | None,
    cache_dir: Path,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Prompts without answers for a teacher to label: ShareGPT's first turns, then synthetic ones.

    Synthetic prompts are written after examples from the train prompts of split_seed's split and from
    ShareGPT; every AlpacaEval prompt (held-out ones included) is excluded from both.
    """
    from services.predictor.data import (
        load_length_data,
        read_prompt_table,
        read_unlabeled_prompts,
        split_by_prompt,
    )

    every = list(read_prompt_table(data_dir).values())
    sharegpt = read_unlabeled_prompts(data_dir, every)
    if synthetic <= 0:
        return sharegpt
    if model_dir is None:
        raise ValueError("synthetic prompts need the served LLM (model_dir)")
    texts = load_length_data(data_dir).texts  # the rows train() splits
    train_rows, _, _ = split_by_prompt(len(texts), split_seed)
    seeds = [texts[i] for i in train_rows] + sharegpt
    cache = cache_path(cache_dir, seeds, split_seed, 4, 48)
    made = synthesize_prompts(
        model_dir, seeds, synthetic, exclude=every, seed=split_seed, cache_file=cache, log=log
    )
    log(f"{len(sharegpt)} ShareGPT prompts and {len(made)} synthetic ones (cached in {cache})")
    return sharegpt + made
