"""Failures with real processes: workers and schedulers killed with SIGKILL, full queues, no workers."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from services.common.settings import DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL
from services.launcher import ServiceSpec
from tests.integration.harness import LiveCluster, sse_events, start_cluster, wait_until

GROUPS = json.dumps({"chat": {"policy": "ssjf", "max_queue": 4}, "embed": {"policy": "fcfs", "max_queue": 4}})


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    """One chat worker with 2 slots, no embedding worker, small queues."""
    env = {"MUSERVE_GROUPS": GROUPS, "MUSERVE_WORKER__MAX_SEQS": "2"}
    specs = [
        ServiceSpec("scheduler"),
        ServiceSpec("predictor"),
        ServiceSpec("gateway"),
        ServiceSpec("worker"),
    ]
    yield from start_cluster(tmp_path_factory.mktemp("faults"), specs, env, [DEFAULT_CHAT_MODEL])


def post(live: LiveCluster, body: dict[str, Any], timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"{live.gateway}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def long_body(tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": DEFAULT_CHAT_MODEL,
        "prompt": "Tell a long story.",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def worker_busy(live: LiveCluster) -> bool:
    """The gateway has requests in flight (its Prometheus gauge)."""
    with urllib.request.urlopen(f"{live.gateway}/metrics", timeout=5) as r:
        text = r.read().decode()
    return "muserve_inflight_requests 1.0" in text or "muserve_inflight_requests 2.0" in text


def test_no_worker_for_model_is_503(faulty: LiveCluster) -> None:
    req = urllib.request.Request(
        f"{faulty.gateway}/v1/embeddings",
        data=json.dumps({"model": DEFAULT_EMBED_MODEL, "input": "x"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 503
    assert json.loads(exc.value.read())["error"]["code"] == "no_worker"


def test_queue_bound_gives_429_and_accepted_ones_finish(faulty: LiveCluster) -> None:
    # 2 slots + a queue bound of 4: of 12 concurrent long requests some must be refused at once.
    threads = [in_thread(post, faulty, long_body(40)) for _ in range(12)]
    results = []
    for t, out in threads:
        t.join(timeout=300)
        results.append(out[0])
    codes = sorted(code for code, _ in results)
    assert 429 in codes and 200 in codes, codes
    for code, body in results:
        err = json.loads(body)
        if code == 429:
            assert err["error"]["code"] == "queue_full" and err["error"]["type"] == "rate_limit_error"
        else:
            assert code == 200 and err["usage"]["completion_tokens"] == 40


def test_worker_killed_mid_generation_redispatches_unary_and_fails_stream(faulty: LiveCluster) -> None:
    old = faulty.service("worker")
    unary_t, unary_out = in_thread(post, faulty, long_body(400))
    stream_t, stream_out = in_thread(post, faulty, long_body(400, stream=True))
    wait_until(lambda: worker_busy(faulty), 30, "requests in flight")
    time.sleep(1.0)  # both are generating (the worker has 2 slots)
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    new = faulty.add_worker()
    stream_t.join(timeout=120)
    unary_t.join(timeout=300)
    assert stream_out and unary_out, "a client waited forever"
    code, body = stream_out[0]
    assert code == 200
    events = sse_events(body)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["error"]["code"] == "worker_lost", events[-3:]
    code, body = unary_out[0]
    assert code == 200, body
    usage = json.loads(body)["usage"]
    assert usage["completion_tokens"] == 400 and usage["attempt"] == 2
    assert new.proc.poll() is None


def test_scheduler_killed_and_restarted_loses_no_accepted_request(faulty: LiveCluster) -> None:
    wait_until(lambda: _ready(faulty), 60, "a live worker")
    # 4 = the queue bound: all are accepted (a 5th could race the bound while the others are admitted).
    threads = [in_thread(post, faulty, long_body(60)) for _ in range(4)]
    time.sleep(1.5)  # accepted: 2 running, 2 queued on JetStream
    sched = faulty.service("scheduler")
    sched.proc.send_signal(signal.SIGKILL)
    sched.proc.wait()
    faulty.cluster.start_service(ServiceSpec("scheduler"))
    results = []
    for t, out in threads:
        t.join(timeout=300)
        assert out, "a client waited forever"
        results.append(out[0])
    for code, body in results:
        assert code == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 60


def _ready(live: LiveCluster) -> bool:
    try:
        with urllib.request.urlopen(f"{live.gateway}/readyz", timeout=2) as r:
            return bool(json.loads(r.read())["models"][DEFAULT_CHAT_MODEL])
    except Exception:
        return False


def test_predictor_killed_requests_flow_through_survivor_then_baseline(faulty: LiveCluster) -> None:
    wait_until(lambda: _ready(faulty), 60, "a live worker")
    first = faulty.service("predictor")
    second = faulty.cluster.start_service(ServiceSpec("predictor"))
    wait_until(
        lambda: "ready" in (second.log_path.read_text() if second.log_path else ""), 60, "second predictor"
    )
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    for _ in range(3):
        code, body = post(faulty, long_body(30))
        assert code == 200, body
        assert json.loads(body)["usage"]["predictor"] != "fallback-median@1"  # the survivor answered
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait()
    code, body = post(faulty, long_body(120))
    assert code == 200, body
    assert json.loads(body)["usage"]["predictor"] == "fallback-median@1"  # no predictor: the baseline
    faulty.cluster.start_service(ServiceSpec("predictor"))


async def test_a_completion_reported_twice_is_harmless(faulty: LiveCluster) -> None:
    import msgpack
    import nats

    from services.common import subjects

    code, body = post(faulty, long_body(5))
    assert code == 200
    rid = json.loads(body)["id"].removeprefix("cmpl-")
    nc = await nats.connect(faulty.nats_url)
    try:
        # The worker streams the answer before it reports done: wait until the scheduler closed the job.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads((await nc.request(subjects.status("scheduler"), b"", timeout=5)).data)
            if st["groups"]["chat"]["jobs"] == 0:
                break
            await asyncio.sleep(0.05)
        report = {"request_id": rid, "worker_id": "w-replayed", "group": "chat", "model": DEFAULT_CHAT_MODEL}
        for _ in range(2):
            ack = msgpack.unpackb(
                (await nc.request(subjects.sched_done("chat"), msgpack.packb(report), timeout=5)).data
            )
            assert ack["request_id"] == rid and ack["known"] is False  # already closed: nothing happens
    finally:
        await nc.close()
    code, _ = post(faulty, long_body(5))
    assert code == 200
