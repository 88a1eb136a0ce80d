"""Prompt token counting at the gateway, so oversized prompts get 413 before they are queued."""

from __future__ import annotations

import logging
from typing import Any

from services.common.settings import ModelSpec, Settings

log = logging.getLogger(__name__)

# Tokenize at most this many characters per allowed token: a prefix that is already too long
# proves the whole prompt is, without tokenizing a megabyte.
CHARS_PER_TOKEN_PROBE = 16


class TokenCounter:
    """Counts tokens with each model's fast tokenizer (the Rust `tokenizers`, no torch import)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tok: dict[str, Any] = {}

    def _tokenizer(self, spec: ModelSpec) -> Any | None:
        tok = self._tok.get(spec.name)
        if tok is not None:
            return tok
        from services.worker.catalog import tokenizer_file

        path = tokenizer_file(spec, self.settings.cache)
        if path is None:
            return None  # not converted yet; the worker still checks exactly
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        self._tok[spec.name] = tok
        return tok

    def count_at_least(self, spec: ModelSpec, texts: list[str], budget: int) -> int | None:
        """Tokens in texts (exact, or a lower bound once over budget); None when unknown or surely small."""
        # Byte-level BPE and WordPiece never make more tokens than UTF-8 bytes: small prompts fit for sure.
        if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= budget:
            return None
        tok = self._tokenizer(spec)
        if tok is None:
            return None
        total = 0
        limit = (budget + 1) * CHARS_PER_TOKEN_PROBE
        for text in texts:
            if len(text) > limit:
                n = len(tok.encode(text[:limit], add_special_tokens=False).ids)
                if total + n > budget:
                    return total + n
            n = len(tok.encode(text, add_special_tokens=False).ids)
            total += n
            if total > budget:
                return total
        return total
