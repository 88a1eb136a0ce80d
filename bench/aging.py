"""`muserve bench aging`: the mean-vs-tail frontier of SSJF's starvation bound, in the simulator.

The live replay (`muserve bench replay`) runs ~100 requests per policy: enough to show SSJF beating
FCFS, far too few to tune the aging factor (run-to-run noise is larger than the effect). This study
asks the simulator instead, with the replay's own setting: one worker with 2 slots whose step model is
calibrated from the real engine (SmolLM2, 4 layers, bf16, as `muserve calibrate`), AlpacaEval prompt
lengths with one LLM's answer lengths (capped at 512), Azure conversation inter-arrival gaps rescaled
to a load factor, the shipped predictor's confusion matrix for SSJF and true lengths for the oracle.
For each aging factor it reports mean and p99 JCT relative to FCFS on the same arrivals (median over
seeds): how much mean JCT each tail bound buys. Everything here is SIMULATED.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, write_json

AGING = (2.0, 4.0, 6.0, 8.0, 12.0, 16.0)
LENGTHS = ("vicuna-13b", "text_davinci_003")
P99_TARGET = 1.2  # issue 4: SSJF p99 JCT <= 1.2 x FCFS
PROMPT_TEMPLATE_TOKENS = 30  # the chat template around a user message, in SmolLM2 tokens


def _lengths(
    data: Any, prompt_tokens: dict[Any, int], model: str, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens incl. the chat template, answer tokens capped) of every prompt `model` answered."""
    if model not in data.models:
        raise ValueError(f"no lengths for model {model!r} in the data")
    sel = data.cols == data.models.index(model)
    prompts = np.array(
        [max(prompt_tokens.get(data.prompt_ids[r], 1), 1) + PROMPT_TEMPLATE_TOKENS for r in data.rows[sel]]
    )
    return prompts.astype(np.int64), np.minimum(data.tokens[sel], max_len).astype(np.int64)


