"""The served LLM's own early layers as the length predictor's encoder.

A chat model half-way through reading a prompt already "knows" what kind of answer it is about to
give: the hidden state at the last prompt token (the one after `<|im_start|>assistant`) of layer ~16
of SmolLM2's 30 predicts answer length far better than a sentence encoder does (on AlpacaEval held-out
prompts: frozen + ridge, per-model Kendall tau 0.44 vs 0.33 for frozen MiniLM; TRAIL, Shahout et
al. 2025, probes intermediate layers of the served LLM the same way). The encoder is frozen: only the
head and the per-model table are trained, on features computed once. It costs 16 layers of a 135M
model per prompt, ~10x the MiniLM encoder on a CPU, and is cheap on a GPU.

The forward here is written for that cost, not taken from transformers' module tree: every layer
is needed (dropping layers 3 and 5, or 8 and 9, cost 0.06 and 0.16 validation tau), so the work
itself must shrink.
- Packed rows: the prompts of a batch are concatenated, so the matrix products see the sum of their
  lengths, not batch x longest (padding doubled the work of a typical batch of 8). Attention runs per
  prompt, against the chat template's prefix, whose keys and values are computed once.
- Fused weights: Q/K/V in one product, the RMSNorm scales folded into the next product's weights.
- On an x86 CPU in bfloat16, oneDNN products on weights packed once for the matrix units (AMX/AVX-512),
  with the gate's SiLU, the up-projection's product and both residual adds fused into them; otherwise
  plain F.linear (float32 training, other CPUs, GPUs).
- Row counts are rounded up to ROW_BUCKET, because oneDNN compiles a kernel per new shape (~1 ms each).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models import load_causal_lm

SMOLLM2_ENCODER = "smollm2"
# A placeholder the chat template wraps, to split the rendered prompt into prefix and suffix.
_PLACEHOLDER = "\u2063MUSERVE-PROMPT\u2063"
# Packed rows are padded to a multiple of this: a bounded set of shapes for oneDNN's kernel cache.
ROW_BUCKET = 16
# Causal masks kept per (queries, keys) shape.
_MASK_CACHE = 1024


@functools.cache
def _onednn_ok(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed-weight linear ops (with the fusions used here) work, and agree, for dtype."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 32, generator=g).to(dtype)
        w = torch.randn(16, 32, generator=g).to(dtype)
        packed = ops._reorder_linear_weight(w, ROW_BUCKET)
        silu = ops._linear_pointwise(x, packed, None, "swish", [], "")
        prod = ops._linear_pointwise.binary(x, silu, packed, None, "mul")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    ref = F.silu(F.linear(x, w)).float()
    return bool(torch.allclose(silu.float(), ref, rtol=0.05, atol=0.05)) and bool(
        torch.allclose(prod.float(), ref * F.linear(x, w).float(), rtol=0.05, atol=0.1)
    )


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its scale (folded into the next weights); the mean square in float32."""
    if x.requires_grad:  # autograd needs the norm unmodified: no in-place ops while training
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
        return x * torch.rsqrt(ms + eps).to(x.dtype)
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[-1])
    return x * torch.rsqrt(ms.add_(eps)).to(x.dtype)


# The fused weights of a block, each of which can carry a LoRA update.
WEIGHTS = ("qkv", "o", "gate", "up", "down")


