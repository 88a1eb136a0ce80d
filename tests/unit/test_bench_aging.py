"""`muserve bench aging`: the simulated aging-factor study writes a coherent report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.aging import run_aging
from services.powerd.sensitivity import get_model_shape
from services.powerd.sim_gpu import get_profile
from services.sim.step_model import StepModel
from tests.shared_data import SHARED_DATA, needs_shared_data

pytestmark = needs_shared_data("AzureLLMInferenceTrace_conv.csv")


def test_aging_study_compares_against_fcfs_on_the_same_arrivals(tmp_path: Path) -> None:
    cal = tmp_path / "cal.json"
    steps = StepModel.roofline(get_model_shape("llama-3.2-3b"), get_profile("V100"))
    cal.write_text(json.dumps(steps.to_dict()))
    report = run_aging(
        data_dir=SHARED_DATA,
        out_dir=tmp_path,
        lengths_models=("text_davinci_003",),
        aging=(2.0, 16.0),
        requests=300,
        seeds=2,
        calibration=cal,
        echo=lambda _m: None,
    )
    res = report["results"]["text_davinci_003"]["summary"]
    assert res["fcfs"]["mean_ratio"] == 1.0
    for key in ("ssjf@2", "ssjf@16", "oracle@2", "oracle@16"):
        assert len(res[key]["mean_ratio_runs"]) == 2 and res[key]["mean_ratio"] > 0
    # A looser bound lets the oracle reorder more: its mean JCT can only improve on this skewed workload.
    assert res["oracle@16"]["mean_ratio"] <= res["oracle@2"]["mean_ratio"] + 0.02
    md = (tmp_path / "sim-aging.md").read_text()
    assert "SIMULATED" in md and "| 16 |" in md
    assert (tmp_path / "sim-aging.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no lengths"):
        run_aging(data_dir=SHARED_DATA, out_dir=tmp_path, lengths_models=("nope",), calibration=cal)
