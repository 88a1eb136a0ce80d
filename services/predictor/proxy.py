"""Proxy output-length predictor: a truncated encoder, a prompt head and a per-model table.

The prompt goes through an encoder: the served LLM's own first layers (SmolLM2, frozen, read at the
last prompt token: services/predictor/lm_encoder.py; the shipped default), or the first `layers`
layers of the packaged all-MiniLM-L6-v2 (head + tail tokens, LoRA-tuned, merged at load, mean-pooled).
The pooled features map to a small prompt vector z. Each target LLM m has a vector u_m and an offset
b_m: the predicted log output length is z . u_m + b_m, calibrated per model on held-out prompts. The
class is the length class of that predicted length (the median of the predictive distribution, which
minimises the expected class distance); predicted_tokens is the model's typical length within that
class, updated online.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertModel

from services.common.schemas import Prediction, PredictItem
from services.predictor.artifacts import DEFAULT_ARTIFACT_DIR
from services.predictor.base import LengthPredictor, length_class
from services.predictor.fast_encoder import FastBertEncoder
from services.predictor.lm_encoder import (
    SMOLLM2_ENCODER,
    LMLastTokenEncoder,
    chat_frame,
    load_lm_encoder,
)
from services.worker.models import ensure_smollm2, minilm_path

ARTIFACT_FORMAT = 1
MINILM_ENCODER = "minilm"
ENCODERS = (MINILM_ENCODER, SMOLLM2_ENCODER)
DEFAULT_ARTIFACT = DEFAULT_ARTIFACT_DIR
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "proxy.safetensors"
UNKNOWN_MODEL = "<unknown>"
# Unknown model names remembered for fallback_models (bounded: names come from requests).
MAX_FALLBACK_NAMES = 1000
# Characters kept per token of the head/tail budget before tokenizing: WordPiece tokens of real text
# average ~4 characters, so this keeps every token the budget can use while bounding the tokenizer's
# work on megabyte inputs.
CHARS_PER_TOKEN = 16
# LoRA targets inside each kept BERT layer.
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

log = logging.getLogger("muserve.predictor.proxy")


@dataclass(frozen=True)
class NetConfig:
    """Shape of a ProxyNet (everything needed to rebuild it before loading weights)."""

    layers: int = 2
    # "minilm": the packaged sentence encoder, LoRA-tuned, mean-pooled; "smollm2": the served LLM's
    # first layers, frozen, read at the last prompt token (services/predictor/lm_encoder.py).
    encoder: str = MINILM_ENCODER
    head_tokens: int = 128
    tail_tokens: int = 126
    hidden: int = 128
    rank: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.1
    # Tune the encoder's kept layers with LoRA; None: the encoder's default (MiniLM tuned, an LM frozen,
    # as artifacts written before this field was added assume).
    tune: bool | None = None

    @property
    def tuned(self) -> bool:
        """True when the encoder's layers carry trained LoRA updates (features change while training)."""
        return self.encoder == MINILM_ENCODER if self.tune is None else self.tune

    @property
    def max_tokens(self) -> int:
        """Encoder input length including [CLS] and [SEP]."""
        return self.head_tokens + self.tail_tokens + 2


