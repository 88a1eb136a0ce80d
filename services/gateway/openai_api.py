"""OpenAI request bodies (what we accept) and response builders (what we return)."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.schemas import MAX_EMBED_INPUTS, MAX_STOP_STRINGS, ChatMessage, ErrorInfo, Usage


class StreamOptions(BaseModel):
    """OpenAI's stream_options."""

    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI parameters are ignored (clients send e.g. `user`), unsupported values are refused.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Literal[False] | None = Field(default=None, description="logprobs are not supported")
    # muserve extensions
    ignore_eos: bool = False
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    timeout_s: float | None = Field(default=None, gt=0.0, description="deadline (capped by the gateway's)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        """Stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_Common):
    """POST /v1/completions."""

    prompt: str | list[str]
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt string is supported per request")
        return v

    def prompt_text(self) -> str:
        """The single prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    """A text content part of a chat message."""

    type: Literal["text"]
    text: str


class ChatTurn(BaseModel):
    """A chat message as OpenAI clients send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def to_wire(self) -> ChatMessage:
        """Flatten content parts; 'developer' is the newer name for 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role: Literal["system", "user", "assistant"] = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text)


class ChatBody(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatTurn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class EmbeddingBody(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    request_id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) > MAX_EMBED_INPUTS:
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        return v

    def inputs(self) -> list[str]:
        """Inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


def wire_error_body(err: ErrorInfo) -> dict[str, Any]:
    """OpenAI error JSON from a wire error."""
    return error_body(
        err.message,
        type_=ERROR_TYPES.get(err.http_status, "server_error"),
        param=err.param,
        code=err.code.value,
    )


def usage_json(u: Usage | None, e2e_ms: float | None = None) -> dict[str, Any]:
    """OpenAI usage plus muserve's fields (queue_ms, ttft_ms, length class, energy)."""
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "queue_ms": _r(u.queue_ms),
        "ttft_ms": _r(u.ttft_ms),
        "exec_ms": _r(u.exec_ms),
        "length_class": u.length_class,
        "predicted_tokens": _r(u.predicted_tokens),
        "score_tokens": _r(u.score_tokens),
        "predictor": u.predictor,
        "energy_j": None if u.energy_j is None else round(u.energy_j, 6),
        "energy_simulated": u.energy_simulated,
        "worker_id": u.worker_id,
        "attempt": u.attempt,
    }
    if e2e_ms is not None:
        out["e2e_ms"] = _r(e2e_ms)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def completion_json(
    rid: str, model: str, text: str, finish: str | None, usage: dict[str, Any], created: int
) -> dict[str, Any]:
    """A non-streamed text_completion."""
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }


def chat_json(
    rid: str, model: str, text: str, finish: str | None, usage: dict[str, Any], created: int
) -> dict[str, Any]:
    """A non-streamed chat.completion."""
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict[str, Any]:
    """One streamed text_completion chunk."""
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(
    rid: str, model: str, text: str | None, finish: str | None, created: int, role: bool = False
) -> dict[str, Any]:
    """One streamed chat.completion.chunk."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, usage: dict[str, Any], created: int, chat: bool) -> dict[str, Any]:
    """The trailing chunk OpenAI sends with stream_options.include_usage."""
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def embedding_json(model: str, vectors: list[list[float]], fmt: str, usage: dict[str, Any]) -> dict[str, Any]:
    """An embeddings list (floats, or base64 little-endian float32 as the openai client asks)."""
    data = []
    for i, vec in enumerate(vectors):
        emb: list[float] | str = vec
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": usage}


def now_s() -> int:
    """OpenAI's `created` timestamp."""
    return int(time.time())