def run_aging(
    *,
    data_dir: Path,
    out_dir: Path,
    lengths_models: tuple[str, ...] = LENGTHS,
    aging: tuple[float, ...] = AGING,
    load: float = 0.9,
    requests: int = 2000,
    seeds: int = 3,
    max_len: int = 512,
    max_seqs: int = 2,
    layers: int | None = 4,
    calibration: Path | None = None,
    command: str = "muserve bench aging",
    echo: Any = print,
) -> dict[str, Any]:
    """Simulate FCFS, SSJF and oracle SJF at each aging factor; write sim-aging.{json,md,png}."""
    from services.common.settings import Settings
    from services.powerd.sim_gpu import get_profile
    from services.predictor.data import load_length_data, read_prompt_tokens
    from services.sim.calibrate import calibrate_worker
    from services.sim.engine import SimConfig, simulate
    from services.sim.predictor import load_confusion_predictor
    from services.sim.step_model import StepModel
    from services.sim.workload import Workload, load_azure_csv

    started = time.monotonic()
    # Read once (every length set is a column of the same table), and reject unknown LLMs before the
    # calibration's minute of work.
    data = load_length_data(data_dir)
    prompt_tokens = read_prompt_tokens(data_dir)
    unknown = [m for m in lengths_models if m not in data.models]
    if unknown:
        raise ValueError(f"no lengths for model(s) {unknown} in {data_dir}")
    if calibration is None:
        echo(f"calibrating the worker engine ({layers or 30} layers, {max_seqs} slots) ...")
        with tempfile.TemporaryDirectory(prefix="muserve-aging-") as tmp:
            path = Path(tmp) / "calibration.json"
            calibrate_worker(
                path,
                cache_dir=Settings().cache,
                num_hidden_layers=layers,
                max_seqs=max_seqs,
                show_progress=False,
                log=lambda _m: None,
            )
            step_model = StepModel.from_json(path)
    else:
        step_model = StepModel.from_json(calibration)
    predictor = load_confusion_predictor(None)
    gaps = np.diff(load_azure_csv(data_dir / "AzureLLMInferenceTrace_conv.csv").arrival_s)
    base = SimConfig(
        profile=get_profile("V100"), step_model=step_model, gpus=1, slots=max_seqs, clock_policy="max-clock"
    )
    results: dict[str, Any] = {}
    for model in lengths_models:
        prompts, answers = _lengths(data, prompt_tokens, model, max_len)
        runs: dict[str, list[dict[str, float]]] = {}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            pick = rng.integers(0, len(answers), requests)
            p, o = prompts[pick], answers[pick]
            # Capacity: every slot decoding at the mean context, as the replay's calibration measures it.
            ctx = float(np.mean(p + o / 2.0))
            capacity_rps = (
                max_seqs / step_model.decode_ms(max_seqs, max_seqs * ctx) * 1000.0 / float(o.mean())
            )
            arrival = np.concatenate([[0.0], np.cumsum(gaps[rng.integers(0, len(gaps), requests - 1)])])
            arrival *= (requests / (load * capacity_rps)) / arrival[-1]
            w = Workload(f"{model} x azure-conv gaps", arrival, p, o)
            cfg = replace(base, seed=seed)
            fcfs = simulate(w, replace(cfg, scheduling="fcfs"), predictor)
            ref_mean, ref_p99 = float(fcfs.jct_ms.mean()), float(np.percentile(fcfs.jct_ms, 99))
            runs.setdefault("fcfs", []).append({"mean_ratio": 1.0, "p99_ratio": 1.0, "mean_jct_ms": ref_mean})
            for sched in ("ssjf", "oracle"):
                for a in aging:
                    r = simulate(w, replace(cfg, scheduling=sched, aging_factor=a), predictor)
                    runs.setdefault(f"{sched}@{a:g}", []).append(
                        {
                            "mean_ratio": float(r.jct_ms.mean()) / ref_mean,
                            "p99_ratio": float(np.percentile(r.jct_ms, 99)) / ref_p99,
                            "mean_jct_ms": float(r.jct_ms.mean()),
                        }
                    )
        summary: dict[str, dict[str, Any]] = {
            k: {
                "mean_ratio": statistics.median(x["mean_ratio"] for x in v),
                "p99_ratio": statistics.median(x["p99_ratio"] for x in v),
                "mean_ratio_runs": [round(x["mean_ratio"], 4) for x in v],
                "p99_ratio_runs": [round(x["p99_ratio"], 4) for x in v],
            }
            for k, v in runs.items()
        }
        best: dict[str, float | None] = {}
        for sched in ("ssjf", "oracle"):
            within = [a for a in aging if summary[f"{sched}@{a:g}"]["p99_ratio"] <= P99_TARGET]
            ratios = {a: float(summary[f"{sched}@{a:g}"]["mean_ratio"]) for a in within}
            best[sched] = min(ratios, key=ratios.__getitem__) if ratios else None
        results[model] = {
            "summary": summary,
            "best_within_p99_target": best,
            "mean_answer_tokens": float(answers.mean()),
        }
        echo(
            f"{model}: "
            + ", ".join(
                f"{s}@{b:g} {summary[f'{s}@{b:g}']['mean_ratio']:.3f}"
                for s, b in best.items()
                if b is not None
            )
        )
    report = {
        "meta": {
            "machine": machine_info(),
            "command": command,
            "simulated": True,
            "load": load,
            "requests": requests,
            "seeds": seeds,
            "max_len": max_len,
            "slots": max_seqs,
            "aging": list(aging),
            "step_model": step_model.to_dict(),
            "predictor": predictor.source,
            "p99_target": P99_TARGET,
            "wall_s": round(time.monotonic() - started, 1),
        },
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sim-aging.json", report)
    (out_dir / "sim-aging.md").write_text(markdown(report))
    plot(report, out_dir / "sim-aging.png")
    echo(f"wrote {out_dir / 'sim-aging.md'}")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report."""
    m = report["meta"]
    lines = [
        "# SSJF's aging bound: mean JCT bought per unit of tail (SIMULATED)",
        "",
        f"Produced {m['machine']['date']} on {m['machine']['cpu']}, commit `{m['machine']['commit']}`, in "
        f"{m['wall_s']:.0f} s, by `{m['command']}`. **Simulated**: `muserve sim`'s engine with the live "
        f"queue classes, one worker with {m['slots']} slots, step model {m['step_model']['source']}; "
        f"{m['requests']} requests per run at load {m['load']:g} (Azure conversation inter-arrival gaps, "
        f"rescaled), AlpacaEval prompt lengths with one LLM's answer lengths capped at {m['max_len']}; SSJF "
        f"gets predicted classes from the predictor's confusion matrix ({m['predictor']}), the oracle the "
        f"true lengths. Ratios are against FCFS on the same arrivals, medians over {m['seeds']} seeds "
        "(per-seed values in the JSON). A request is promoted after waiting aging x its predicted exec time "
        "(or 60 s); promoted requests go earliest deadline first.",
        "",
    ]
    for model, res in report["results"].items():
        s = res["summary"]
        lines += [
            f"## {model} (mean answer {res['mean_answer_tokens']:.0f} tokens)",
            "",
            "| aging factor | SSJF mean / FCFS | SSJF p99 / FCFS | oracle mean / FCFS | oracle p99 / FCFS |",
            "|---|---|---|---|---|",
        ]
        for a in m["aging"]:
            ss, oo = s[f"ssjf@{a:g}"], s[f"oracle@{a:g}"]
            lines.append(
                f"| {a:g} | {ss['mean_ratio']:.3f} | {ss['p99_ratio']:.3f} | {oo['mean_ratio']:.3f} | "
                f"{oo['p99_ratio']:.3f} |"
            )
        best = res["best_within_p99_target"]
        lines += [
            "",
            "Best mean with p99 <= "
            f"{m['p99_target']:g}x FCFS: "
            + ", ".join(
                f"{k} aging {v:g} ({s[f'{k}@{v:g}']['mean_ratio']:.3f}x)" if v is not None else f"{k}: none"
                for k, v in best.items()
            )
            + ".",
            "",
        ]
    lines += ["![mean vs p99 JCT ratio per aging factor](sim-aging.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean-JCT ratio against p99 ratio, one point per aging factor, per length set and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        s = report["results"][model]["summary"]
        for sched, color in (("ssjf", "tab:blue"), ("oracle", "tab:green")):
            xs = [s[f"{sched}@{a:g}"]["p99_ratio"] for a in report["meta"]["aging"]]
            ys = [s[f"{sched}@{a:g}"]["mean_ratio"] for a in report["meta"]["aging"]]
            ax.plot(xs, ys, "o-", color=color, label=sched)
            for a, x, y in zip(report["meta"]["aging"], xs, ys, strict=True):
                ax.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(report["meta"]["p99_target"], color="grey", ls="--", lw=1)
        ax.axhline(0.6, color="tab:red", ls=":", lw=1, label="0.6x target")
        ax.plot([1.0], [1.0], "ks", label="fcfs")
        ax.set_xlabel("p99 JCT / FCFS")
        ax.set_ylabel("mean JCT / FCFS")
        ax.set_title(f"{model} (SIMULATED)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
