"""Continuous batching for a HF causal LM over one left-padded DynamicCache (pure, synchronous, no I/O).

Every running row keeps its real tokens contiguous at the right end of the shared cache. A newcomer is
prefilled alone (batch 1, which also yields its first token) and its KV is left-padded and concatenated
into the batch cache; every decode step passes an attention mask (0 on pads) and per-row position ids,
so each row computes exactly what it would compute alone. Finished rows leave between decode steps.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (validated on construction)."""

    max_tokens: int = 16  # >= 1
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0  # (0, 1]
    stop: tuple[str, ...] = ()  # stop strings; not included in output
    seed: int | None = None  # per-request torch.Generator when set
    ignore_eos: bool = False  # when True generate exactly max_tokens tokens (trace replay)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # A bare string would otherwise be split into one-character stop strings.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


@dataclass
class SeqRequest:
    """One generation request: already-tokenized prompt plus sampling parameters."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one request; the last event of a request has finished=True."""

    request_id: str
    token_ids: list[int]  # tokens produced this step for this request (usually 1)
    text: str  # new text made safe to emit this step (may be "" while holding back)
    finished: bool
    finish_reason: str | None  # "stop" (eos or stop string) | "length" | "abort" | "error" | None
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    error: str | None = None  # set only with finish_reason == "error"


@dataclass(frozen=True)
class StepStats:
    """Timing and shape of one forward pass (one prefill of one sequence, or one batched decode)."""

    kind: str  # "prefill" | "decode"
    batch_size: int  # sequences in this forward pass
    num_tokens: int  # tokens processed by this forward pass
    latency_ms: float  # wall time of the forward + sampling (+ cache merge for a prefill)
    context_tokens: int  # sum over rows of real context length
    request_ids: tuple[str, ...]


@dataclass(eq=False)
class _Seq:
    """Mutable engine-side state of one request."""

    req: SeqRequest
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    ctx_len: int = 0  # real tokens of this row held in the KV cache
    emitted: int = 0  # characters of decoded output already emitted
    finish_reason: str | None = None
    error: str | None = None
    step_tokens: list[int] = field(default_factory=list)
    step_text: list[str] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.req.request_id


