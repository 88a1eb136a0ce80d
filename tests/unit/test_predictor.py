"""Length classes, the per-model median baseline, and the opportunistic micro-batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.schemas import Prediction, PredictItem
from services.predictor.base import LengthPredictor, MedianLengthPredictor, length_class
from services.predictor.batcher import MicroBatcher

EDGES = [96, 265, 451, 1039]


# -- length_class ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (0, 0),
        (1, 0),
        (96, 0),  # an edge belongs to the class below it: class k is (edges[k-1], edges[k]]
        (96.5, 1),
        (97, 1),
        (265, 1),
        (266, 2),
        (451, 2),
        (452, 3),
        (1039, 3),
        (1039.01, 4),
        (1040, 4),
        (1_000_000, 4),
    ],
)
def test_length_class_against_the_default_edges(tokens: float, expected: int) -> None:
    assert length_class(tokens, EDGES) == expected


def test_length_class_matches_its_docstring_interval_definition() -> None:
    """Class k holds lengths in (edges[k-1], edges[k]], with edges[-1] = -inf and edges[len] = +inf."""
    bounds = [float("-inf"), *EDGES, float("inf")]
    for tokens in range(0, 1200):
        k = length_class(tokens, EDGES)
        assert bounds[k] < tokens <= bounds[k + 1]


# -- MedianLengthPredictor -------------------------------------------------------------------------


def item(rid: str, model: str = "m1", text: str = "hello") -> PredictItem:
    """One request to predict."""
    return PredictItem(request_id=rid, model=model, text=text)


def test_median_predictor_uses_the_prior_until_it_observes() -> None:
    p = MedianLengthPredictor(EDGES, priors_tokens={"m1": 300.0}, default_tokens=50.0)
    assert p.ident == "per-model-median@1"
    (known, unknown) = p.predict([item("a", "m1"), item("b", "other")])
    assert known == Prediction(length_class=2, predicted_tokens=300.0, predictor="per-model-median@1")
    assert unknown.predicted_tokens == 50.0 and unknown.length_class == 0


def test_median_predictor_follows_observations() -> None:
    p = MedianLengthPredictor(EDGES, priors_tokens={"m1": 300.0})
    for n in (10, 1000, 30):
        p.observe("m1", n)
    assert p.median_tokens("m1") == 30.0
    p.observe("m1", 40)
    assert p.median_tokens("m1") == 35.0  # even count: mean of the middle two
    (pred,) = p.predict([item("a")])
    assert pred.predicted_tokens == 35.0 and pred.length_class == 0


def test_median_predictor_ignores_non_positive_lengths() -> None:
    p = MedianLengthPredictor(EDGES, priors_tokens={"m1": 300.0})
    p.observe("m1", 0)
    p.observe("m1", -7)
    assert p.median_tokens("m1") == 300.0  # still the prior
    p.observe("m1", 500)
    p.observe("m1", 0)
    assert p.median_tokens("m1") == 500.0


def test_median_predictor_window_slides() -> None:
    p = MedianLengthPredictor(EDGES, window=3)
    for n in (1, 2, 3):
        p.observe("m1", n)
    assert p.median_tokens("m1") == 2.0
    for n in (100, 200):
        p.observe("m1", n)  # window is now [3, 100, 200]
    assert p.median_tokens("m1") == 100.0


def test_median_predictor_models_are_independent() -> None:
    p = MedianLengthPredictor(EDGES, priors_tokens={"m1": 100.0, "m2": 600.0})
    p.observe("m2", 5)
    assert p.median_tokens("m1") == 100.0
    assert p.median_tokens("m2") == 5.0
    p.observe("m1", 2000)
    preds = p.predict([item("a", "m1"), item("b", "m2"), item("c", "m1")])
    assert [x.predicted_tokens for x in preds] == [2000.0, 5.0, 2000.0]
    assert [x.length_class for x in preds] == [4, 0, 4]


def test_median_predictor_ignores_the_prompt() -> None:
    p = MedianLengthPredictor(EDGES)
    a, b = p.predict([item("a", text="hi"), item("b", text="x" * 10_000)])
    assert a == b


# -- MicroBatcher ----------------------------------------------------------------------------------


class RecordingPredictor(LengthPredictor):
    """Predicts len(text) tokens; records every batch; can block on a gate and fail on a marker."""

    name = "recording"
    version = "0"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.started = threading.Event()
        self.batches: list[list[str]] = []
        self.threads: list[int] = []

    def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """One prediction per item; raises if any item's text is 'boom'."""
        self.batches.append([i.request_id for i in items])
        self.threads.append(threading.get_ident())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=5.0), "test gate never opened"
        if any(i.text == "boom" for i in items):
            raise RuntimeError("predictor exploded")
        return [Prediction(length_class=0, predicted_tokens=len(i.text), predictor=self.ident) for i in items]


