"""A lean inference-only BERT encoder: the same weights as HF's BertModel, a fraction of its per-call cost.

At the predictor's sizes (4 layers, hidden 384, a few dozen tokens) HF's module tree costs more in
Python dispatch than the matrix products do. This forward fuses Q/K/V into one Linear, uses torch's
scaled-dot-product attention and skips every option serving never needs (no dropout, no caches, no
cross-attention, no outputs but the last hidden state). It stays an nn.Module of nn.Linear layers, so
int8 dynamic quantization applies unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel


class _Layer(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """One BERT layer: fused QKV attention and the feed-forward block, post-LayerNorm."""

    def __init__(self, hf_layer: nn.Module, heads: int, eps: float) -> None:
        super().__init__()
        att = hf_layer.attention
        q, k, v = att.self.query, att.self.key, att.self.value
        dim = q.in_features
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.out = att.output.dense
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.ln1.load_state_dict(att.output.LayerNorm.state_dict())
        self.up = hf_layer.intermediate.dense
        self.down = hf_layer.output.dense
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.ln2.load_state_dict(hf_layer.output.LayerNorm.state_dict())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: batch x tokens x dim; mask: batch x 1 x 1 x tokens (True = attend) or None."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        x = self.ln1(x + self.out(att.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class FastBertEncoder(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """BertModel's last hidden state, for inference only (built from a loaded, LoRA-merged BertModel)."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        cfg = bert.config
        if cfg.hidden_act != "gelu" or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("FastBertEncoder supports absolute positions and exact GELU only")
        emb = bert.embeddings
        self.word = emb.word_embeddings
        self.position = emb.position_embeddings
        # Serving always uses token type 0: fold its embedding into a constant.
        self.register_buffer("type0", emb.token_type_embeddings.weight[0].detach().clone())
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ln.load_state_dict(emb.LayerNorm.state_dict())
        self.layers = nn.ModuleList(
            _Layer(layer, cfg.num_attention_heads, cfg.layer_norm_eps) for layer in bert.encoder.layer
        )
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state (batch x tokens x hidden) of right-padded ids."""
        t = input_ids.shape[1]
        x = self.ln(self.word(input_ids) + self.position.weight[:t] + self.type0)
        # Without padding no mask is needed (the common single-request case, and faster).
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x