class LoRALinear(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """A frozen Linear plus a trainable low-rank update (B @ A), mergeable into one Linear."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank correction."""
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the update folded in (no extra cost at inference)."""
        out = nn.Linear(self.base.in_features, self.base.out_features)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            out.bias.copy_(self.base.bias)
        return out


def _get_module(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(_get_module(root, parent) if parent else root, leaf, new)


def load_encoder(encoder_dir: Path, layers: int) -> BertModel:
    """The packaged encoder cut to its first `layers` layers (weights read directly: no truncation report)."""
    config = AutoConfig.from_pretrained(encoder_dir)
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"layers must be in 1..{config.num_hidden_layers}, got {layers}")
    config.num_hidden_layers = layers
    model = BertModel(config, add_pooling_layer=False)
    state = load_file(str(encoder_dir / "model.safetensors"))
    keep = {
        k: v
        for k, v in state.items()
        if not k.startswith("pooler.")
        and k != "embeddings.position_ids"
        and not (k.startswith("encoder.layer.") and int(k.split(".")[2]) >= layers)
    }
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"encoder weights do not match: missing {missing}, unexpected {unexpected}")
    return model.eval()


class ProxyNet(nn.Module):  # type: ignore[misc]  # torch is Any to mypy here
    """Encoder -> pooled features -> MLP -> prompt vector z; log-length of model m = z . u_m + b_m."""

    def __init__(self, encoder: nn.Module, cfg: NetConfig, n_models: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        dim = int(encoder.config.hidden_size)
        # An LM's features are standardised (statistics of the training prompts through the untuned
        # encoder, saved with the head); MiniLM learns its own scale. Only a frozen encoder's features
        # can be computed once for all epochs.
        self.lm = cfg.encoder != MINILM_ENCODER
        self.frozen = not cfg.tuned
        self.register_buffer("feat_mu", torch.zeros(dim))
        self.register_buffer("feat_sd", torch.ones(dim))
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(dim, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.rank),
        )
        self.model_u = nn.Parameter(torch.full((n_models, cfg.rank), 1.0 / math.sqrt(cfg.rank)))
        self.model_b = nn.Parameter(torch.zeros(n_models))

    def add_lora(self) -> None:
        """Freeze the encoder and add LoRA adapters to its kept layers (a tuned encoder only)."""
        if self.frozen:
            return
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        if isinstance(self.encoder, LMLastTokenEncoder):
            self.encoder.add_lora(self.cfg.lora_rank, self.cfg.lora_alpha)
            return
        for i in range(self.cfg.layers):
            for target in LORA_TARGETS:
                name = f"encoder.layer.{i}.{target}"
                base = _get_module(self.encoder, name)
                assert isinstance(base, nn.Linear)
                _set_module(self.encoder, name, LoRALinear(base, self.cfg.lora_rank, self.cfg.lora_alpha))

    def merge_lora(self) -> None:
        """Fold every LoRA adapter into its Linear (inference form)."""
        if isinstance(self.encoder, LMLastTokenEncoder):
            self.encoder.merge_lora()
            return
        for name, mod in list(self.encoder.named_modules()):
            if isinstance(mod, LoRALinear):
                _set_module(self.encoder, name, mod.merged())

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output of a batch of encoded prompts (batch x hidden)."""
        if isinstance(self.encoder, LMLastTokenEncoder | FastBertEncoder):
            hidden = self.encoder(input_ids, attention_mask)
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.lm:
            return hidden  # already read at each prompt's last token
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def from_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """z from pooled features (batch x rank)."""
        out: torch.Tensor = self.head((pooled.float() - self.feat_mu) / self.feat_sd)
        return out

    def prompt_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """z for a batch of encoded prompts (batch x rank)."""
        return self.from_features(self.features(input_ids, attention_mask))

    def sequence_vectors(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """z for token id sequences of any lengths (batch x rank), in as few encoder calls as padding allows.

        An LM encoder packs them all into one call (no padding); otherwise prompts of similar length
        share a padded call.
        """
        if isinstance(self.encoder, LMLastTokenEncoder):
            return self.from_features(self.encoder.encode(seqs))
        z = torch.empty(len(seqs), self.cfg.rank)
        for group in length_groups([len(s) for s in seqs]):
            ids, mask = pad_sequences([seqs[i] for i in group])
            z[torch.tensor(group)] = self.prompt_vectors(ids, mask)
        return z

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predicted log-length of every prompt for every model (batch x models)."""
        return self.table(self.prompt_vectors(input_ids, attention_mask))

    def table(self, z: torch.Tensor) -> torch.Tensor:
        """Log-lengths of prompt vectors z for every model (batch x models)."""
        out: torch.Tensor = z @ self.model_u.t() + self.model_b
        return out


def cut_text(text: str, head_chars: int, tail_chars: int) -> str:
    """Keep the head and tail characters of a long text, so tokenizing it costs O(head + tail)."""
    if len(text) <= head_chars + tail_chars:
        return text
    return text[:head_chars] + " ... " + text[len(text) - tail_chars :]


def token_sequences(tokenizer: Any, texts: Sequence[str], cfg: NetConfig) -> list[list[int]]:
    """[CLS] head tokens + tail tokens [SEP] of each text (characters are cut first, so any size is cheap).

    For an LM encoder the frame is the chat template instead: exactly the ids the worker feeds the model.
    """
    cut = [cut_text(t, cfg.head_tokens * CHARS_PER_TOKEN, cfg.tail_tokens * CHARS_PER_TOKEN) for t in texts]
    if cfg.encoder == MINILM_ENCODER:
        before, after = [int(tokenizer.cls_token_id)], [int(tokenizer.sep_token_id)]
    else:
        before, after = chat_frame(tokenizer)
    ids = tokenizer(cut, add_special_tokens=False, truncation=False)["input_ids"] if cut else []
    budget = cfg.head_tokens + cfg.tail_tokens
    return [
        [*before, *(x if len(x) <= budget else x[: cfg.head_tokens] + x[len(x) - cfg.tail_tokens :]), *after]
        for x in ids
    ]


def pad_sequences(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, right-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([[*s, *([0] * (width - len(s)))] for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return input_ids, mask


def encode_texts(tokenizer: Any, texts: Sequence[str], cfg: NetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids and attention mask of texts (head + tail tokens)."""
    return pad_sequences(token_sequences(tokenizer, texts, cfg))


def length_groups(lengths: Sequence[int], pad_budget: int = 24) -> list[list[int]]:
    """Indices grouped by similar length, so a batch with one long prompt does not pad every short one.

    Sorted by length, an item starts a new group when padding the group up to it would add more than
    pad_budget tokens: padding costs encoder work, a group costs one forward call.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    width = 0
    for i in order:
        if groups and len(groups[-1]) * (lengths[i] - width) <= pad_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
        width = lengths[i]
    return groups


def load_tokenizer(encoder_dir: Path) -> Any:
    """The encoder's fast tokenizer, with the length warning off (we cut head + tail ourselves)."""
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    tok.model_max_length = 1 << 30
    return tok


def share_prefix(net: ProxyNet, tokenizer: Any) -> None:
    """Let an LM encoder cache the chat template's prefix, which every prompt starts with."""
    if isinstance(net.encoder, LMLastTokenEncoder):
        net.encoder.set_prefix(chat_frame(tokenizer)[0])


def trainable_state(net: ProxyNet) -> dict[str, torch.Tensor]:
    """The weights an artifact stores: head, model table, LoRA adapters, feature statistics."""
    state = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}
    if net.lm:
        state.update(feat_mu=net.feat_mu.detach().clone(), feat_sd=net.feat_sd.detach().clone())
    return state


def save_artifact(out_dir: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write weights (fp16 for the encoder's adapters, fp32 for the small head) and metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.half() if k.startswith("encoder.") else v.float()).contiguous() for k, v in state.items()
    }
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": str(ARTIFACT_FORMAT)})
    with open(out_dir / METADATA_FILE, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=1, sort_keys=True)
        f.write("\n")
    (out_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; the file ships in the package


def quantize_int8(module: nn.Module) -> nn.Module:
    """int8 dynamic quantization of every Linear (weights int8, activations quantized on the fly)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch marks quantized tensors as deprecated; they work in every torch muserve admits (< 2.15).
        warnings.simplefilter("ignore")
        out: nn.Module = quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
    return out


def native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): Linux' CPU flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_encoder_dir(encoder: str, cache_dir: Path | None = None) -> Path:
    """Where an encoder's weights live: the MiniLM package, or the converted SmolLM2 in the model cache."""
    if encoder == MINILM_ENCODER:
        return minilm_path()
    if encoder == SMOLLM2_ENCODER:
        if cache_dir is None:
            from services.common.settings import Settings

            cache_dir = Settings().cache  # MUSERVE_CACHE, as the worker resolves it
        return ensure_smollm2(cache_dir, log=log.info)
    raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODERS}")


def build_net(cfg: NetConfig, n_models: int, encoder_dir: Path | None = None) -> ProxyNet:
    """A fresh ProxyNet on the packaged encoder, with LoRA adapters ready for training (MiniLM)."""
    folder = encoder_dir or default_encoder_dir(cfg.encoder)
    if cfg.encoder == MINILM_ENCODER:
        encoder: nn.Module = load_encoder(folder, cfg.layers)
    elif cfg.encoder == SMOLLM2_ENCODER:
        encoder = load_lm_encoder(folder, cfg.layers)
    else:
        raise ValueError(f"unknown encoder {cfg.encoder!r}; expected one of {ENCODERS}")
    net = ProxyNet(encoder, cfg, n_models)
    net.add_lora()
    return net


class ProxyLengthPredictor(LengthPredictor):
    """Predicts each request's output length class and tokens from its prompt text and target model."""

    name = "proxy-minilm"

    def __init__(
        self,
        net: ProxyNet,
        tokenizer: Any,
        metadata: Mapping[str, Any],
        *,
        threads: int | None = None,
        window: int = 200,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.net = net.eval()
        self.name = str(metadata.get("name", self.name))
        share_prefix(net, tokenizer)
        self.int8 = False  # set by load() when the encoder was quantized
        self.tokenizer = tokenizer
        self.metadata = dict(metadata)
        self.version = str(metadata["version"])
        self.edges_tokens: list[int] = [int(e) for e in metadata["edges_tokens"]]
        self.models: list[str] = list(metadata["models"])
        self._col = {m: i for i, m in enumerate(self.models)}
        with torch.no_grad():
            # An unknown model gets the average model: mean vector and offset.
            self._u = torch.cat([net.model_u, net.model_u.mean(0, keepdim=True)]).detach()
            self._b = torch.cat([net.model_b, net.model_b.mean().reshape(1)]).detach()
        priors: Mapping[str, Sequence[float]] = metadata["class_tokens"]
        self._prior_tokens = {m: [float(x) for x in v] for m, v in priors.items()}
        self._window = window
        self._seen: dict[tuple[str, int], deque[int]] = {}
        self._tokens_cache: dict[tuple[str, int], float] = {}
        self._fallback: set[str] = set()
        # observe() runs on the event loop while predict() may run in a worker thread.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        artifact_dir: Path | None = None,
        *,
        threads: int | None = None,
        encoder_dir: Path | None = None,
        cache_dir: Path | None = None,
        quantize: bool | None = None,
    ) -> ProxyLengthPredictor:
        """Load an artifact (default: the one shipped in the package) onto the packaged encoder.

        quantize: int8 dynamic quantization of the encoder's linear layers (about 2x faster than
        float32 on CPU; MiniLM only); None = what the artifact's metadata says (evaluated that way): the
        dtype it names, except that a MiniLM artifact in bfloat16 runs int8 on a CPU without bfloat16
        units (native_bf16()). cache_dir: muserve's model
        cache, where an LM encoder (SmolLM2) is converted once.
        """
        folder = Path(artifact_dir) if artifact_dir is not None else DEFAULT_ARTIFACT
        meta_path, weights_path = folder / METADATA_FILE, folder / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"no proxy predictor artifact in {folder} (need {METADATA_FILE} and {WEIGHTS_FILE}); "
                "train one with services.predictor.train.train(data_dir, out_dir)"
            )
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if int(meta.get("format", -1)) != ARTIFACT_FORMAT:
            raise ValueError(f"{folder}: artifact format {meta.get('format')} != {ARTIFACT_FORMAT}")
        cfg = NetConfig(**meta["net"])
        enc_dir = encoder_dir or default_encoder_dir(cfg.encoder, cache_dir)
        net = build_net(cfg, len(meta["models"]), enc_dir)
        state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
        missing = set(trainable_state(net)) - set(state)
        if missing:
            raise ValueError(f"{folder}: artifact lacks weights {sorted(missing)[:5]}")
        net.load_state_dict(state, strict=False)
        net.merge_lora()
        if not net.lm:
            # Same weights, leaner forward (3x less per-call overhead at serving sizes).
            net.encoder = FastBertEncoder(net.encoder)
        inference = meta.get("inference", {})
        int8 = quantize if quantize is not None else bool(inference.get("int8", False))
        if quantize is None and inference.get("dtype") == "bfloat16" and not net.lm and not native_bf16():
            # Without bfloat16 units the CPU emulates it, far slower than int8 (which costs ~0.02 accuracy).
            int8 = True
        if int8 and net.lm:
            # Per-tensor activation quantization clips an LLM's outlier features: measured, the
            # validation tau of the SmolLM2 encoder fell from 0.54 to 0.16.
            raise ValueError("int8 dynamic quantization ruins an LM encoder's features; serve it in bfloat16")
        if int8:
            net.encoder = quantize_int8(net.encoder)
        elif inference.get("dtype") == "bfloat16":
            net.encoder.to(torch.bfloat16)  # the head stays float32: features are upcast on the way in
        out = cls(net, load_tokenizer(enc_dir), meta, threads=threads)
        out.int8 = int8
        return out

    @property
    def fallback_models(self) -> frozenset[str]:
        """Models asked about that the artifact was not trained for (they get the average model)."""
        return frozenset(self._fallback)

    def knows(self, model: str) -> bool:
        """True when the artifact has a learned embedding for this model."""
        return model in self._col

    def column(self, model: str) -> int:
        """The model's column in log_tokens_matrix (the last, average-model one for an unknown model)."""
        return self._col.get(model, len(self.models))

    def log_tokens(self, items: Sequence[PredictItem]) -> torch.Tensor:
        """Predicted log output length per item (the ranking score)."""
        if not items:
            return torch.zeros(0)
        cols = []
        for it in items:
            col = self._col.get(it.model)
            if col is None:
                if len(self._fallback) < MAX_FALLBACK_NAMES:
                    self._fallback.add(it.model)
                col = len(self.models)
            cols.append(col)
        idx = torch.tensor(cols, dtype=torch.long)
        seqs = token_sequences(self.tokenizer, [it.text for it in items], self.net.cfg)
        with torch.inference_mode():
            z = self.net.sequence_vectors(seqs)
            return (z * self._u[idx]).sum(-1) + self._b[idx]

    def log_tokens_matrix(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Predicted log output length of each text for each model, unknown model last (texts x models+1)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                seqs = token_sequences(self.tokenizer, texts[start : start + batch_size], self.net.cfg)
                out.append(self.net.sequence_vectors(seqs) @ self._u.t() + self._b)
        return torch.cat(out) if out else torch.zeros(0, len(self.models) + 1)

    def class_tokens(self, model: str, cls: int) -> float:
        """Expected tokens of a model's answers in a class: observed sliding median, else the artifact's."""
        key = (model, cls)
        with self._lock:
            cached = self._tokens_cache.get(key)
            if cached is not None:
                return cached
            seen = self._seen.get(key)
            if seen:
                value = float(statistics.median(seen))
            else:
                prior = self._prior_tokens.get(model) or self._prior_tokens[UNKNOWN_MODEL]
                value = prior[cls]
            self._tokens_cache[key] = value
            return value

    def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """One prediction per item: one tokenizer call, one forward pass per group of similar lengths."""
        if not items:
            return []
        logs = self.log_tokens(items).tolist()
        out = []
        for it, lg in zip(items, logs, strict=True):
            cls = length_class(math.exp(lg), self.edges_tokens)
            out.append(
                Prediction(
                    length_class=cls,
                    predicted_tokens=self.class_tokens(it.model, cls),
                    predictor=self.ident,
                    score_tokens=round(math.exp(lg), 1),
                )
            )
        return out

    def observe(self, model: str, completion_tokens: int, prediction: Prediction | None = None) -> None:
        """Add a finished answer's true length to its model's sliding median for the class it fell in.

        Keyed by the true class (not the predicted one), so predicted_tokens always lies inside the
        predicted class and orders like it; prediction is accepted for the interface.
        """
        if completion_tokens <= 0:
            return
        cls = length_class(completion_tokens, self.edges_tokens)
        with self._lock:
            self._seen.setdefault((model, cls), deque(maxlen=self._window)).append(completion_tokens)
            self._tokens_cache.pop((model, cls), None)
