"""ContinuousBatchingEngine on the real SmolLM2 weights (2 layers for speed, 30 for one end-to-end check)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.engine import (
    ContinuousBatchingEngine,
    SamplingParams,
    SeqRequest,
    StepStats,
    TokenEvent,
)
from services.worker.models import ensure_smollm2, load_causal_lm

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain shortest-job-first scheduling in one sentence, then give an example with three jobs.",
    "Hi",
    "List three colours.",
]


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_smollm2(Path(os.environ.get("MUSERVE_CACHE") or "~/.cache/muserve").expanduser())


@pytest.fixture(scope="module")
def small(smol_dir: Path) -> tuple[Any, Any]:
    """First 2 real layers in fp32: nonsense text, but fast and exact enough to compare with generate()."""
    return load_causal_lm(smol_dir, dtype="float32", num_hidden_layers=2)


def chat_ids(tok: Any, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def reference(model: Any, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy tokens from model.generate(), cut after the first EOS as the engine does."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :]
    toks: list[int] = out.tolist()
    for i, t in enumerate(toks):
        if t in eos:
            return toks[: i + 1]
    return toks


class Run:
    """Drives an engine, adding requests at given steps and collecting everything it reports."""

    def __init__(self, engine: ContinuousBatchingEngine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.events: dict[str, list[TokenEvent]] = {}
        self.stats: list[list[StepStats]] = []
        self.step_no = 0

    def step(self) -> list[TokenEvent]:
        events, stats = self.engine.step()
        self.stats.append(stats)
        for e in events:
            self.tokens.setdefault(e.request_id, []).extend(e.token_ids)
            self.text[e.request_id] = self.text.get(e.request_id, "") + e.text
            self.events.setdefault(e.request_id, []).append(e)
        self.step_no += 1
        return events

    def run(self, schedule: dict[int, list[SeqRequest]] | None = None, max_steps: int = 500) -> Run:
        schedule = dict(schedule or {})
        while (schedule or self.engine.has_work) and self.step_no < max_steps:
            for req in schedule.pop(self.step_no, []):
                self.engine.add(req)
            self.step()
        assert not self.engine.has_work
        return self

    def final(self, rid: str) -> TokenEvent:
        last = self.events[rid][-1]
        assert last.finished and all(not e.finished for e in self.events[rid][:-1])
        return last


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_join_at_different_steps_matches_generate(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_seqs=3)
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    assert tok.decode(prompts[0]).endswith("<|im_start|>assistant\n")  # chat template works
    max_tokens = [14, 6, 18, 10, 12]
    join_at = [0, 1, 3, 4, 7]  # max_seqs=3: the last ones wait for a slot
    schedule: dict[int, list[SeqRequest]] = {}
    for i, (p, n, s) in enumerate(zip(prompts, max_tokens, join_at, strict=True)):
        schedule.setdefault(s, []).append(SeqRequest(f"r{i}", p, greedy(n)))
    run = Run(engine).run(schedule)

    for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        rid = f"r{i}"
        ref = reference(model, p, n, set(engine.eos_token_ids))
        assert run.tokens[rid] == ref, rid
        last = run.final(rid)
        assert last.finish_reason == ("stop" if ref[-1] in engine.eos_token_ids else "length")
        assert last.num_output_tokens == len(ref) and last.num_prompt_tokens == len(p)
        # Deltas concatenate to the final decoded text.
        assert run.text[rid] == tok.decode(ref, skip_special_tokens=True)

    # StepStats sanity: one batch-1 prefill per request, decode batches never above max_seqs.
    flat = [s for step in run.stats for s in step]
    prefills = [s for s in flat if s.kind == "prefill"]
    decodes = [s for s in flat if s.kind == "decode"]
    assert sorted(s.request_ids[0] for s in prefills) == [f"r{i}" for i in range(5)]
    for pf in prefills:
        idx = int(pf.request_ids[0][1:])
        assert pf.batch_size == 1 and pf.num_tokens == pf.context_tokens == len(prompts[idx])
    assert {s.kind for s in flat} == {"prefill", "decode"}
    assert all(1 <= s.batch_size <= 3 and s.num_tokens == s.batch_size == len(s.request_ids) for s in decodes)
    assert max(s.batch_size for s in decodes) == 3
    assert all(s.latency_ms > 0 for s in flat)
    # A step prefills newcomers or decodes, never both: r0 (step 0) and r1 (step 1) first decode together.
    assert all(len({s.kind for s in step}) == 1 for step in run.stats if step)
    d0 = decodes[0]
    assert d0.request_ids == ("r0", "r1")
    # Decode context = prompt + tokens generated so far, summed over rows.
    assert d0.context_tokens == len(prompts[0]) + 1 + len(prompts[1]) + 1


def test_short_request_leaves_between_steps(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_seqs=2, eos_token_ids=set())
    a, b, c = (chat_ids(tok, p) for p in PROMPTS[:3])
    engine.add(SeqRequest("short", a, greedy(3)))
    engine.add(SeqRequest("long", b, greedy(12)))
    engine.add(SeqRequest("late", c, greedy(4)))
    assert (engine.num_running, engine.num_waiting) == (0, 3)
    run = Run(engine)
    run.step()  # prefill: 1 token each for short and long
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    run.step()  # decode: 2 tokens each
    run.step()  # short reaches 3 tokens and leaves; long keeps going
    assert run.final("short").finish_reason == "length" and len(run.tokens["short"]) == 3
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    run.step()  # late takes the freed slot while long is mid-generation
    assert engine.num_running == 2 and "late" in run.tokens and not run.events["long"][-1].finished
    run.run()
    assert len(run.tokens["long"]) == 12 and len(run.tokens["late"]) == 4
    assert run.tokens["long"] == reference(model, b, 12, set())
    assert run.tokens["late"] == reference(model, c, 4, set())
    assert [s.batch_size for s in run.stats[1] if s.kind == "decode"] == [2]


def test_first_token_comes_from_prefill(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok)
    engine.add(SeqRequest("one", chat_ids(tok, "Hi"), greedy(1, ignore_eos=True)))
    run = Run(engine).run()
    assert [s.kind for s in run.stats[0]] == ["prefill"]  # finished at prefill: no decode row
    assert run.final("one").finish_reason == "length" and len(run.tokens["one"]) == 1


def test_eos_stops_unless_ignore_eos(small: tuple[Any, Any]) -> None:
    model, tok = small
    prompt = chat_ids(tok, PROMPTS[0])
    free = reference(model, prompt, 12, set())
    # Declare the 3rd greedy token an EOS token: the sequence stops there unless ignore_eos.
    eos = {free[2]}
    engine = ContinuousBatchingEngine(model, tok, eos_token_ids=eos)
    engine.add(SeqRequest("eos", prompt, greedy(12)))
    engine.add(SeqRequest("replay", prompt, greedy(12, ignore_eos=True)))
    run = Run(engine).run()
    first = free.index(free[2])
    assert run.tokens["eos"] == free[: first + 1] and run.final("eos").finish_reason == "stop"
    assert run.tokens["replay"] == free and run.final("replay").finish_reason == "length"
    assert run.final("replay").num_output_tokens == 12


def _prefix_texts(tok: Any, toks: list[int]) -> list[str]:
    return [tok.decode(toks[:k], skip_special_tokens=True) for k in range(len(toks) + 1)]


def test_stop_string_truncates_output(small: tuple[Any, Any]) -> None:
    model, tok = small
    prompt = chat_ids(tok, PROMPTS[1])
    free = reference(model, prompt, 16, set())
    texts = _prefix_texts(tok, free)
    full = texts[-1]
    # A stop string spanning the text of tokens 4 and 5.
    stop = full[len(texts[4]) : len(texts[6])]
    assert stop
    at = full.find(stop)
    n_expected = next(k for k, t in enumerate(texts) if stop in t)
    engine = ContinuousBatchingEngine(model, tok, eos_token_ids=set())
    engine.add(SeqRequest("s", prompt, greedy(16, stop=(stop, "never-matches"))))
    run = Run(engine).run()
    assert run.final("s").finish_reason == "stop"
    assert run.text["s"] == full[:at]
    assert run.tokens["s"] == free[:n_expected]


def test_stop_string_prefix_is_held_back(small: tuple[Any, Any]) -> None:
    model, tok = small
    prompt = chat_ids(tok, PROMPTS[1])
    free = reference(model, prompt, 10, set())
    texts = _prefix_texts(tok, free)
    k = next(k for k in range(3, 9) if len(texts[k + 1]) > len(texts[k]) and texts[k + 2] != texts[k + 1])
    # Text of token k followed by something that never comes: a prefix of the stop string while token k
    # is the last one, so it must be held back, then released once token k+1 shows it is no stop string.
    stop = texts[k + 1][len(texts[k]) :] + "\x00"
    engine = ContinuousBatchingEngine(model, tok, eos_token_ids=set())
    engine.add(SeqRequest("h", prompt, greedy(10, stop=(stop,))))
    run = Run(engine)
    emitted_after: dict[int, str] = {}
    while engine.has_work:
        run.step()
        emitted_after[len(run.tokens["h"])] = run.text["h"]
    assert emitted_after[k + 1] == texts[k]  # held back
    assert emitted_after[k + 2].startswith(texts[k + 1])  # released
    assert run.final("h").finish_reason == "length" and run.text["h"] == texts[-1]


def test_seed_gives_same_output_alone_and_in_batch(small: tuple[Any, Any]) -> None:
    model, tok = small
    prompt = chat_ids(tok, PROMPTS[0])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = ContinuousBatchingEngine(model, tok, seed=1)
    alone.add(SeqRequest("x", prompt, params))
    solo = Run(alone).run().tokens["x"]

    batched = ContinuousBatchingEngine(model, tok, max_seqs=4, seed=2)
    others = [chat_ids(tok, p) for p in PROMPTS[2:5]]
    schedule = {
        0: [SeqRequest("o0", others[0], SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))],
        2: [SeqRequest("x", prompt, params)],
        3: [
            SeqRequest("o1", others[1], greedy(5)),
            SeqRequest("o2", others[2], SamplingParams(max_tokens=8, temperature=0.7, seed=9)),
        ],
    }
    run = Run(batched).run(schedule)
    assert run.tokens["x"] == solo
    different = ContinuousBatchingEngine(model, tok)
    different.add(SeqRequest("x", prompt, dataclasses.replace(params, seed=4321)))
    assert Run(different).run().tokens["x"] != solo


def test_top_p_tiny_is_greedy_and_params_validated(small: tuple[Any, Any]) -> None:
    model, tok = small
    prompt = chat_ids(tok, PROMPTS[3])
    engine = ContinuousBatchingEngine(model, tok, eos_token_ids=set())
    engine.add(SeqRequest("nucleus1", prompt, SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6)))
    engine.add(SeqRequest("greedy", prompt, greedy(8, seed=3)))  # a seed does not matter at temperature 0
    run = Run(engine).run()
    assert run.tokens["nucleus1"] == run.tokens["greedy"] == reference(model, prompt, 8, set())
    cases: list[tuple[dict[str, Any], str]] = [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ]
    for bad, field in cases:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    assert SamplingParams(stop="\n").stop == ("\n",)  # type: ignore[arg-type]


def test_sampling_stays_in_vocab_and_differs_from_greedy(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_seqs=4, seed=0)
    prompt = chat_ids(tok, PROMPTS[2])
    for i in range(4):
        engine.add(
            SeqRequest(f"s{i}", prompt, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
        )
    run = Run(engine).run()
    outs = [tuple(run.tokens[f"s{i}"]) for i in range(4)]
    assert all(len(o) == 10 and all(0 <= t < model.config.vocab_size for t in o) for o in outs)
    assert len(set(outs)) > 1  # unseeded rows draw from the shared generator, not the same stream


def test_abort_waiting_and_running(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_seqs=2, eos_token_ids=set())
    prompt = chat_ids(tok, PROMPTS[0])
    for rid in ("a", "b", "c"):
        engine.add(SeqRequest(rid, prompt, greedy(20)))
    run = Run(engine)
    run.step()
    assert (engine.num_running, engine.num_waiting, engine.free_slots) == (2, 1, 0)
    assert engine.abort("c") is True and engine.abort("c") is False  # waiting
    assert engine.abort("a") is True and engine.abort("a") is False  # running
    assert engine.abort("nope") is False
    assert (engine.num_running, engine.num_waiting, engine.free_slots) == (1, 0, 1)
    events = run.step()
    aborted = {e.request_id: e for e in events if e.finish_reason == "abort"}
    assert set(aborted) == {"a", "c"}
    assert aborted["a"].num_output_tokens == 1 and aborted["a"].token_ids == [] and aborted["a"].finished
    assert aborted["c"].num_output_tokens == 0
    assert engine.num_running == 1
    # The surviving row is unaffected by the removal of its neighbour.
    run.run()
    assert run.tokens["b"] == reference(model, prompt, 20, set())
    assert engine.abort("b") is False and not engine.has_work
    assert engine.free_slots == 2


def test_free_slots_accounting(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_seqs=3, eos_token_ids=set())
    prompt = chat_ids(tok, "Hi")
    assert engine.free_slots == 3 and not engine.has_work
    engine.add(SeqRequest("a", prompt, greedy(2)))
    engine.add(SeqRequest("b", prompt, greedy(5)))
    assert (engine.free_slots, engine.num_waiting, engine.num_running) == (1, 2, 0)
    assert engine.has_work
    engine.step()  # prefill: one token each
    assert (engine.free_slots, engine.num_waiting, engine.num_running) == (1, 0, 2)
    engine.step()  # decode: a finishes with 2 tokens
    assert (engine.free_slots, engine.num_waiting, engine.num_running) == (2, 0, 1)
    for rid in "cdef":
        engine.add(SeqRequest(rid, prompt, greedy(2)))
    assert engine.free_slots == 0 and engine.num_waiting == 4  # never negative
    engine.step()
    assert engine.num_running <= 3
    Run(engine).run()
    assert engine.free_slots == 3


def test_add_validation(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, max_context_tokens=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add(SeqRequest("e", [], greedy(4)))
    with pytest.raises(ValueError, match="context window of 64"):
        engine.add(SeqRequest("long", [5] * 60, greedy(5)))
    with pytest.raises(ValueError, match=r"\[0, 49152\)"):
        engine.add(SeqRequest("oov", [5, 49152], greedy(4)))
    engine.add(SeqRequest("ok", [5] * 59, greedy(5)))  # exactly fits
    with pytest.raises(ValueError, match="already"):
        engine.add(SeqRequest("ok", [5], greedy(1)))
    assert engine.num_waiting == 1
    Run(engine).run()


class _FailingModel:
    """Wraps a model and raises on prefill of prompts of one specific length."""

    def __init__(self, model: Any, bad_len: int) -> None:
        self.model, self.bad_len = model, bad_len
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device

    def __call__(self, **kw: Any) -> Any:
        if kw["input_ids"].shape[1] == self.bad_len:
            raise RuntimeError("simulated out of memory")
        return self.model(**kw)


def test_prefill_failure_finishes_only_that_request(small: tuple[Any, Any]) -> None:
    model, tok = small
    good, bad = chat_ids(tok, PROMPTS[0]), chat_ids(tok, PROMPTS[2])
    engine = ContinuousBatchingEngine(_FailingModel(model, len(bad)), tok, eos_token_ids=set())
    run = Run(engine).run({0: [SeqRequest("good", good, greedy(8))], 2: [SeqRequest("bad", bad, greedy(8))]})
    last = run.final("bad")
    assert last.finish_reason == "error" and "simulated out of memory" in (last.error or "")
    assert run.tokens["good"] == reference(model, good, 8, set())


class _DecodeFailsOnce:
    """Wraps a model and raises on its n-th decode call (a half-updated cache must be discarded)."""

    def __init__(self, model: Any, fail_at: int) -> None:
        self.model, self.fail_at, self.decodes = model, fail_at, 0
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device

    def __call__(self, **kw: Any) -> Any:
        if kw["input_ids"].shape[1] == 1:
            self.decodes += 1
            if self.decodes == self.fail_at:
                raise RuntimeError("simulated kernel failure")
        return self.model(**kw)


def test_decode_failure_fails_running_rows_and_engine_recovers(small: tuple[Any, Any]) -> None:
    model, tok = small
    p0, p1 = chat_ids(tok, PROMPTS[0]), chat_ids(tok, PROMPTS[1])
    engine = ContinuousBatchingEngine(_DecodeFailsOnce(model, fail_at=3), tok, eos_token_ids=set())
    engine.add(SeqRequest("a", p0, greedy(10)))
    engine.add(SeqRequest("b", p1, greedy(10)))
    run = Run(engine).run()
    for rid in ("a", "b"):
        assert run.final(rid).finish_reason == "error" and "simulated kernel failure" in (
            run.final(rid).error or ""
        )
        assert run.tokens[rid] == reference(model, [p0, p1][rid == "b"], 10, set())[:3]
    assert engine.num_running == 0 and engine._cache is None
    engine.add(SeqRequest("c", p1, greedy(6)))
    assert Run(engine).run().tokens["c"] == reference(model, p1, 6, set())


def test_full_model_matches_generate(smol_dir: Path) -> None:
    model, tok = load_causal_lm(smol_dir, dtype="float32")
    assert len(model.model.layers) == 30
    engine = ContinuousBatchingEngine(model, tok, max_seqs=3)
    prompts = [chat_ids(tok, p) for p in PROMPTS[:3]]
    schedule = {0: [SeqRequest("q0", prompts[0], greedy(12))], 2: [SeqRequest("q1", prompts[1], greedy(12))]}
    schedule[3] = [SeqRequest("q2", prompts[2], greedy(12))]
    run = Run(engine).run(schedule)
    for i, p in enumerate(prompts):
        assert run.tokens[f"q{i}"] == reference(model, p, 12, set(engine.eos_token_ids)), i
    assert "Paris" in run.text["q0"]
    assert run.final("q0").finish_reason == "stop"  # "The capital of France is Paris.<|im_end|>"


class _ScriptedModel:
    """Emits a fixed token script (indexed by position) and writes dummy KV so the cache surgery runs."""

    def __init__(self, config: Any, prompt_len: int, script: list[int]) -> None:
        self.config, self.prompt_len, self.script = config, prompt_len, script
        self.generation_config, self.device = None, torch.device("cpu")

    def __call__(self, *, input_ids: torch.Tensor, past_key_values: Any, **kw: Any) -> Any:
        b, n = input_ids.shape
        pos = kw.get("position_ids")
        last = pos[:, -1] if pos is not None else torch.full((b,), n - 1)
        for i in range(self.config.num_hidden_layers):
            kv = torch.zeros(b, 1, n, 4)
            past_key_values.update(kv, kv, i)
        nxt = torch.tensor(self.script)[(last + 1 - self.prompt_len).clamp(max=len(self.script) - 1)]
        logits = torch.full((b, 1, self.config.vocab_size), -1e4)
        logits[torch.arange(b), 0, nxt] = 0.0
        return type("Out", (), {"logits": logits})()


def test_incomplete_utf8_is_held_back_and_stop_cuts_text(small: tuple[Any, Any]) -> None:
    model, tok = small
    script = tok.encode("Hi 🙂 there 日本語 END more text")
    assert any(tok.decode(script[:k]).endswith("\ufffd") for k in range(len(script)))  # split characters
    fake = _ScriptedModel(model.config, prompt_len=3, script=script)
    engine = ContinuousBatchingEngine(fake, tok, eos_token_ids=set())
    engine.add(SeqRequest("plain", [1, 2, 3], greedy(len(script))))
    engine.add(SeqRequest("stop", [1, 2, 3], greedy(len(script), stop=("END",))))
    run = Run(engine).run()
    assert run.tokens["plain"] == script and run.text["plain"] == "Hi 🙂 there 日本語 END more text"
    assert run.text["stop"] == "Hi 🙂 there 日本語 " and run.final("stop").finish_reason == "stop"
    for rid in ("plain", "stop"):
        assert all("\ufffd" not in e.text for e in run.events[rid])
        assert len(run.events[rid]) == len(run.tokens[rid])  # one event per token: prefill, then decodes


def test_cache_shrinks_when_long_row_leaves(small: tuple[Any, Any]) -> None:
    model, tok = small
    engine = ContinuousBatchingEngine(model, tok, eos_token_ids=set())
    long_p, short_p = chat_ids(tok, PROMPTS[2]), chat_ids(tok, "Hi")
    engine.add(SeqRequest("long", long_p, greedy(2)))
    engine.add(SeqRequest("short", short_p, greedy(6)))
    engine.step()  # prefill both; the cache is as wide as the long prompt
    assert engine._width() == len(long_p)
    engine.step()  # decode: long finishes with its 2nd token and leaves
    assert engine.num_running == 1
    # Leading all-pad columns were trimmed: the cache holds exactly the short row's context.
    assert engine._width() == len(short_p) + 1
    Run(engine).run()
    assert engine._cache is None
