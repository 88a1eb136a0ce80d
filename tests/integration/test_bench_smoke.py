"""`muserve bench overhead` runs end to end and writes its three reports (tiny run; no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.overhead import run_overhead


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
