"""Training data for the proxy length predictor: AlpacaEval lengths of many LLMs plus collected records.

Labels are output lengths in SmolLM2 tokens per (prompt, target LLM). Empty answers (<= 1 token) are
dropped, long ones capped at MAX_TOKENS, and the split is by prompt so that no prompt answered by
many models sits in both train and test.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.predictor.collect import read_records

PROMPTS_FILE = "alpaca_eval_prompts.jsonl"
LENGTHS_FILE = "alpaca_eval_response_lengths.csv.gz"
SHAREGPT_FILE = "sharegpt_v3_first_prompts_1000.json"
# A placeholder model and one that games the judge with padded answers: not real answer lengths.
EXCLUDED_MODELS = frozenset({"NullModel", "gpt4_gamed"})
MIN_TOKENS = 2
MAX_TOKENS = 2048
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LengthData:
    """Prompts, models and one true length per answered (prompt, model) pair."""

    prompt_ids: list[int]  # AlpacaEval idx of each prompt row
    texts: list[str]
    models: list[str]
    rows: IntArray  # per pair: index into prompt_ids / texts
    cols: IntArray  # per pair: index into models
    tokens: IntArray  # per pair: output length, >= MIN_TOKENS and <= MAX_TOKENS

    def subset(self, prompt_rows: Iterable[int]) -> LengthData:
        """The pairs whose prompt row is in prompt_rows (prompt and model tables unchanged)."""
        keep = np.isin(self.rows, np.fromiter(prompt_rows, dtype=np.int64))
        return LengthData(
            self.prompt_ids, self.texts, self.models, self.rows[keep], self.cols[keep], self.tokens[keep]
        )

    def answer_counts(self, models: Iterable[str]) -> dict[str, int]:
        """Answers held for each of these models (those it has at all)."""
        col = {m: i for i, m in enumerate(self.models)}
        return {m: int(np.count_nonzero(self.cols == col[m])) for m in models if m in col}

    def matrix(self) -> FloatArray:
        """Prompts x models log-lengths, NaN where a model did not answer a prompt."""
        out = np.full((len(self.texts), len(self.models)), np.nan)
        out[self.rows, self.cols] = np.log(self.tokens.astype(np.float64))
        return out

    def content_hash(self) -> str:
        """sha256 over prompt texts and every label: identifies the training data of an artifact."""
        h = hashlib.sha256()
        for pid, text in zip(self.prompt_ids, self.texts, strict=True):
            h.update(f"{pid}\x00{text}\x01".encode())
        order = np.lexsort((self.cols, self.rows))
        for r, c, t in zip(self.rows[order], self.cols[order], self.tokens[order], strict=True):
            h.update(f"{self.prompt_ids[r]}\x00{self.models[c]}\x00{t}\x01".encode())
        return h.hexdigest()


def clean_length(tokens: int, cap: int = MAX_TOKENS) -> int | None:
    """None for an empty answer (dropped), else the length capped at cap."""
    if tokens < MIN_TOKENS:
        return None
    return min(tokens, cap)


def read_prompt_table(data_dir: Path) -> dict[int, str]:
    """AlpacaEval idx -> instruction text."""
    out: dict[int, str] = {}
    with open(data_dir / PROMPTS_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[int(row["idx"])] = str(row["instruction"])
    return out


def read_prompt_tokens(data_dir: Path) -> dict[int, int]:
    """AlpacaEval idx -> prompt length in SmolLM2 tokens (for the prompt-length baseline)."""
    out: dict[int, int] = {}
    with open(data_dir / PROMPTS_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[int(row["idx"])] = int(row.get("prompt_tokens_smollm2") or 1)
    return out


def read_unlabeled_prompts(data_dir: Path, exclude: Iterable[str] = ()) -> list[str]:
    """ShareGPT first user turns (no answers): prompts a teacher predictor can label for distillation.

    Texts equal (whitespace and case aside) to one in exclude are left out, so a held-out AlpacaEval
    prompt can never come back as a training prompt.
    """

    def norm(text: str) -> str:
        return " ".join(text.split()).lower()

    banned = {norm(t) for t in exclude}
    with open(data_dir / SHAREGPT_FILE, encoding="utf-8") as f:
        rows = json.load(f)
    out: list[str] = []
    seen: set[str] = set()
    for row in rows:
        turns = [t for t in row.get("conversations", []) if t.get("from") == "human"]
        text = str(turns[0].get("value", "")) if turns else ""
        key = norm(text)
        if key and key not in banned and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def word_dropout(text: str, rng: np.random.Generator, p: float = 0.2) -> str:
    """The text with each word dropped with probability p (at least one word kept): a distillation variant."""
    words = text.split(" ")
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def read_alpaca_lengths(data_dir: Path) -> list[tuple[str, int, int]]:
    """(model, idx, SmolLM2 tokens) of every public answer, excluded models left out (not cleaned)."""
    out = []
    with gzip.open(data_dir / LENGTHS_FILE, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["model"] in EXCLUDED_MODELS or not row["resp_tokens_smollm2"]:
                continue
            out.append((row["model"], int(row["idx"]), int(row["resp_tokens_smollm2"])))
    return out


def read_collected(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(model, idx, output tokens) from `muserve predictor collect` files (a repeat keeps the last)."""
    latest: dict[tuple[str, int], int] = {}
    for path in paths:
        for rec in read_records(path):
            tokens = rec.output_tokens
            if rec.finish_reason == "length" and tokens >= rec.max_tokens:
                # Cut by the collection's max_tokens, not finished: a runaway answer, as long as any.
                tokens = max(tokens, MAX_TOKENS)
            latest[(rec.model, rec.idx)] = tokens
    return [(m, i, t) for (m, i), t in latest.items()]


