"""Single-shot sentence embeddings (all-MiniLM-L6-v2 style: mean pooling + L2 normalisation)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from services.worker.models import resolve_dtype


class Embedder:
    """A BERT-style encoder turning texts into fixed-size vectors in one forward pass."""

    def __init__(
        self, path: Path, num_hidden_layers: int | None = None, dtype: str = "float32", batch_size: int = 32
    ) -> None:
        torch_dtype = resolve_dtype(dtype)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        overrides: dict[str, Any] = {}
        if num_hidden_layers is not None:
            if num_hidden_layers < 1:
                raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
            overrides["num_hidden_layers"] = num_hidden_layers
        # Truncating on purpose makes transformers print a long "UNEXPECTED keys" report: silence just that.
        report_logger = logging.getLogger("transformers.modeling_utils")
        old_level = report_logger.level
        if num_hidden_layers is not None:
            report_logger.setLevel(logging.ERROR)
        try:
            self.model: Any = AutoModel.from_pretrained(path, dtype=torch_dtype, **overrides).eval()
        finally:
            report_logger.setLevel(old_level)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.batch_size = batch_size
        limits = [
            getattr(self.model.config, "max_position_embeddings", None),
            self.tokenizer.model_max_length,
        ]
        self._max_tokens = min(int(x) for x in limits if x)

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens (special tokens included); longer texts are truncated."""
        return self._max_tokens

    @property
    def dim(self) -> int:
        """Embedding vector size."""
        return int(self.model.config.hidden_size)

    def embed(self, texts: list[str], normalize: bool = True) -> tuple[list[list[float]], list[int]]:
        """Embed texts: one vector per text, and its token count (after truncation, [CLS]/[SEP] included)."""
        with torch.inference_mode():
            return self._embed(texts, normalize)

    def _embed(self, texts: list[str], normalize: bool) -> tuple[list[list[float]], list[int]]:
        vectors: list[list[float]] = []
        counts: list[int] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            # Mean over real tokens only, exactly as sentence-transformers' Pooling(mean) does.
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = F.normalize(pooled, p=2, dim=1)
            vectors.extend(pooled.tolist())
            counts.extend(int(c) for c in batch["attention_mask"].sum(1).tolist())
        return vectors, counts
