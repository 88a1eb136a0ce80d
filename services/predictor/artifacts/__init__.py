"""Trained predictor artifacts shipped with muserve (weights that differ from the packaged encoder)."""

from __future__ import annotations

import json
from pathlib import Path

# The served LLM's own first 16 layers + head: the accurate one (~30-50 ms a prompt on 2 CPU cores).
DEFAULT_ARTIFACT_DIR = Path(__file__).resolve().parent / "default"
# LoRA-tuned 4-layer MiniLM + head: less accurate, ~3-4 ms a prompt (MUSERVE_PREDICTOR__ARTIFACT).
MINILM_ARTIFACT_DIR = Path(__file__).resolve().parent / "minilm"
# Used only if the shipped metadata cannot be read (a broken install): the reference p25/p50/p75/p99.
FALLBACK_EDGES_TOKENS = (42, 141, 294, 503)


def default_edges_tokens() -> list[int]:
    """Class edges of the shipped artifact, read from its metadata (no torch import)."""
    try:
        meta = json.loads((DEFAULT_ARTIFACT_DIR / "metadata.json").read_text())
        return [int(e) for e in meta["edges_tokens"]]
    except (OSError, ValueError, KeyError, TypeError):
        return list(FALLBACK_EDGES_TOKENS)