def default_eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the tokenizer, the generation config and `<|im_end|>` when the vocab has it."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple | set):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(tokenizer, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(getattr(gen_cfg, "eos_token_id", None))
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    add(im_end)
    return ids


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad a [batch, heads, seq, dim] KV tensor by n positions at the front of the seq axis."""
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


def _held_back_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ContinuousBatchingEngine:
    """Greedy/top-p generation for many sequences that join and leave a shared batch between steps.

    add() and abort() may be called from another thread while step() runs (they only touch queues under
    a lock; cache surgery happens inside step()); step() itself must not run concurrently with itself.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_seqs: int = 8,
        max_context_tokens: int | None = None,
        eos_token_ids: set[int] | None = None,
        seed: int | None = None,
    ) -> None:
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seqs = max_seqs
        context = max_context_tokens or getattr(model.config, "max_position_embeddings", None)
        if not context or context < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {context!r}")
        self.max_context_tokens: int = int(context)
        self.vocab_size: int = int(model.config.vocab_size)
        self.eos_token_ids: frozenset[int] = frozenset(
            default_eos_token_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids
        )
        # Cache surgery below assumes plain full-attention layers (no sliding window / static cache).
        probe = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise ValueError("ContinuousBatchingEngine needs a model whose DynamicCache uses DynamicLayer")
        self._device = getattr(model, "device", torch.device("cpu"))
        self._generator = torch.Generator(device="cpu")
        if seed is None:
            self._generator.seed()  # fresh generators share a fixed default seed otherwise
        else:
            self._generator.manual_seed(seed)
        self._lock = threading.Lock()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # row i of the cache belongs to _running[i]
        self._live: dict[str, _Seq] = {}  # waiting + running, by request id
        self._abort_running: set[str] = set()  # aborted while running: removed at the next step()
        self._pending_events: list[TokenEvent] = []  # abort events of requests that were still waiting
        self._cache: DynamicCache | None = None

    # ------------------------------------------------------------------ public API

    @property
    def num_running(self) -> int:
        """Sequences in the running batch (not counting ones already aborted)."""
        return max(0, len(self._running) - len(self._abort_running))

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        """How many more requests fit without queueing: max_seqs - running - waiting, never below 0."""
        return max(0, self.max_seqs - self.num_running - self.num_waiting)

    @property
    def has_work(self) -> bool:
        """True while step() has something to do (sequences to run or events to deliver)."""
        return bool(self._running or self._waiting or self._pending_events or self._abort_running)

    def add(self, req: SeqRequest) -> None:
        """Validate a request and queue it for admission at the next step()."""
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError(f"request {req.request_id!r}: prompt_ids is empty")
        if not all(isinstance(t, numbers.Integral) for t in req.prompt_ids):
            raise ValueError(f"request {req.request_id!r}: prompt_ids must be integers")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.vocab_size:
            raise ValueError(f"request {req.request_id!r}: prompt_ids must be in [0, {self.vocab_size})")
        if n + req.params.max_tokens > self.max_context_tokens:
            raise ValueError(
                f"request {req.request_id!r}: prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) "
                f"exceeds the context window of {self.max_context_tokens} tokens"
            )
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(req.params.seed)
        seq = _Seq(req=req, generator=gen)
        with self._lock:
            if req.request_id in self._live:
                raise ValueError(f"request {req.request_id!r} is already in the engine")
            self._live[req.request_id] = seq
            self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting or running request; its final "abort" event comes from the next step()."""
        with self._lock:
            seq = self._live.get(request_id)
            if seq is None or request_id in self._abort_running:
                return False
            if seq in self._waiting:
                self._waiting.remove(seq)
                del self._live[request_id]
                seq.finish_reason = FINISH_ABORT
                self._pending_events.append(self._event(seq))
            else:
                self._abort_running.add(request_id)
            return True

    def step(self) -> tuple[list[TokenEvent], list[StepStats]]:
        """Admit waiting sequences (prefill each) or, with none to admit, decode every running row once."""
        with torch.inference_mode():
            return self._step()

    def _step(self) -> tuple[list[TokenEvent], list[StepStats]]:
        stats: list[StepStats] = []
        touched: dict[str, _Seq] = {}
        with self._lock:
            events = self._pending_events
            self._pending_events = []
            aborted = self._abort_running
            self._abort_running = set()
        if aborted:
            gone = [s for s in self._running if s.request_id in aborted]
            for s in gone:
                s.finish_reason = FINISH_ABORT
                touched[s.request_id] = s
            self._drop_finished()
        prefilled = False
        while len(self._running) < self.max_seqs:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            touched[seq.request_id] = seq
            prefilled = True
            st = self._prefill(seq)
            if st is not None:
                stats.append(st)
        # A step either prefills newcomers or decodes: first tokens go out right after their prefill
        # (TTFT = queue + prefill), and the next step decodes old and new rows together.
        if self._running and not prefilled:
            for s in self._running:
                touched[s.request_id] = s
            stats.append(self._decode())
        for s in touched.values():
            if s.step_tokens or s.step_text or s.finish_reason is not None:
                events.append(self._event(s))
        with self._lock:
            for s in touched.values():
                if s.finish_reason is not None:
                    self._live.pop(s.request_id, None)
                    self._abort_running.discard(s.request_id)  # finished before its abort took effect
        return events, stats

    # ------------------------------------------------------------------ forward passes

    def _prefill(self, seq: _Seq) -> StepStats | None:
        """Run the prompt alone, sample its first token and splice its KV into the batch cache."""
        prompt = seq.req.prompt_ids
        t0 = time.perf_counter()
        try:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prompt], dtype=torch.long, device=self._device)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = self._sample(out.logits[:, -1, :], [seq])[0]
            seq.ctx_len = len(prompt)
            self._on_token(seq, token)
            if seq.finish_reason is None:
                self._merge(cache, seq)
        except Exception as exc:  # one bad request must not take the batch down; the cache is untouched
            seq.finish_reason = FINISH_ERROR
            seq.error = f"prefill failed: {type(exc).__name__}: {exc}"
            return None
        latency = (time.perf_counter() - t0) * 1e3
        return StepStats("prefill", 1, len(prompt), latency, len(prompt), (seq.request_id,))

    def _merge(self, new: DynamicCache, seq: _Seq) -> None:
        """Append a batch-1 cache as a new row, left-padding whichever side is shorter."""
        if self._cache is None or not self._running:
            self._cache, self._running = new, [seq]
            return
        width, n = self._width(), seq.ctx_len
        target = max(width, n)
        keys, values = [], []
        for a, b in zip(self._cache.layers, new.layers, strict=True):
            keys.append(torch.cat([_left_pad(a.keys, target - width), _left_pad(b.keys, target - n)], 0))
            values.append(
                torch.cat([_left_pad(a.values, target - width), _left_pad(b.values, target - n)], 0)
            )
        # Assign only once everything is built so a failure above leaves the cache consistent.
        for layer, k, v in zip(self._cache.layers, keys, values, strict=True):
            layer.keys, layer.values = k, v
        self._running.append(seq)

    def _decode(self) -> StepStats:
        """One token for every running row, then drop finished rows."""
        rows = self._running
        assert self._cache is not None
        width = self._width()
        t0 = time.perf_counter()
        try:
            lens = torch.tensor([s.ctx_len for s in rows], dtype=torch.long)
            # Row r's real tokens occupy the last lens[r] cache columns, plus the new token's column.
            mask = (torch.arange(width + 1)[None, :] >= (width - lens)[:, None]).long()
            inputs = torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long)
            out = self.model(
                input_ids=inputs.to(self._device),
                attention_mask=mask.to(self._device),
                position_ids=lens[:, None].to(self._device),
                past_key_values=self._cache,
                use_cache=True,
            )
            tokens = self._sample(out.logits[:, -1, :], rows)
        except Exception as exc:  # the cache may be half-updated: fail every row and start clean
            for s in rows:
                s.finish_reason = FINISH_ERROR
                s.error = f"decode failed: {type(exc).__name__}: {exc}"
            self._running, self._cache = [], None
            return StepStats("decode", len(rows), len(rows), (time.perf_counter() - t0) * 1e3, 0, ())
        latency = (time.perf_counter() - t0) * 1e3
        context = int(lens.sum()) + len(rows)
        ids = tuple(s.request_id for s in rows)
        for s, tok in zip(rows, tokens, strict=True):
            s.ctx_len += 1
            self._on_token(s, tok)
        self._drop_finished()
        return StepStats("decode", len(rows), len(rows), latency, context, ids)

    def _drop_finished(self) -> None:
        """Remove finished rows from the batch cache and trim leading all-pad columns."""
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep or self._cache is None:
            self._running, self._cache = [], None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._device)
        trim = self._width() - max(s.ctx_len for s in self._running)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]

    def _width(self) -> int:
        """Current cache length (columns, pads included)."""
        assert self._cache is not None
        return int(self._cache.layers[0].keys.shape[-2])

    # ------------------------------------------------------------------ sampling and text

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """One token per row: argmax at temperature 0, else temperature + top-p with the row's generator."""
        logits = logits.float()
        chosen = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if s.req.params.temperature > 0.0]
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
            temps = torch.tensor([seqs[i].req.params.temperature for i in rows], device=logits.device)
            top_p = torch.tensor([seqs[i].req.params.top_p for i in rows], device=logits.device)
            probs = torch.softmax(logits.index_select(0, idx) / temps[:, None], dim=-1)
            sorted_p, sorted_ix = probs.sort(dim=-1, descending=True)
            # Nucleus: drop tokens whose preceding mass already reaches top_p (the top token always stays).
            sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p[:, None], 0.0)
            cdf = sorted_p.cumsum(-1)
            # One uniform per row from that row's own generator: a seeded request samples the same
            # tokens alone or in any batch. Inverse-CDF keeps the rest vectorised.
            u = torch.stack(
                [torch.rand((), generator=seqs[i].generator or self._generator) for i in rows]
            ).to(logits.device)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            last_nonzero = (sorted_p > 0).sum(-1, keepdim=True) - 1  # guards against rounding past the end
            pick = torch.minimum(pick, last_nonzero)
            chosen[idx] = sorted_ix.gather(1, pick).squeeze(1)
        return [int(t) for t in chosen.tolist()]

    def _on_token(self, seq: _Seq, token: int) -> None:
        """Record a generated token, decide whether the sequence is finished and update its text."""
        seq.output_ids.append(token)
        seq.step_tokens.append(token)
        p = seq.req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = FINISH_STOP
        elif len(seq.output_ids) >= p.max_tokens:
            seq.finish_reason = FINISH_LENGTH
        self._update_text(seq)

    def _update_text(self, seq: _Seq) -> None:
        """Emit the newly decoded text that can no longer change or turn into a stop string."""
        # Re-decoding the whole output keeps deltas exactly consistent with the final decode; it costs
        # ~0.2 ms per 1000 tokens, negligible next to a forward pass on CPU.
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        stops = seq.req.params.stop
        if stops:
            # Emitted text never ends with a stop-string prefix, so a match cannot start before it.
            hits = [i for i in (text.find(s, seq.emitted) for s in stops) if i >= 0]
            if hits:
                text = text[: min(hits)]
                seq.finish_reason = FINISH_STOP
        if seq.finish_reason is None:
            # An incomplete UTF-8 character decodes to U+FFFD until its last byte arrives.
            safe = len(text.rstrip("\ufffd"))
            safe -= _held_back_stop_prefix(text[:safe], stops)
        else:
            safe = len(text)
        if safe > seq.emitted:
            seq.step_text.append(text[seq.emitted : safe])
            seq.emitted = safe

    def _event(self, seq: _Seq) -> TokenEvent:
        """Build this step's event for seq and reset its per-step buffers."""
        ev = TokenEvent(
            request_id=seq.request_id,
            token_ids=seq.step_tokens,
            text="".join(seq.step_text),
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.req.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            error=seq.error,
        )
        seq.step_tokens, seq.step_text = [], []
        return ev