def items(prefix: str, n: int, text: str = "x") -> list[PredictItem]:
    """n items with ids prefix0.. and distinct text lengths (so results identify their item)."""
    return [item(f"{prefix}{i}", text=text * (i + 1)) for i in range(n)]


async def test_batcher_merges_calls_that_arrive_while_a_batch_runs() -> None:
    gate = threading.Event()
    p = RecordingPredictor(gate)
    b = MicroBatcher(p, executor=ThreadPoolExecutor(1))
    first = asyncio.create_task(b.predict(items("a", 1)))
    # Wait (in a thread, not by sleeping) until the first batch is inside the predictor.
    assert await asyncio.to_thread(p.started.wait, 5.0)
    later = [asyncio.create_task(b.predict(items(f"b{k}-", k + 1))) for k in range(3)]
    await asyncio.sleep(0)  # a bare yield: let the three calls enqueue behind the running batch
    assert b.batches == 0 and p.batches == [["a0"]]
    gate.set()
    results = await asyncio.gather(first, *later)
    assert p.batches == [["a0"], ["b0-0", "b1-0", "b1-1", "b2-0", "b2-1", "b2-2"]]
    assert [[x.predicted_tokens for x in r] for r in results] == [[1], [1], [1, 2], [1, 2, 3]]
    assert (b.batches, b.items) == (2, 7)


async def test_batcher_batches_concurrent_calls_and_returns_each_its_own() -> None:
    p = RecordingPredictor()
    b = MicroBatcher(p)
    sizes = [3, 1, 2]
    results = await asyncio.gather(*(b.predict(items(f"c{k}-", n, "y")) for k, n in enumerate(sizes)))
    assert len(p.batches) == 1 and len(p.batches[0]) == 6
    for n, res in zip(sizes, results, strict=True):
        assert [x.predicted_tokens for x in res] == [float(i + 1) for i in range(n)]
        assert all(x.predictor == "recording@0" for x in res)


async def test_batcher_respects_max_batch() -> None:
    p = RecordingPredictor()
    b = MicroBatcher(p, max_batch=3)
    sizes = [2, 2, 1, 3, 1, 5]
    results = await asyncio.gather(*(b.predict(items(f"d{k}-", n)) for k, n in enumerate(sizes)))
    # Whole calls are never split; a call larger than max_batch runs alone.
    assert [len(batch) for batch in p.batches] == [2, 3, 3, 1, 5]
    assert [len(r) for r in results] == sizes
    assert [[x.predicted_tokens for x in r] for r in results][3] == [1.0, 2.0, 3.0]
    assert b.batches == 5 and b.items == sum(sizes)


async def test_batcher_error_reaches_every_caller_of_the_batch_then_recovers() -> None:
    p = RecordingPredictor()
    b = MicroBatcher(p)
    outcome = await asyncio.gather(
        b.predict([item("ok1")]),
        b.predict([item("bad", text="boom")]),
        b.predict([item("ok2")]),
        return_exceptions=True,
    )
    assert len(p.batches) == 1
    assert all(isinstance(o, RuntimeError) for o in outcome)
    assert outcome[0] is outcome[1] is outcome[2]
    assert b.batches == 0  # failed batches are not counted
    (pred,) = await b.predict([item("after", text="abcd")])
    assert pred.predicted_tokens == 4.0 and b.batches == 1


async def test_batcher_error_does_not_affect_the_next_batch_of_the_same_drain() -> None:
    p = RecordingPredictor()
    b = MicroBatcher(p, max_batch=1)
    bad, good = await asyncio.gather(
        b.predict([item("bad", text="boom")]), b.predict([item("good", text="zz")]), return_exceptions=True
    )
    assert isinstance(bad, RuntimeError)
    assert isinstance(good, list) and good[0].predicted_tokens == 2.0
    assert p.batches == [["bad"], ["good"]]


@pytest.mark.parametrize("offload", [False, True])
async def test_batcher_offload_runs_the_predictor_in_a_thread(offload: bool) -> None:
    p = RecordingPredictor()
    b = MicroBatcher(p, executor=ThreadPoolExecutor(1) if offload else None)
    (pred,) = await b.predict([item("t", text="abc")])
    assert pred.predicted_tokens == 3.0
    await b.predict([item("u", text="abcd")])
    loop_thread = threading.get_ident()
    assert (p.threads[0] != loop_thread) is offload
    assert p.threads[0] == p.threads[1]  # every batch on the same thread (torch is faster that way)