class _Block(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """One decoder layer: fused weights (norm scales folded in), plain or oneDNN-packed products."""

    def __init__(self, layer: nn.Module, cfg: Any) -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.eps = float(cfg.rms_norm_eps)
        with torch.no_grad():
            n1 = layer.input_layernorm.weight.float()
            n2 = layer.post_attention_layernorm.weight.float()
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).float() * n1
            self.register_buffer("qkv", qkv)
            self.register_buffer("o", att.o_proj.weight.float().clone())
            self.register_buffer("gate", mlp.gate_proj.weight.float() * n2)
            self.register_buffer("up", mlp.up_proj.weight.float() * n2)
            self.register_buffer("down", mlp.down_proj.weight.float().clone())
        self._packed: tuple[torch.dtype, list[torch.Tensor]] | None = None
        self.lora_scale = 0.0

    @property
    def has_lora(self) -> bool:
        """True while LoRA updates are separate parameters (training); merge_lora folds them in."""
        return self.lora_scale > 0.0

    def add_lora(self, rank: int, alpha: float) -> None:
        """A trainable low-rank update B @ A on each fused weight (B starts at zero: same output)."""
        self.lora_scale = alpha / rank
        for name in WEIGHTS:
            w = getattr(self, name)
            a = nn.Parameter(torch.empty(rank, w.shape[1]))
            nn.init.kaiming_uniform_(a, a=5**0.5)
            self.register_parameter(f"lora_{name}_a", a)
            self.register_parameter(f"lora_{name}_b", nn.Parameter(torch.zeros(w.shape[0], rank)))

    def merge_lora(self) -> None:
        """Fold the LoRA updates into the weights (inference form: no extra cost) and drop them."""
        if not self.has_lora:
            return
        with torch.no_grad():
            for name in WEIGHTS:
                a, b = getattr(self, f"lora_{name}_a"), getattr(self, f"lora_{name}_b")
                getattr(self, name).add_((b.float() @ a.float()).mul_(self.lora_scale).to(a.dtype))
                delattr(self, f"lora_{name}_a")
                delattr(self, f"lora_{name}_b")
        self.lora_scale = 0.0
        self._packed = None

    def weight(self, name: str) -> torch.Tensor:
        """A fused weight with its LoRA update, if any."""
        w: torch.Tensor = getattr(self, name)
        if self.has_lora:
            w = w + (getattr(self, f"lora_{name}_b") @ getattr(self, f"lora_{name}_a")) * self.lora_scale
        return w

    def packed(self) -> list[torch.Tensor] | None:
        """The weights packed for oneDNN (made once per dtype), or None where plain products are used."""
        dtype = self.qkv.dtype
        if self.has_lora or self.qkv.device.type != "cpu" or dtype != torch.bfloat16 or not _onednn_ok(dtype):
            return None
        if self._packed is None or self._packed[0] != dtype:
            pack = torch.ops.mkldnn._reorder_linear_weight
            ws = [self.qkv, self.o, self.gate, self.up, self.down]
            self._packed = (dtype, [pack(w.contiguous(), 8 * ROW_BUCKET) for w in ws])
        return self._packed[1]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        segments: Sequence[tuple[int, int, bool]],
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: rows x hidden -> the layer's output and this call's (roped) keys and values."""
        rows, heads, kv, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        packed = self.packed()
        lp = torch.ops.mkldnn._linear_pointwise if packed else None  # absent from builds without oneDNN
        h = _rms(x, self.eps)
        if lp and packed:
            qkv = lp(h, packed[0], None, "none", [], "").view(rows, heads + 2 * kv, dim)
        else:
            qkv = F.linear(h, self.weight("qkv")).view(rows, heads + 2 * kv, dim)
        qk = qkv[:, : heads + kv]
        cos, sin = rope
        half = dim // 2
        qk = torch.addcmul(qk * cos, torch.cat([qk[..., half:], qk[..., :half]], -1), sin)
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv :]
        att = _attention(q, k, v, segments, prefix_kv)
        if lp is not None and packed:
            x = lp.binary(att, x, packed[1], None, "add")
            h = _rms(x, self.eps)
            act = lp.binary(h, lp(h, packed[2], None, "swish", [], ""), packed[3], None, "mul")
            x = lp.binary(act, x, packed[4], None, "add")
        else:
            x = x + F.linear(att, self.weight("o"))
            h = _rms(x, self.eps)
            gate, up = F.linear(h, self.weight("gate")), F.linear(h, self.weight("up"))
            x = x + F.linear(F.silu(gate) * up, self.weight("down"))
        return x, (k, v)


@functools.lru_cache(maxsize=_MASK_CACHE)
def _causal_mask(queries: int, keys: int) -> torch.Tensor:
    """Queries are the last `queries` of `keys` positions: each sees every key up to its own."""
    return torch.ones(queries, keys, dtype=torch.bool).tril_(keys - queries)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[tuple[int, int, bool]],
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Causal attention within each packed segment (after the shared prefix where it has one)."""
    rows, heads, dim = q.shape
    out = q.new_zeros(rows, heads * dim)  # rows of no segment (bucket padding) stay zero
    for start, end, shared in segments:
        keys, values = k[start:end], v[start:end]
        if shared and prefix_kv is not None:
            keys, values = torch.cat([prefix_kv[0], keys]), torch.cat([prefix_kv[1], values])
        n = end - start
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=None if len(keys) == n else _causal_mask(n, len(keys)),
            is_causal=len(keys) == n,
            enable_gqa=True,
        )
        out[start:end] = o[0].transpose(0, 1).reshape(n, heads * dim)
    return out