def build_length_data(
    prompts: dict[int, str], labels: Iterable[tuple[str, int, int]], cap: int = MAX_TOKENS
) -> LengthData:
    """Clean labels (drop empty, cap long) and index them by prompt row and model."""
    prompt_ids = sorted(prompts)
    row_of = {pid: r for r, pid in enumerate(prompt_ids)}
    models: list[str] = []
    col_of: dict[str, int] = {}
    rows, cols, toks = [], [], []
    for model, idx, tokens in labels:
        t = clean_length(tokens, cap)
        if t is None or idx not in row_of:
            continue
        if model not in col_of:
            col_of[model] = len(models)
            models.append(model)
        rows.append(row_of[idx])
        cols.append(col_of[model])
        toks.append(t)
    return LengthData(
        prompt_ids,
        [prompts[p] for p in prompt_ids],
        models,
        np.asarray(rows, dtype=np.int64),
        np.asarray(cols, dtype=np.int64),
        np.asarray(toks, dtype=np.int64),
    )


def load_length_data(data_dir: Path, collected: Sequence[Path] = (), cap: int = MAX_TOKENS) -> LengthData:
    """AlpacaEval prompts with every public model's lengths plus the collected records of served models."""
    prompts = read_prompt_table(data_dir)
    labels = read_alpaca_lengths(data_dir) + read_collected([p for p in collected if p.exists()])
    return build_length_data(prompts, labels, cap)


def split_by_prompt(
    n_prompts: int, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> tuple[IntArray, IntArray, IntArray]:
    """Disjoint train/validation/test prompt rows (sorted), shuffled with seed: 805 prompts -> 483/161/161."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError("fractions must be three numbers summing to 1")
    perm = np.random.default_rng(seed).permutation(n_prompts)
    n_train = round(fractions[0] * n_prompts)
    n_val = round(fractions[1] * n_prompts)
    return (
        np.sort(perm[:n_train]),
        np.sort(perm[n_train : n_train + n_val]),
        np.sort(perm[n_train + n_val :]),
    )


def edge_percentiles(classes: int) -> list[float]:
    """Percentiles of the class edges: 5 classes -> p25/p50/p75/p99 (quartiles plus a rare tail class)."""
    if classes < 2:
        raise ValueError("need at least 2 classes")
    if classes == 2:
        return [50.0]
    inner = classes - 2
    return [100.0 * (i + 1) / (inner + 1) for i in range(inner)] + [99.0]


def class_edges(tokens: npt.ArrayLike, percentiles: Sequence[float]) -> list[int]:
    """Integer class edges at the given percentiles of the lengths, kept strictly increasing."""
    values = np.percentile(np.asarray(tokens, dtype=np.float64), list(percentiles))
    edges: list[int] = []
    for v in values:
        e = round(float(v))
        edges.append(max(e, edges[-1] + 1) if edges else max(e, 1))
    return edges


def classes_of(tokens: npt.ArrayLike, edges: Sequence[int]) -> IntArray:
    """Vectorised length_class: class k holds lengths in (edges[k-1], edges[k]]."""
    return np.searchsorted(np.asarray(edges), np.asarray(tokens), side="left").astype(np.int64)
