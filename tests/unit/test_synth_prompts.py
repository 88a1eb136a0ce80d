"""Synthetic distillation prompts: parsing, exclusion, resumable cache (SmolLM2 cut to 2 layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.predictor.synth import (
    MIN_WORDS,
    cache_path,
    example_context,
    first_instruction,
    synthesize_prompts,
)

SEEDS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain how a bicycle gear works.",
    "List five fruits that are red.",
    "How do I sort a list in Python?",
]


@pytest.fixture(scope="module")
def smol_dir(cache_dir: Path) -> Path:
    from services.worker.models import ensure_smollm2

    return ensure_smollm2(cache_dir)


def test_context_lists_the_examples_then_an_open_instruction() -> None:
    ctx = example_context(["Say  hi.", "Count\nto three."])
    assert ctx == "Instruction: Say hi.\n\nInstruction: Count to three.\n\nInstruction:"


def test_the_generated_instruction_ends_at_a_blank_line_or_the_next_one() -> None:
    assert first_instruction(" Name a  colour.\n\nInstruction: more") == "Name a colour."
    assert first_instruction(" Name a colour. Instruction: more") == "Name a colour."
    assert first_instruction(" cut off mid") == "cut off mid"


def test_cache_path_depends_on_the_seeds_and_settings(tmp_path: Path) -> None:
    a = cache_path(tmp_path, SEEDS, 0, 4, 48)
    assert a == cache_path(tmp_path, list(SEEDS), 0, 4, 48)
    assert a != cache_path(tmp_path, SEEDS[:-1], 0, 4, 48) != cache_path(tmp_path, SEEDS, 1, 4, 48)


def test_too_few_seeds_and_negative_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed prompts"):
        synthesize_prompts(tmp_path, SEEDS[:2], 4)
    with pytest.raises(ValueError, match="n must be"):
        synthesize_prompts(tmp_path, SEEDS, -1)


def test_prompts_are_new_distinct_and_resume_from_the_cache(smol_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "synth.jsonl"
    excluded = ["Write a limerick about a cat."]
    got = synthesize_prompts(
        smol_dir, SEEDS, 6, exclude=excluded, batch_size=4, max_new_tokens=12, cache_file=cache,
        num_hidden_layers=2, progress=False,
    )  # fmt: skip
    assert 1 <= len(got) <= 6
    norm = {" ".join(t.split()).lower() for t in got}
    assert len(norm) == len(got)
    banned = {" ".join(t.split()).lower() for t in SEEDS + excluded}
    assert not norm & banned
    assert all(len(t.split()) >= MIN_WORDS for t in got)
    batches = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [b["batch"] for b in batches] == list(range(len(batches)))
    assert all(len(b["texts"]) == 4 for b in batches)
    # Everything is cached now: a bogus model folder is never opened, and the answer is the same.
    again = synthesize_prompts(
        tmp_path / "no-model", SEEDS, len(got), exclude=excluded, batch_size=4, cache_file=cache,
        progress=False,
    )  # fmt: skip
    assert again == got


def test_a_cached_batch_is_filtered_like_a_new_one(tmp_path: Path) -> None:
    cache = tmp_path / "synth.jsonl"
    texts = [
        "What is the capital of France?",  # a seed
        "Name two big rivers.",
        "Name two  big rivers.",  # a duplicate
        "ok",  # too short
        "Why is the sky blue?",
    ]
    cache.write_text(json.dumps({"batch": 0, "texts": texts}) + "\n")
    got = synthesize_prompts(tmp_path / "no-model", SEEDS, 2, cache_file=cache, progress=False)
    assert got == ["Name two big rivers.", "Why is the sky blue?"]
