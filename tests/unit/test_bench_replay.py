"""The replay report's arithmetic: passes pooled per policy, ratios, decode time per token."""

from __future__ import annotations

from typing import Any

import pytest

from bench.replay import Outcome, PolicyRun, markdown, policy_ratios, pooled, summarize

SLO = {
    "solo_ttft_ms": 20.0,
    "solo_ms_per_token": 10.0,
    "tokens_per_s_full": 200.0,
    "calibration_requests": 20.0,
}


def run(policy: str, wait_ms: float, round_: int, per_token_ms: float = 10.0) -> PolicyRun:
    """Four 11-token answers: first token at 50 ms, then `per_token_ms` a token, plus `wait_ms` stalled."""
    outcomes = [
        Outcome(i, 11, float(i), ttft_ms=50.0, jct_ms=50.0 + per_token_ms * 10 + wait_ms) for i in range(4)
    ]
    return PolicyRun(policy, outcomes, depth=[(0.0, 1)], wall_s=10.0, round=round_)


def report_meta(summary: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A replay report's metadata (a 4-request Poisson run), with overrides."""
    ratios = policy_ratios(summary)
    meta = {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "commit": "x"},
        "load_before": 0.1,
        "command": "muserve bench replay",
        "requests": 4,
        "seed": 0,
        "lengths_model": "m",
        "max_len": 512,
        "mean_tokens": 11.0,
        "arrivals": "poisson",
        "load": 0.9,
        "capacity_rps": 1.0,
        "calibration": SLO,
        "worker": "w",
        "predictor": "p",
        "aging_factor": 6.0,
        "slo_scale": 5.0,
        "ratios": ratios,
        "ratios_per_pass": [ratios],
    }
    return {**meta, **overrides}


def test_passes_pool_per_policy_and_ratios_follow() -> None:
    runs = [run("fcfs", 900.0, 0), run("ssjf", 400.0, 0), run("oracle", 300.0, 0)]
    runs += [run("oracle", 300.0, 1), run("ssjf", 600.0, 1), run("fcfs", 900.0, 1, per_token_ms=20.0)]
    ssjf = pooled(runs, "ssjf")
    assert len(ssjf.outcomes) == 8 and ssjf.wall_s == 20.0
    summary = {p: summarize(pooled(runs, p), SLO, 5.0) for p in ("fcfs", "ssjf", "oracle")}
    # Time after the first token over 10 tokens: (10 or 20 ms/token) + 900 ms / 10, averaged over passes.
    assert summary["fcfs"]["decode_ms_per_token"] == pytest.approx(15.0 + 90.0)
    r = policy_ratios(summary)
    assert r["ssjf_fcfs_mean"] == pytest.approx(
        summary["ssjf"]["jct_mean_ms"] / summary["fcfs"]["jct_mean_ms"]
    )
    assert policy_ratios({"fcfs": summary["fcfs"]}) == {}
    meta = report_meta(
        summary,
        command="muserve bench replay --repeats 2",
        ratios_per_pass=[
            policy_ratios({x.policy: summarize(x, SLO, 5.0) for x in runs if x.round == k}) for k in (0, 1)
        ],
    )
    md = markdown(meta, summary)
    assert "2 passes over the policies" in md and "| fcfs |" in md and "ms/token" in md


def test_saturated_throughput_leaves_the_drain_tail_out() -> None:
    from bench.replay import saturated_tokens_per_s

    # Two slots, 10 ms a token, three 100-token answers and one of 1,000 sent at once: the long one
    # decodes alone for its last 9 s, which the burst's plain average would count as capacity.
    burst = [
        Outcome(0, 100, 0.0, ttft_ms=0.0, jct_ms=1000.0),
        Outcome(1, 100, 0.0, ttft_ms=1000.0, jct_ms=2000.0),
        Outcome(2, 100, 0.0, ttft_ms=2000.0, jct_ms=3000.0),
        Outcome(3, 1000, 0.0, ttft_ms=0.0, jct_ms=10000.0),
    ]
    # Cut at 3 s (one left): 300 finished tokens + 3/10 of the long answer = 600 tokens in 3 s.
    assert saturated_tokens_per_s(burst, 2) == pytest.approx(200.0)
    assert sum(o.tokens for o in burst) / 10.0 == pytest.approx(130.0)  # what the plain average says
    assert saturated_tokens_per_s(burst[:2], 2) == pytest.approx(100.0)  # no more answers than slots


def test_simultaneous_mode_runs_every_policy_together_sequential_alternates() -> None:
    from bench.replay import stacks

    assert stacks(("fcfs", "ssjf", "oracle"), "simultaneous", 2) == [
        (0, ("fcfs", "ssjf", "oracle")),
        (1, ("fcfs", "ssjf", "oracle")),
    ]
    assert stacks(("fcfs", "ssjf"), "sequential", 2) == [
        (0, ("fcfs",)),
        (0, ("ssjf",)),
        (1, ("ssjf",)),
        (1, ("fcfs",)),
    ]
    with pytest.raises(ValueError, match="mode"):
        stacks(("fcfs",), "parallel", 1)


def test_report_says_how_policies_ran_and_who_predicted() -> None:
    runs = [run("fcfs", 900.0, 0), run("ssjf", 400.0, 0), run("oracle", 300.0, 0)]
    summary = {r.policy: summarize(r, SLO, 5.0) for r in runs}
    meta = report_meta(
        summary,
        mode="simultaneous",
        repeats=1,
        predictor_status=[{"items": 9, "shed": 3, "unknown_models": ["x"]}],
    )
    md = markdown(meta, summary)
    assert "ran simultaneously" in md and "12 predictions, 3 of them by the cheaper overflow" in md
    assert "not trained for x" in md


def test_unknown_policies_are_rejected_before_anything_starts(tmp_path: object) -> None:
    from pathlib import Path

    from bench.replay import run_replay

    with pytest.raises(ValueError, match="policies"):
        run_replay(data_dir=Path("."), out_dir=Path("."), policies=("fcfs", "lifo"), idle_timeout_s=0)
    with pytest.raises(ValueError, match="mode"):
        run_replay(data_dir=Path("."), out_dir=Path("."), mode="parallel", idle_timeout_s=0)


def test_rank_quality_scores_the_estimates_ssjf_ordered_by() -> None:
    from bench.replay import rank_quality

    outcomes = [
        Outcome(0, 10, 0.0, jct_ms=1.0, score_tokens=12.0, predictor="proxy-smollm2@1.x"),
        Outcome(1, 40, 0.0, jct_ms=1.0, score_tokens=35.0, predictor="proxy-smollm2@1.x"),
        Outcome(2, 90, 0.0, jct_ms=1.0, predicted_tokens=80.0, predictor="fallback-median@1"),
        Outcome(3, 20, 0.0, error="boom", score_tokens=500.0, predictor="proxy-minilm@1.y"),
    ]
    q = rank_quality(outcomes)
    # Errors are left out of the ranking; without a score the class's tokens stand in.
    assert q["rank_tau"] == pytest.approx(1.0)
    assert q["predictors"] == {"fallback-median": 1, "proxy-minilm": 1, "proxy-smollm2": 2}
