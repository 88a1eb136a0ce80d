"""End to end through the real HTTP gateway with the official openai client (stream and non-stream)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from openai import OpenAI

from services.common.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL
from tests.integration.harness import LiveCluster


@pytest.fixture(scope="module")
def client(live: LiveCluster) -> OpenAI:
    return OpenAI(base_url=f"{live.gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_non_stream_reports_usage_and_muserve_fields(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEFAULT_CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion" and r.model == DEFAULT_CHAT_MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    u = r.usage
    assert u is not None and u.completion_tokens == 12 and u.prompt_tokens > 10
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra or {}
    assert extra["queue_ms"] >= 0 and extra["ttft_ms"] > 0 and extra["length_class"] in range(5)
    assert extra["predictor"].startswith("proxy-smollm2@")  # the shipped trained predictor, not a fallback
    assert extra["score_tokens"] > 0  # its continuous estimate, which SSJF orders by
    assert extra["energy_j"] > 0 and extra["energy_simulated"] is True


def test_chat_stream_ends_with_usage_and_text_matches_non_stream(client: OpenAI) -> None:
    kwargs = dict(
        model=DEFAULT_CHAT_MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish == "length" and usage is not None and usage.completion_tokens == 10
    # Greedy decoding: streaming and unary give the same text.
    whole = client.chat.completions.create(**kwargs)
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions_stream_and_stop_string(client: OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=DEFAULT_CHAT_MODEL, prompt="Once upon a time", max_tokens=6, stream=True
        )
    )
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    r = client.completions.create(
        model=DEFAULT_CHAT_MODEL, prompt="Count: 1, 2, 3", max_tokens=8, temperature=0
    )
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage is not None and r.usage.completion_tokens >= 1
    if len(text) > 2:
        stop = text[1:3]
        r2 = client.completions.create(
            model=DEFAULT_CHAT_MODEL, prompt="Count: 1, 2, 3", max_tokens=8, temperature=0, stop=[stop]
        )
        assert stop not in r2.choices[0].text and r2.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: OpenAI) -> None:
    def once() -> str:
        r = client.completions.create(
            model=DEFAULT_CHAT_MODEL,
            prompt="Tell me",
            max_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=42,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    assert once() == once()


def test_embeddings_base64_default_and_float(client: OpenAI) -> None:
    e = client.embeddings.create(
        model=DEFAULT_EMBED_MODEL, input=["a cat on a mat", "a kitten on a rug", "tax law"]
    )
    vecs = [d.embedding for d in e.data]
    assert len(vecs) == 3 and len(vecs[0]) == 384

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    f = client.embeddings.create(model=DEFAULT_EMBED_MODEL, input="a cat on a mat", encoding_format="float")
    assert abs(cos(f.data[0].embedding, vecs[0]) - 1.0) < 1e-4
    assert e.usage.prompt_tokens > 0


def test_models_health_ready_metrics(live: LiveCluster, client: OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL} <= ids
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(live.gateway + path, timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())
    with urllib.request.urlopen(live.gateway + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "muserve_requests_total" in text and "muserve_request_latency_seconds_bucket" in text


def test_openai_errors_are_typed(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=DEFAULT_CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert exc.value.body["param"] == "n"  # type: ignore[index]
