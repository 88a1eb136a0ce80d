"""The served LLM's own early layers as the length predictor's encoder.

A chat model half-way through reading a prompt already "knows" what kind of answer it is about to
give: the hidden state at the last prompt token (the one after `<|im_start|>assistant`) of layer ~16
of SmolLM2's 30 predicts answer length far better than a sentence encoder does (on AlpacaEval held-out
prompts: frozen + ridge, per-model Kendall tau 0.44 vs 0.33 for frozen MiniLM; TRAIL, Shahout et
al. 2025, probes intermediate layers of the served LLM the same way). The encoder is frozen: only the
head and the per-model table are trained, on features computed once. It costs 16 layers of a 135M
model per prompt, ~10x the MiniLM encoder on a CPU, and is cheap on a GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from services.worker.models import load_causal_lm

SMOLLM2_ENCODER = "smollm2"
# A placeholder the chat template wraps, to split the rendered prompt into prefix and suffix.
_PLACEHOLDER = "\u2063MUSERVE-PROMPT\u2063"


class LMLastTokenEncoder(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """The first layers of a causal LM; returns the hidden state at each sequence's last real token.

    Every prompt starts with the same chat-template prefix (SmolLM2: a 24-token system prompt, a third
    of a typical prompt): with set_prefix, its keys and values are computed once and every batch that
    starts with it runs only the rest.
    """

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        body = causal_lm.model
        # Probe the layer's raw output, not the final RMSNorm meant for the (dropped) last layer.
        body.norm = nn.Identity()
        self.body = body
        self.config = body.config
        # transformers renamed past_key_values to cache (5.2x; the old name goes in 5.40).
        params = inspect.signature(body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefix = torch.zeros(0, dtype=torch.long)
        self._prefix_kv: tuple[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def set_prefix(self, prefix_ids: Sequence[int]) -> None:
        """Token ids most inputs start with; their keys and values are cached (lazily, per dtype)."""
        self._prefix = torch.tensor([int(t) for t in prefix_ids], dtype=torch.long)
        self._prefix_kv = None

    def _prefix_cache(self, batch: int) -> DynamicCache:
        dtype = self.body.embed_tokens.weight.dtype
        if self._prefix_kv is None or self._prefix_kv[0] != dtype:
            cache = DynamicCache(config=self.config)
            self.body(input_ids=self._prefix[None], use_cache=True, **{self._cache_kw: cache})
            self._prefix_kv = (dtype, [(layer.keys, layer.values) for layer in cache.layers])
        out = DynamicCache(config=self.config)
        for layer, (k, v) in zip(out.layers, self._prefix_kv[1], strict=True):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ids and mask -> (batch x hidden) at the last token where mask is 1."""
        n = len(self._prefix)
        last = (attention_mask.sum(1) - 1).clamp_min(0)
        shared = (
            n > 0
            and input_ids.shape[1] > n
            and bool((last >= n).all())
            and bool((input_ids[:, :n] == self._prefix).all())
        )
        if shared:
            with torch.no_grad():
                cache = self._prefix_cache(input_ids.shape[0])
            out = self.body(
                input_ids=input_ids[:, n:],
                attention_mask=attention_mask,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            last = last - n
        else:
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        return hidden[torch.arange(hidden.shape[0]), last]


def load_lm_encoder(model_dir: Path, layers: int) -> LMLastTokenEncoder:
    """The causal LM in model_dir cut to its first `layers` layers, float32, frozen, eval mode."""
    model, _ = load_causal_lm(model_dir, dtype="float32", num_hidden_layers=layers)
    model.lm_head = nn.Identity()  # never used: drop the (tied) vocabulary projection's reference
    enc = LMLastTokenEncoder(model)
    for p in enc.parameters():
        p.requires_grad_(False)
    enc.eval()
    return enc


def chat_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after a user message (as the worker renders it)."""
    cached = getattr(tokenizer, "_muserve_chat_frame", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    before, sep, after = str(text).partition(_PLACEHOLDER)
    if not sep:
        raise ValueError("the chat template dropped the user message")
    frame = (
        list(tokenizer(before, add_special_tokens=False)["input_ids"]),
        list(tokenizer(after, add_special_tokens=False)["input_ids"]),
    )
    tokenizer._muserve_chat_frame = frame
    return frame
