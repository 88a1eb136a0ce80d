"""Request queues: FCFS order, SSJF order, and the SSJF aging bound that prevents starvation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from services.scheduler.request_queue import (
    FCFSQueue,
    QueuedRequest,
    RequestQueue,
    SchedulingPolicy,
    SSJFQueue,
    make_request_queue,
)


def req(rid: str, arrival_s: float = 0.0, predicted_exec_ms: float = 10.0) -> QueuedRequest:
    """A queued request with only the ordering keys set."""
    return QueuedRequest(request_id=rid, arrival_s=arrival_s, predicted_exec_ms=predicted_exec_ms)


def peek_id(q: RequestQueue, now_s: float) -> str | None:
    """Id of the request pop() would return at now_s."""
    r = q.peek(now_s)
    return None if r is None else r.request_id


def pop_id(q: RequestQueue, now_s: float) -> str | None:
    """Pop at now_s; the popped id."""
    r = q.pop(now_s)
    return None if r is None else r.request_id


def drain(q: RequestQueue, now_s: float = 0.0) -> list[str]:
    """Pop everything at one instant; the ids in pop order."""
    out: list[str] = []
    while (r := q.pop(now_s)) is not None:
        out.append(r.request_id)
    return out


# -- FCFS --------------------------------------------------------------------------------------------


def test_fcfs_pops_by_arrival_then_insertion_order() -> None:
    q = FCFSQueue()
    q.add(req("late", 3.0, 1.0))
    q.add(req("tie-1", 1.0, 500.0))
    q.add(req("early", 0.5, 900.0))
    q.add(req("tie-2", 1.0, 2.0))
    assert q.policy is SchedulingPolicy.FCFS
    assert peek_id(q, 0.0) == "early"
    assert drain(q) == ["early", "tie-1", "tie-2", "late"]
    assert q.pop(0.0) is None
    assert q.peek(0.0) is None


def test_fcfs_ignores_predictions_and_time() -> None:
    q = FCFSQueue()
    q.add(req("long", 0.0, 10_000.0))
    q.add(req("short", 0.1, 1.0))
    assert pop_id(q, 1e9) == "long"


# -- SSJF --------------------------------------------------------------------------------------------


def test_ssjf_pops_shortest_then_arrival_then_insertion() -> None:
    q = SSJFQueue()
    q.add(req("long", 0.0, 300.0))
    q.add(req("mid-late", 2.0, 100.0))
    q.add(req("mid-early", 1.0, 100.0))
    q.add(req("short", 3.0, 5.0))
    q.add(req("mid-early-2", 1.0, 100.0))
    assert q.policy is SchedulingPolicy.SSJF
    # now_s = 0 is before anyone is promoted (promotion needs now >= arrival + bound).
    assert drain(q, now_s=0.0) == ["short", "mid-early", "mid-early-2", "mid-late", "long"]


def test_ssjf_promoted_request_goes_first_most_overdue_first() -> None:
    q = SSJFQueue(aging_factor=2.0, max_wait_ms=60_000.0)
    q.add(req("a", 0.0, 400.0))  # promoted at 0.8 s
    q.add(req("b", 0.5, 200.0))  # promoted at 0.9 s
    q.add(req("c", 0.6, 1.0))  # promoted at 0.602 s
    assert q.promote_at_s(req("x", 0.0, 400.0)) == pytest.approx(0.8)
    assert peek_id(q, 0.6) == "c"  # nobody due: shortest
    assert pop_id(q, 0.6) == "c"
    assert peek_id(q, 0.79) == "b"  # nobody due: shortest
    assert peek_id(q, 0.8) == "a"  # "a" due: it overtakes "b"
    # At 1.0 s both are due: the earlier promotion ("a", the longer one) first, then "b", then the rest.
    q.add(req("d", 1.0, 0.1))
    assert drain(q, 1.0) == ["a", "b", "d"]


def test_ssjf_max_wait_caps_the_aging_bound() -> None:
    q = SSJFQueue(aging_factor=8.0, max_wait_ms=250.0)
    huge = req("huge", 1.0, 1_000_000.0)
    assert q.promote_at_s(huge) == pytest.approx(1.25)
    assert q.promote_at_s(req("small", 1.0, 10.0)) == pytest.approx(1.08)  # 8 x 10 ms < cap
    q.add(huge)
    q.add(req("small", 1.2, 10.0))
    assert peek_id(q, 1.249) == "small"
    assert peek_id(q, 1.25) == "huge"


# -- shared container semantics ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "ssjf"])
def test_remove_len_contains_iter(policy: str) -> None:
    q = make_request_queue(policy)
    for i, ms in enumerate((30.0, 10.0, 20.0)):
        q.add(req(f"r{i}", float(i), ms))
    assert len(q) == 3
    assert "r1" in q and "nope" not in q and 7 not in q
    assert sorted(r.request_id for r in q) == ["r0", "r1", "r2"]
    removed = q.remove("r1")
    assert removed is not None and removed.request_id == "r1"
    assert q.remove("r1") is None
    assert len(q) == 2 and "r1" not in q
    assert sorted(drain(q)) == ["r0", "r2"]
    assert len(q) == 0 and list(q) == []


@pytest.mark.parametrize("policy", ["fcfs", "ssjf"])
def test_iter_is_a_snapshot(policy: str) -> None:
    q = make_request_queue(policy)
    q.add(req("a"))
    q.add(req("b", 1.0))
    for r in q:
        q.remove(r.request_id)  # must not break the iteration
    assert len(q) == 0


@pytest.mark.parametrize("policy", ["fcfs", "ssjf"])
def test_readd_replaces_the_old_entry(policy: str) -> None:
    q = make_request_queue(policy)
    q.add(req("x", 0.0, 50.0))
    q.add(req("y", 1.0, 40.0))
    q.add(req("x", 2.0, 30.0))  # same id, new keys: the first entry is gone
    assert len(q) == 2
    assert q.predicted_work_ms == pytest.approx(70.0)
    assert q.oldest_arrival_s() == pytest.approx(1.0)
    order = drain(q)
    assert order == (["y", "x"] if policy == "fcfs" else ["x", "y"])
    assert q.pop(0.0) is None  # no ghost of the replaced entry


def test_readd_after_remove_uses_the_new_keys() -> None:
    q = SSJFQueue()
    q.add(req("x", 0.0, 500.0))
    q.add(req("y", 0.0, 100.0))
    q.remove("x")
    q.add(req("x", 0.0, 1.0))
    assert drain(q) == ["x", "y"]


@pytest.mark.parametrize("policy", ["fcfs", "ssjf"])
def test_predicted_work_and_oldest_arrival(policy: str) -> None:
    q = make_request_queue(policy)
    assert q.predicted_work_ms == 0.0
    assert q.oldest_arrival_s() is None
    q.add(req("a", 5.0, 0.1))
    q.add(req("b", 2.0, 0.2))
    q.add(req("c", 9.0, 0.3))
    assert q.predicted_work_ms == pytest.approx(0.6)
    assert q.oldest_arrival_s() == 2.0
    q.remove("b")
    assert q.predicted_work_ms == pytest.approx(0.4)
    assert q.oldest_arrival_s() == 5.0
    drain(q)
    assert q.predicted_work_ms == 0.0  # exactly zero, no float residue
    assert q.oldest_arrival_s() is None


# -- factory and validation --------------------------------------------------------------------------


def test_factory_builds_each_policy() -> None:
    assert isinstance(make_request_queue("fcfs"), FCFSQueue)
    assert isinstance(make_request_queue(SchedulingPolicy.FCFS), FCFSQueue)
    ssjf = make_request_queue("ssjf", aging_factor=3.0, max_wait_ms=100.0)
    assert isinstance(ssjf, SSJFQueue)
    assert ssjf.aging_factor == 3.0 and ssjf.max_wait_ms == 100.0


def test_factory_rejects_unknown_policy_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown scheduling policy 'lifo'") as exc:
        make_request_queue("lifo")
    assert "fcfs" in str(exc.value) and "ssjf" in str(exc.value)


@pytest.mark.parametrize(("aging_factor", "max_wait_ms"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -5.0)])
def test_ssjf_rejects_non_positive_parameters(aging_factor: float, max_wait_ms: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        SSJFQueue(aging_factor=aging_factor, max_wait_ms=max_wait_ms)


# -- starvation freedom ------------------------------------------------------------------------------


@dataclass
class Served:
    """When the long job left the queue, what left before it, and whether shorter jobs always waited."""

    long_at_ms: int | None
    popped_before_long: list[str]
    shorter_always_waiting: bool


def run_long_vs_stream(q: SSJFQueue, long_ms: float, until_ms: int, service_ms: int = 20) -> Served:
    """A long job at t=0; 60 ms jobs every 10 ms from t=1 ms; one pop every `service_ms` (2x overload)."""
    q.add(req("long", 0.0, long_ms))
    popped: list[str] = []
    shorter_always_waiting = True
    next_short_ms, n = 1, 0
    for t_ms in range(service_ms, until_ms + 1, service_ms):
        while next_short_ms <= t_ms:
            q.add(req(f"s{n}", next_short_ms / 1000.0, 60.0))
            next_short_ms += 10
            n += 1
        shorter_always_waiting &= any(r.predicted_exec_ms < long_ms for r in q)
        got = q.pop(t_ms / 1000.0)
        assert got is not None
        if got.request_id == "long":
            return Served(t_ms, popped, shorter_always_waiting)
        popped.append(got.request_id)
    return Served(None, popped, shorter_always_waiting)


def test_long_job_is_promoted_under_a_stream_of_shorter_jobs() -> None:
    """aging_factor 8 x 100 ms: the long job leaves by 0.8 s + one service interval, never earlier."""
    q = SSJFQueue(aging_factor=8.0, max_wait_ms=60_000.0)
    assert q.promote_at_s(req("long", 0.0, 100.0)) == pytest.approx(0.8)
    res = run_long_vs_stream(q, long_ms=100.0, until_ms=5_000)
    assert res.shorter_always_waiting  # so it may not leave before its promotion ...
    assert res.long_at_ms is not None
    assert 800 <= res.long_at_ms <= 800 + 20  # ... and leaves within one interval after it
    assert len(res.popped_before_long) == 800 // 20 - 1
    assert len(q) > 0  # shorts still waiting: it overtook them through aging


def test_absolute_max_wait_caps_the_promotion_of_a_very_long_job() -> None:
    """A 10 s job with aging_factor 8 would wait 80 s; max_wait_ms=500 promotes it at 0.5 s."""
    q = SSJFQueue(aging_factor=8.0, max_wait_ms=500.0)
    assert q.promote_at_s(req("long", 0.0, 10_000.0)) == pytest.approx(0.5)
    res = run_long_vs_stream(q, long_ms=10_000.0, until_ms=5_000)
    assert res.shorter_always_waiting
    assert res.long_at_ms is not None
    assert 500 <= res.long_at_ms <= 500 + 20
    assert len(q) > 0


def test_without_aging_the_same_stream_starves_the_long_job() -> None:
    """Control: with an (effectively) infinite bound the long job is not served within 5 s."""
    q = SSJFQueue(aging_factor=1e9, max_wait_ms=1e12)
    res = run_long_vs_stream(q, long_ms=100.0, until_ms=5_000)
    assert res.long_at_ms is None
    assert len(res.popped_before_long) == 5_000 // 20
    assert "long" in q


def _expected_pop(queued: list[tuple[int, QueuedRequest]], q: SSJFQueue, now_s: float) -> QueuedRequest:
    """Brute-force oracle of SSJFQueue.peek: most overdue promoted request, else shortest predicted."""
    due = [(q.promote_at_s(r), order, r) for order, r in queued if q.promote_at_s(r) <= now_s]
    if due:
        return min(due, key=lambda t: (t[0], t[1]))[2]
    return min(queued, key=lambda t: (t[1].predicted_exec_ms, t[1].arrival_s, t[0]))[1]


@pytest.mark.parametrize("seed_block", range(4))
def test_random_scenarios_respect_the_aging_bound(seed_block: int) -> None:
    """50 seeded scenarios per block (200 in all): oracle order and the starvation bound hold.

    Bound tested, with I the service interval (one pop every I while the queue is non-empty):
    let t0 be the first pop instant >= promote_at_s(r) at which r is still queued, and k the number of
    requests queued at t0 that are promoted strictly before r (promotion time, ties by insertion).
    Then r is popped no later than t0 + k * I  (<= promote_at_s(r) + (k + 1) * I, since t0 < P + I).
    Why: from t0 on r is due, so every pop takes the due request with the smallest (promotion, seq),
    which is r or one of the k ahead of it; nothing new can get ahead, because a later arrival a > t0
    has promotion time >= a > t0 >= promote_at_s(r). So after at most k pops it is r's turn.
    """
    for seed in range(seed_block * 50, seed_block * 50 + 50):
        rng = random.Random(seed)
        q = SSJFQueue(aging_factor=rng.uniform(0.5, 16.0), max_wait_ms=rng.uniform(50.0, 3_000.0))
        interval_s = rng.uniform(0.005, 0.05)
        n = rng.randint(10, 60)
        # Arrivals 1-3x faster than service, so a backlog builds; sizes log-uniform 1 ms .. 2 s.
        gap_s = interval_s / rng.uniform(1.0, 3.0)
        arrivals = sorted(rng.uniform(0.0, n * gap_s) for _ in range(n))
        sizes = [10 ** rng.uniform(0.0, 3.3) for _ in range(n)]
        pending = [req(f"r{i}", a, s) for i, (a, s) in enumerate(zip(arrivals, sizes, strict=True))]
        order = {r.request_id: i for i, r in enumerate(pending)}
        queued: dict[str, QueuedRequest] = {}
        first_due: dict[str, tuple[float, int]] = {}  # id -> (t0, k)
        served_at: dict[str, float] = {}
        tick = 0
        while pending or queued:
            tick += 1
            now_s = tick * interval_s
            while pending and pending[0].arrival_s <= now_s:
                r = pending.pop(0)
                q.add(r)
                queued[r.request_id] = r
            if not queued:
                continue
            for rid, r in queued.items():
                p = q.promote_at_s(r)
                if rid not in first_due and p <= now_s:
                    ahead = sum(
                        1 for oid, o in queued.items() if (q.promote_at_s(o), order[oid]) < (p, order[rid])
                    )
                    first_due[rid] = (now_s, ahead)
            expected = _expected_pop([(order[i], r) for i, r in queued.items()], q, now_s)
            got = q.pop(now_s)
            assert got is expected, f"seed {seed} t={now_s}"
            del queued[got.request_id]
            served_at[got.request_id] = now_s
            assert len(q) == len(queued)
        assert len(served_at) == n
        for rid, (t0, k) in first_due.items():
            bound_s = t0 + k * interval_s
            assert served_at[rid] <= bound_s + 1e-9, f"seed {seed}: {rid} served late"
            p = q.promote_at_s(QueuedRequest(rid, arrivals[order[rid]], sizes[order[rid]]))
            assert served_at[rid] <= p + (k + 1) * interval_s + 1e-9


@pytest.mark.parametrize("policy", ["fcfs", "ssjf", "oracle"])
def test_reprioritize_rekeys_a_queued_request_and_keeps_its_arrival(policy: str) -> None:
    q = make_request_queue(policy)
    q.add(req("a", arrival_s=0.0, predicted_exec_ms=50.0))
    q.add(req("b", arrival_s=0.001, predicted_exec_ms=20.0))
    q.add(req("c", arrival_s=0.002, predicted_exec_ms=30.0))
    # A late prediction says "c" is tiny: SSJF serves it first; FCFS order is untouched.
    assert q.reprioritize("c", predicted_exec_ms=1.0)
    assert q.predicted_work_ms == pytest.approx(71.0)
    assert not q.reprioritize("missing", predicted_exec_ms=1.0)
    assert len(q) == 3
    order = drain(q, now_s=0.002)
    assert order == (["a", "b", "c"] if policy == "fcfs" else ["c", "b", "a"])


def test_reprioritize_recomputes_the_aging_bound() -> None:
    q = SSJFQueue(aging_factor=2.0, max_wait_ms=60_000.0)
    q.add(req("long", arrival_s=0.0, predicted_exec_ms=1_000.0))
    q.add(req("short", arrival_s=0.99, predicted_exec_ms=10.0))
    # At 1 s "long" is not yet due (bound 2 s); re-estimated to 400 ms its bound is 0.8 s: promoted.
    assert peek_id(q, now_s=1.0) == "short"
    q.reprioritize("long", predicted_exec_ms=400.0)
    assert peek_id(q, now_s=1.0) == "long"


def test_aging_bound_and_promoted_order_use_the_finer_estimate() -> None:
    q = SSJFQueue(aging_factor=2.0, max_wait_ms=60_000.0)
    # Same length class (same predicted_exec_ms), different continuous estimates.
    long = QueuedRequest("long", arrival_s=0.0, predicted_exec_ms=100.0, rank_ms=400.0)
    short = QueuedRequest("short", arrival_s=0.1, predicted_exec_ms=100.0, rank_ms=50.0)
    q.add(long)
    q.add(short)
    assert q.promote_at_s(long) == pytest.approx(0.8) and q.promote_at_s(short) == pytest.approx(0.2)
    # At 1 s both are past their bound: earliest deadline first is the short one, not the earlier arrival.
    assert drain(q, now_s=1.0) == ["short", "long"]
