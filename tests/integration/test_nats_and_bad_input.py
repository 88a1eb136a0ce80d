"""Raw NATS entry and bad input on both entries: clear errors, and every service keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import msgpack
import nats
import pytest

from services.common import subjects
from services.common.settings import DEFAULT_CHAT_MODEL
from tests.integration.harness import LiveCluster


def post(live: LiveCluster, path: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(live.gateway + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok_chat(live: LiveCluster) -> None:
    status, body = post(
        live,
        "/v1/chat/completions",
        {"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body


async def test_raw_nats_request_unary_and_stream(live: LiveCluster) -> None:
    nc = await nats.connect(live.nats_url)
    try:
        msg = await nc.request(
            subjects.generate(DEFAULT_CHAT_MODEL),
            msgpack.packb(
                {
                    "messages": [{"role": "user", "content": "Name a colour."}],
                    "max_tokens": 5,
                    "ignore_eos": True,
                }
            ),
            timeout=60,
        )
        reply = msgpack.unpackb(msg.data)
        assert (
            reply["finished"]
            and reply["finish_reason"] == "length"
            and reply["usage"]["completion_tokens"] == 5
        )

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(
            subjects.generate(DEFAULT_CHAT_MODEL),
            msgpack.packb({"prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}),
            reply=inbox,
        )
        chunks = []
        while True:
            chunk = msgpack.unpackb((await sub.next_msg(timeout=60)).data)
            chunks.append(chunk)
            if chunk["finished"]:
                break
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        assert chunks[-1]["usage"]["completion_tokens"] == 4 and "error" not in chunks[-1]
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("payload", "code", "param"),
    [
        (b"\xc1 not msgpack", "invalid_request", None),
        (msgpack.packb([1, 2, 3]), "invalid_request", None),
        (msgpack.packb({"prompt": 12}), "invalid_request", "prompt"),
        (msgpack.packb({"prompt": "x", "max_tokens": -3}), "invalid_request", "max_tokens"),
        (
            msgpack.packb({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}),
            "invalid_request",
            None,
        ),
        (msgpack.packb({"prompt": "x", "v": 99}), "invalid_request", None),
        (msgpack.packb({"prompt": "x", "model": "other"}), "invalid_request", "model"),
    ],
)
async def test_bad_nats_payloads_get_error_replies(
    live: LiveCluster, payload: bytes, code: str, param: str | None
) -> None:
    nc = await nats.connect(live.nats_url)
    try:
        msg = await nc.request(subjects.generate(DEFAULT_CHAT_MODEL), payload, timeout=10)
        reply = msgpack.unpackb(msg.data)
        assert reply["finished"] and reply["error"]["code"] == code, reply
        if param:
            assert reply["error"]["param"] == param
        unknown = msgpack.unpackb(
            (
                await nc.request(
                    subjects.generate("no-such-model"), msgpack.packb({"prompt": "x"}), timeout=10
                )
            ).data
        )
        assert unknown["error"]["code"] == "unknown_model"
    finally:
        await nc.close()
    ok_chat(live)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": DEFAULT_CHAT_MODEL}, 400, "prompt"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": 5}, 400, "prompt"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ({"model": DEFAULT_CHAT_MODEL, "prompt": "x", "max_tokens": 100_000}, 413, "max_tokens"),
    ],
)
def test_bad_http_bodies(
    live: LiveCluster, body: bytes | dict[str, Any], status: int, param: str | None
) -> None:
    got, err = post(live, "/v1/completions", body)
    assert got == status, err
    assert set(err) == {"error"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param


def test_megabyte_prompt_is_413_and_service_survives(live: LiveCluster) -> None:
    big = "hello " * 180_000  # ~1 MB
    got, err = post(
        live,
        "/v1/chat/completions",
        {"model": DEFAULT_CHAT_MODEL, "messages": [{"role": "user", "content": big}]},
    )
    assert got == 413 and err["error"]["code"] == "context_length_exceeded", err
    got, err = post(
        live, "/v1/completions", json.dumps({"model": DEFAULT_CHAT_MODEL, "prompt": big * 5}).encode()
    )
    assert got == 413, err  # over the body limit
    ok_chat(live)


async def test_raw_nats_huge_prompt_is_rejected(live: LiveCluster) -> None:
    nc = await nats.connect(live.nats_url)
    try:
        payload = msgpack.packb({"prompt": "hello " * 60_000, "max_tokens": 4})
        reply = msgpack.unpackb(
            (await nc.request(subjects.generate(DEFAULT_CHAT_MODEL), payload, timeout=30)).data
        )
        assert reply["error"]["code"] == "context_length_exceeded", reply
    finally:
        await nc.close()
    ok_chat(live)


def test_wrong_endpoint_for_model_kind(live: LiveCluster) -> None:
    got, err = post(live, "/v1/embeddings", {"model": DEFAULT_CHAT_MODEL, "input": "x"})
    assert got == 400 and err["error"]["param"] == "model"
    got, err = post(live, "/v1/nope", {"model": DEFAULT_CHAT_MODEL})
    assert got == 404
