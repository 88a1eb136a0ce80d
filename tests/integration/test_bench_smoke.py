"""`muserve bench overhead` runs end to end and writes its three reports (tiny run; no timing asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.overhead import run_overhead
from tests.shared_data import SHARED_DATA, needs_shared_data


def test_overhead_bench_writes_json_markdown_png(tmp_path: Path) -> None:
    code = run_overhead(
        [40.0], duration_s=1.0, repeats=1, out_dir=tmp_path, echo=lambda s: None, idle_timeout_s=0
    )
    assert code == 0
    report = json.loads((tmp_path / "overhead.json").read_text())
    for path in ("gateway", "gateway_16tok", "nats_entry", "nats_hop"):
        entry = report["summary"][path]["40"]
        assert entry["errors"] == 0 and entry["requests"] > 10 and entry["p50_ms_median"] > 0
    md = (tmp_path / "overhead.md").read_text()
    assert "| 40 |" in md and "overhead.png" in md
    assert (tmp_path / "overhead.png").stat().st_size > 10_000


@needs_shared_data("alpaca_eval_prompts.jsonl")
def test_replay_runs_the_policies_simultaneously_and_asks_the_predictor_about_the_replayed_llm(
    tmp_path: Path,
) -> None:
    from bench.replay import run_replay

    out = run_replay(
        data_dir=SHARED_DATA,
        out_dir=tmp_path,
        requests=4,
        max_len=12,
        layers=1,
        arrivals="poisson",
        echo=lambda s: None,
        idle_timeout_s=0,
    )
    report = json.loads((tmp_path / "replay.json").read_text())
    assert {r["policy"] for r in report["runs"]} == {"fcfs", "ssjf", "oracle"}
    for r in report["runs"]:
        assert len(r["outcomes"]) == 4 and not any(o["error"] for o in r["outcomes"])
        # The same arrivals and lengths reached every policy.
        assert [(o["idx"], o["tokens"]) for o in r["outcomes"]] == [
            (o["idx"], o["tokens"]) for o in report["runs"][0]["outcomes"]
        ]
    assert all(o["predictor"] for r in report["runs"] for o in r["outcomes"])
    tau = out["summary"]["ssjf"]["rank_tau"]  # NaN when every replayed length hit max_len
    assert math.isnan(tau) or -1.0 <= tau <= 1.0
    (status,) = out["meta"]["predictor_status"]
    # Each policy's model is served under its own name but predicted as vicuna-13b, which it knows.
    assert status["items"] + status["shed"] >= 12 and status["unknown_models"] == []
    md = (tmp_path / "replay.md").read_text()
    assert "ran simultaneously" in md and "SSJF / FCFS mean JCT" in md
    assert (tmp_path / "replay.png").stat().st_size > 10_000
