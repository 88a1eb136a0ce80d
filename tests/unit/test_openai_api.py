"""OpenAI request bodies (what the gateway accepts) and response builders (what it returns)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
from pydantic import ValidationError

from services.common.schemas import (
    MAX_EMBED_INPUTS,
    MAX_STOP_STRINGS,
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    Usage,
)
from services.gateway.openai_api import (
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    chat_chunk,
    chat_json,
    completion_chunk,
    completion_json,
    embedding_json,
    usage_chunk,
    usage_json,
    wire_error_body,
)


def completion(**kw: Any) -> CompletionBody:
    """A /v1/completions body; keyword arguments override fields."""
    return CompletionBody.model_validate({"model": "m1", "prompt": "Once upon", **kw})


def chat(**kw: Any) -> ChatBody:
    """A /v1/chat/completions body; keyword arguments override fields."""
    return ChatBody.model_validate({"model": "m1", "messages": [{"role": "user", "content": "hi"}], **kw})


def error_locs(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    """Top-level field names pydantic complained about."""
    return {str(e["loc"][0]) for e in exc.value.errors() if e["loc"]}


# -- bodies ----------------------------------------------------------------------------------------


def test_completion_defaults_and_unknown_parameters() -> None:
    body = completion(user="alice", frequency_penalty=0.0)
    assert body.prompt_text() == "Once upon"
    assert (body.n, body.stream, body.max_tokens, body.stop_list()) == (1, False, None, [])
    assert not hasattr(body, "user")


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("n", 0), ("logprobs", 5), ("logprobs", True), ("echo", True)],
)
def test_unsupported_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as exc:
        completion(**{field: value})
    assert error_locs(exc) == {field}


def test_supported_values_of_restricted_fields_are_accepted() -> None:
    body = completion(n=1, logprobs=None, echo=False)
    assert body.n == 1 and body.logprobs is None and body.echo is False
    assert chat(n=1).n == 1
    with pytest.raises(ValidationError):
        chat(n=3)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("###", ["###"]), (["a", "b"], ["a", "b"]), (None, []), ([], [])],
)
def test_stop_as_string_or_list(stop: str | list[str] | None, expected: list[str]) -> None:
    assert completion(stop=stop).stop_list() == expected
    assert chat(stop=stop).stop_list() == expected


@pytest.mark.parametrize("stop", ["", ["ok", ""], [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]])
def test_bad_stop_values_are_rejected(stop: str | list[str]) -> None:
    with pytest.raises(ValidationError) as exc:
        completion(stop=stop)
    assert error_locs(exc) == {"stop"}


def test_stop_at_the_bound_is_accepted() -> None:
    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert completion(stop=stops).stop_list() == stops


def test_prompt_list_of_one_is_accepted_of_two_rejected() -> None:
    assert completion(prompt=["only one"]).prompt_text() == "only one"
    for bad in (["one", "two"], []):
        with pytest.raises(ValidationError, match="exactly one prompt string") as exc:
            completion(prompt=bad)
        assert error_locs(exc) == {"prompt"}


def test_prompt_of_token_ids_is_rejected() -> None:
    with pytest.raises(ValidationError):
        completion(prompt=[1, 2, 3])


def test_sampling_bounds() -> None:
    for bad in ({"temperature": 2.5}, {"top_p": 0.0}, {"max_tokens": 0}, {"request_id": ""}, {"model": ""}):
        with pytest.raises(ValidationError):
            completion(**bad)
    body = completion(temperature=0.0, top_p=1.0, max_tokens=1, request_id="r" * 128, seed=3)
    assert (body.temperature, body.top_p, body.max_tokens, body.seed) == (0.0, 1.0, 1, 3)


def test_chat_content_parts_are_flattened() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}],
            },
        ]
    )
    wire = [m.to_wire() for m in body.messages]
    assert wire == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="Hello, you"),
    ]


def test_non_text_content_parts_are_rejected() -> None:
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_developer_role_maps_to_system() -> None:
    body = chat(messages=[{"role": "developer", "content": "rules"}, {"role": "user", "content": "q"}])
    assert [m.to_wire().role for m in body.messages] == ["system", "user"]


def test_chat_rejects_empty_messages_and_unknown_roles() -> None:
    with pytest.raises(ValidationError):
        chat(messages=[])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "tool", "content": "x"}])


def test_chat_max_completion_tokens() -> None:
    assert chat(max_completion_tokens=9).max_completion_tokens == 9
    with pytest.raises(ValidationError):
        chat(max_completion_tokens=0)


def test_embedding_input_as_string_or_list() -> None:
    one = EmbeddingBody.model_validate({"model": "e", "input": "hello"})
    assert one.inputs() == ["hello"] and one.encoding_format == "float"
    many = EmbeddingBody.model_validate({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    assert many.inputs() == ["a", "b"] and many.encoding_format == "base64"


@pytest.mark.parametrize("bad", [[], "", [f"t{i}" for i in range(MAX_EMBED_INPUTS + 1)]])
def test_embedding_input_bounds(bad: str | list[str]) -> None:
    with pytest.raises(ValidationError) as exc:
        EmbeddingBody.model_validate({"model": "e", "input": bad})
    assert error_locs(exc) == {"input"}


def test_embedding_input_at_the_bound_and_bad_format() -> None:
    inputs = [f"t{i}" for i in range(MAX_EMBED_INPUTS)]
    assert len(EmbeddingBody.model_validate({"model": "e", "input": inputs}).inputs()) == MAX_EMBED_INPUTS
    with pytest.raises(ValidationError):
        EmbeddingBody.model_validate({"model": "e", "input": "x", "encoding_format": "int8"})


# -- response builders -----------------------------------------------------------------------------


def test_usage_json_includes_muserve_fields() -> None:
    u = Usage(
        prompt_tokens=5,
        completion_tokens=7,
        total_tokens=12,
        queue_ms=1.23456,
        ttft_ms=20.0,
        exec_ms=300.5,
        length_class=1,
        predicted_tokens=120.0,
        score_tokens=97.25,
        predictor="per-model-median@1",
        energy_j=1.23456789,
        energy_simulated=True,
        worker_id="w1",
        attempt=2,
    )
    out = usage_json(u, e2e_ms=400.00049)
    assert (out["prompt_tokens"], out["completion_tokens"], out["total_tokens"]) == (5, 7, 12)
    assert out["queue_ms"] == 1.235 and out["exec_ms"] == 300.5 and out["e2e_ms"] == 400.0
    assert out["energy_j"] == 1.234568 and out["energy_simulated"] is True
    assert (out["length_class"], out["predicted_tokens"], out["predictor"]) == (
        1,
        120.0,
        "per-model-median@1",
    )
    assert (out["worker_id"], out["attempt"]) == ("w1", 2)
    assert out["score_tokens"] == 97.25  # the continuous estimate SSJF ordered by


def test_usage_json_without_usage_or_timings() -> None:
    assert usage_json(None) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    out = usage_json(Usage())
    assert out["queue_ms"] is None and out["energy_j"] is None and "e2e_ms" not in out


def test_embedding_json_base64_decodes_to_the_floats() -> None:
    vectors = [[0.5, -1.25, 3.0], [1e-3, 0.0, 2.0]]
    out = embedding_json("e", vectors, "base64", {"prompt_tokens": 3})
    assert out["object"] == "list" and out["model"] == "e" and out["usage"] == {"prompt_tokens": 3}
    for i, (vec, entry) in enumerate(zip(vectors, out["data"], strict=True)):
        assert entry["object"] == "embedding" and entry["index"] == i
        raw = base64.b64decode(entry["embedding"])
        assert len(raw) == 4 * len(vec)
        decoded = struct.unpack(f"<{len(vec)}f", raw)
        assert decoded == pytest.approx(vec, rel=1e-6)  # float32 precision


def test_embedding_json_float_format_passes_vectors_through() -> None:
    out = embedding_json("e", [[0.1, 0.2]], "float", {})
    assert out["data"] == [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]


def test_chat_chunk_with_role_and_content() -> None:
    first = chat_chunk("r1", "m1", None, None, 100, role=True)
    assert first["id"] == "chatcmpl-r1" and first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    mid = chat_chunk("r1", "m1", "Hel", None, 100)
    assert mid["choices"][0]["delta"] == {"content": "Hel"}
    both = chat_chunk("r1", "m1", "", None, 100, role=True)
    assert both["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chat_chunk("r1", "m1", None, "stop", 100)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in last


def test_non_streamed_responses() -> None:
    usage = {"total_tokens": 3}
    c = completion_json("r", "m1", "text", "length", usage, 5)
    assert c["id"] == "cmpl-r" and c["object"] == "text_completion" and c["created"] == 5
    assert c["choices"] == [{"index": 0, "text": "text", "finish_reason": "length", "logprobs": None}]
    ch = chat_json("r", "m1", "answer", "stop", usage, 5)
    assert ch["id"] == "chatcmpl-r" and ch["usage"] is usage
    assert ch["choices"][0]["message"] == {"role": "assistant", "content": "answer"}
    cc = completion_chunk("r", "m1", "t", None, 5)
    assert cc["choices"][0]["text"] == "t" and "usage" not in cc


def test_usage_chunk_has_no_choices() -> None:
    assert usage_chunk("r", "m1", {"total_tokens": 1}, 5, chat=True)["object"] == "chat.completion.chunk"
    plain = usage_chunk("r", "m1", {"total_tokens": 1}, 5, chat=False)
    assert plain["id"] == "cmpl-r" and plain["choices"] == [] and plain["usage"] == {"total_tokens": 1}


@pytest.mark.parametrize(
    ("code", "type_"),
    [
        (ErrorCode.INVALID_REQUEST, "invalid_request_error"),
        (ErrorCode.UNKNOWN_MODEL, "invalid_request_error"),
        (ErrorCode.QUEUE_FULL, "rate_limit_error"),
        (ErrorCode.NO_WORKER, "service_unavailable"),
        (ErrorCode.TIMEOUT, "timeout"),
        (ErrorCode.INTERNAL, "server_error"),
    ],
)
def test_wire_error_body(code: ErrorCode, type_: str) -> None:
    body = wire_error_body(ErrorInfo(code=code, message="nope", param="x"))
    assert body == {"error": {"message": "nope", "type": type_, "param": "x", "code": code.value}}