async def test_batcher_with_the_median_predictor() -> None:
    b = MicroBatcher(MedianLengthPredictor(EDGES, priors_tokens={"m1": 500.0, "m2": 20.0}))
    r1, r2 = await asyncio.gather(b.predict([item("a", "m1")]), b.predict([item("b", "m2")]))
    assert (r1[0].length_class, r2[0].length_class) == (3, 0)
    assert b.batches == 1


class SleepyPredictor(RecordingPredictor):
    """A RecordingPredictor that costs a fixed CPU time per item (a slow model)."""

    def __init__(self, name: str, s_per_item: float) -> None:
        super().__init__()
        self.name = name
        self.s_per_item = s_per_item

    def predict(self, items: Sequence[PredictItem]) -> list[Prediction]:
        """Spin on the CPU, then predict like RecordingPredictor."""
        end = time.thread_time() + self.s_per_item * len(items)
        while time.thread_time() < end:
            pass
        return super().predict(items)


async def test_batcher_sheds_a_burst_to_the_overflow_predictor_and_answers_everyone() -> None:
    slow, fast = SleepyPredictor("slow", 0.05), SleepyPredictor("fast", 0.0)
    b = MicroBatcher(slow, executor=ThreadPoolExecutor(1), overflow=fast, max_wait_ms=120.0)
    # Alone, a call goes to the main predictor (which also measures its cost: 50 ms an item).
    (first,) = await b.predict([item("solo")])
    assert first.predictor == "slow@0" and b.shed == 0
    # A burst of 12 one-item calls: the main predictor takes what it can start within 120 ms.
    burst = await asyncio.gather(*(b.predict([item(f"burst{k}", text="x" * (k + 1))]) for k in range(12)))
    by = [r[0].predictor for r in burst]
    assert len(burst) == 12 and all(len(r) == 1 for r in burst)
    assert [r[0].predicted_tokens for r in burst] == [float(k + 1) for k in range(12)]  # each its own
    assert 0 < by.count("slow@0") <= 4 and by.count("fast@0") == b.shed == 12 - by.count("slow@0")
    assert max(len(batch) for batch in slow.batches) <= 2  # no batch longer than the wait allows
    # Once the burst is over, calls go to the main predictor again.
    (after,) = await b.predict([item("after")])
    assert after.predictor == "slow@0"


async def test_batcher_without_overflow_never_sheds() -> None:
    slow = SleepyPredictor("slow", 0.02)
    b = MicroBatcher(slow, executor=ThreadPoolExecutor(1), max_wait_ms=1.0)
    await b.predict([item("warm")])
    burst = await asyncio.gather(*(b.predict([item(f"k{k}")]) for k in range(6)))
    assert all(r[0].predictor == "slow@0" for r in burst) and b.shed == 0


async def test_batcher_keeps_the_main_predictor_within_its_busy_share() -> None:
    slow, fast = SleepyPredictor("slow", 0.02), SleepyPredictor("fast", 0.0)
    b = MicroBatcher(
        slow, executor=ThreadPoolExecutor(1), overflow=fast, max_wait_ms=10_000.0, max_busy_share=0.1
    )
    t0 = time.monotonic()
    out = [(await b.predict([item(f"s{k}")]))[0].predictor for k in range(100)]
    elapsed = time.monotonic() - t0
    assert len(out) == 100 and b.shed == out.count("fast@0") > 0
    # The bucket starts full (1 s) and refills at 10% of the time; one batch may overdraw it.
    assert out.count("slow@0") * 0.02 <= 1.0 + 0.1 * elapsed + 0.1
    assert out[0] == "slow@0"  # an idle service answers with the main predictor
    with pytest.raises(ValueError, match="max_busy_share"):
        MicroBatcher(slow, max_busy_share=0.0)


def test_the_overflow_is_the_minilm_artifact_in_int8_and_none_for_a_median_primary() -> None:
    from services.common.settings import Settings
    from services.predictor.proxy import ProxyLengthPredictor
    from services.predictor.service import build_overflow, median_baseline

    settings = Settings()
    assert build_overflow(settings, median_baseline(settings)) is None  # nothing cheaper to shed to
    overflow = build_overflow(settings, ProxyLengthPredictor.load())
    assert isinstance(overflow, ProxyLengthPredictor)
    assert overflow.name == "proxy-minilm" and overflow.int8  # shedding load: its cheapest form