class LMLastTokenEncoder(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """The first layers of a Llama-family causal LM; returns the hidden state at each sequence's last token.

    Every prompt starts with the same chat-template prefix (SmolLM2: a 24-token system prompt, a third
    of a typical prompt): with set_prefix, its keys and values are computed once and every sequence
    that starts with it runs only the rest. The output is the last layer's raw residual stream (no
    final norm: that belongs to the dropped last layer).
    """

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        cfg = causal_lm.config
        act = getattr(cfg, "hidden_act", "silu")
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if cfg.model_type != "llama" or act != "silu" or getattr(cfg, "attention_bias", False):
            raise ValueError(f"LMLastTokenEncoder supports Llama-style models, not {cfg.model_type}/{act}")
        if rope_type != "default" or getattr(cfg, "mlp_bias", False):
            raise ValueError(f"LMLastTokenEncoder supports default RoPE without MLP bias, not {rope_type}")
        body = causal_lm.model
        self.config = body.config
        self.embed = body.embed_tokens
        self.register_buffer("inv_freq", body.rotary_emb.inv_freq.detach().float().clone())
        self.blocks = nn.ModuleList(_Block(layer, cfg) for layer in body.layers)
        self._prefix: list[int] = []
        self._prefix_kv: tuple[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the encoder computes in (its weights')."""
        return self.blocks[0].qkv.dtype if len(self.blocks) else self.embed.weight.dtype

    def set_prefix(self, prefix_ids: Sequence[int]) -> None:
        """Token ids most inputs start with; their keys and values are cached (lazily, per dtype)."""
        self._prefix = [int(t) for t in prefix_ids]
        self._prefix_kv = None

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (rows x 1 x head_dim): rotate_half(x) * sin == swap_halves(x) * sin'."""
        freqs = positions[:, None].float() * self.inv_freq
        sin = freqs.sin()
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)
        signed = torch.cat([-sin, sin], -1)
        return cos.to(self.dtype)[:, None], signed.to(self.dtype)[:, None]

    def _run(
        self,
        ids: list[int],
        positions: list[int],
        segments: list[tuple[int, int, bool]],
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The blocks over packed rows; returns the last hidden states of every row and each layer's k, v."""
        x = self.embed(torch.tensor(ids, dtype=torch.long)).to(self.dtype)
        rope = self._rope(torch.tensor(positions, dtype=torch.long))
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rope, segments, None if prefix_kv is None else prefix_kv[i])
            kvs.append(kv)
        return x, kvs

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA updates on every kept layer's weights (the rest of the encoder stays frozen)."""
        for block in self.blocks:
            block.add_lora(rank, alpha)
        self._prefix_kv = None

    def merge_lora(self) -> None:
        """Fold every layer's LoRA update into its weights (inference form)."""
        for block in self.blocks:
            block.merge_lora()
        self._prefix_kv = None

    def _prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self._prefix:
            return None
        # Weights change every training step: with LoRA updates the prefix is recomputed per call.
        tuning = any(block.has_lora for block in self.blocks)
        if tuning or self._prefix_kv is None or self._prefix_kv[0] != self.dtype:
            n = len(self._prefix)
            _, kvs = self._run(self._prefix, list(range(n)), [(0, n, False)], None)
            if tuning:
                return kvs
            self._prefix_kv = (self.dtype, [(k.clone(), v.clone()) for k, v in kvs])
        return self._prefix_kv[1]

    def encode(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token id sequences (each non-empty) -> (batch x hidden) at each one's last token."""
        n = len(self._prefix)
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int, bool]] = []
        for s in seqs:
            if not s:
                raise ValueError("LMLastTokenEncoder: empty token sequence")
            # A sequence that is the prefix and more runs only the rest, against the cached prefix.
            shared = n > 0 and len(s) > n and list(s[:n]) == self._prefix
            part = s[n:] if shared else s
            start = len(ids)
            ids.extend(int(t) for t in part)
            positions.extend(range(n if shared else 0, (n if shared else 0) + len(part)))
            segments.append((start, len(ids), shared))
        last = [end - 1 for _, end, _ in segments]
        pad = -len(ids) % ROW_BUCKET
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        prefix_kv = self._prefix_cache() if any(sh for _, _, sh in segments) else None
        hidden, _ = self._run(ids, positions, segments, prefix_kv)
        return hidden[torch.tensor(last, dtype=torch.long)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ids and mask -> (batch x hidden) at the last token where mask is 1."""
        lengths = attention_mask.sum(1).clamp_min(1).tolist()
        return self.encode([row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)])


def load_lm_encoder(model_dir: Path, layers: int) -> LMLastTokenEncoder:
    """The causal LM in model_dir cut to its first `layers` layers, float32, frozen, eval mode."""
    model, _ = load_causal_lm(model_dir, dtype="float32", num_hidden_layers=layers)
    enc = LMLastTokenEncoder(model)
    del model  # the encoder keeps the embedding and its own fused copies of the layers' weights
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
