"""Split-robust figures: one artifact trained and scored per split seed; mean, spread and range of metrics.

One split puts 161 prompts in test: a metric moves by +-0.02-0.03 with the draw (evaluate()'s bootstrap
intervals), as much as most changes being judged. Training the same recipe on several splits and
averaging the held-out figures says what the recipe gives, not what one split happened to give. A
distilled student gets a teacher trained on its own split (a teacher from another split has seen
its test prompts).

A split takes minutes (SmolLM2 head) to ~25 min (distilled MiniLM student), so a run can be spread
over sessions: a split whose artifact and eval report are already in work_dir is read back, not
retrained (resume), and add=True merges the splits into the report already in out_dir (same recipe).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.common.machine import cpu_model
from services.predictor.evaluate import QUALITY_TARGETS, REPORT, evaluate

CV_REPORT = "predictor-cv"
CV_METRICS = ("accuracy", "within_one", "kendall_tau_per_model")
SMOLLM2 = "smollm2"


def cross_validate(
    data_dir: Path,
    work_dir: Path,
    out_dir: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    encoder: str = SMOLLM2,
    distil: bool = False,
    unlabeled: Sequence[str] = (),
    collected: Sequence[Path] = (),
    teacher_kwargs: dict[str, Any] | None = None,
    add: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train (work_dir/seed<k>) and score one artifact per seed; write out_dir/predictor-cv.{json,md}.

    distil: first train a SmolLM2 teacher on the same split (work_dir/seed<k>-teacher), then the
    student from it with unlabeled prompts and one word-dropout variant each (the shipped recipe).
    train_kwargs go to train() for the artifact under test, teacher_kwargs for the teacher (cache_dir is
    shared). A split already trained and scored in work_dir by this recipe is reused. add: keep the
    other splits of the report in out_dir (refused if its recipe differs).
    """
    from services.predictor.train import train

    if not seeds:
        raise ValueError("need at least one split seed")
    if distil and encoder == SMOLLM2:
        raise ValueError("distil trains a SmolLM2 teacher for a student with another encoder")
    started = time.time()
    recipe: dict[str, Any] = {
        "encoder": encoder,
        "distilled": distil,
        "unlabeled_prompts": len(unlabeled) if distil else 0,
        "train_kwargs": {k: str(v) for k, v in train_kwargs.items()},
    }
    kept: list[dict[str, Any]] = []
    earlier_seconds = 0.0
    if add and (out_dir / f"{CV_REPORT}.json").is_file():
        with open(out_dir / f"{CV_REPORT}.json", encoding="utf-8") as f:
            old = json.load(f)
        differs = {k: (old.get(k), v) for k, v in recipe.items() if old.get(k) != v}
        if differs:
            raise ValueError(f"{out_dir / CV_REPORT}.json has another recipe (theirs, ours): {differs}")
        kept = [f for f in old["folds"] if f["seed"] not in set(seeds)]
        earlier_seconds = float(old.get("seconds", 0.0))
    folds: list[dict[str, Any]] = []
    for k in tqdm(list(seeds), desc="cross-validate", unit="split", disable=not progress):
        art = work_dir / f"seed{k}"
        done = _finished_fold(art, k, encoder, distil)
        if done is not None:
            log(f"split {k}: reusing {art} (trained and scored earlier)")
            folds.append(done)
            continue
        extra: dict[str, Any] = dict(train_kwargs)
        if distil:
            teacher = work_dir / f"seed{k}-teacher"
            tk: dict[str, Any] = {"cache_dir": train_kwargs.get("cache_dir"), **(teacher_kwargs or {})}
            train(
                data_dir, teacher, collected=collected, encoder=SMOLLM2, seed=k, progress=False, log=log, **tk
            )
            extra = {"teacher": teacher, "unlabeled": unlabeled, "augment": 1, "distill_weight": 2.0} | extra
        meta = train(
            data_dir, art, collected=collected, encoder=encoder, seed=k, progress=False, log=log, **extra
        )
        rep = evaluate(data_dir, art, art / "eval", collected=collected, seed=k, latency=False)
        fold = _fold(k, meta["version"], rep)
        folds.append(fold)
        shown = fold["settings"].get("table_27_models", fold["settings"]["all_models"])
        log(f"split {k}: test {shown['test']}")
    folds = sorted([*kept, *folds], key=lambda f: int(f["seed"]))

    summary: dict[str, Any] = {}
    for name in folds[0]["settings"]:
        summary[name] = {}
        for m in CV_METRICS:
            v = np.array([f["settings"][name]["test"][m] for f in folds], dtype=np.float64)
            summary[name][m] = {
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                "min": float(v.min()),
                "max": float(v.max()),
                "splits_meeting_target": int((v >= QUALITY_TARGETS[m]).sum()),
            }
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        **recipe,
        "seeds": [int(f["seed"]) for f in folds],
        "folds": folds,
        "summary": summary,
        # Training time of every split in the report, earlier runs' included (reused splits cost ~0).
        "seconds": round(earlier_seconds + time.time() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{CV_REPORT}.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    _cv_png(out_dir / f"{CV_REPORT}.png", report)
    (out_dir / f"{CV_REPORT}.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _fold(seed: int, version: str, rep: dict[str, Any]) -> dict[str, Any]:
    """One split's entry: its artifact's version, validation and test metrics per setting of rep."""
    fold: dict[str, Any] = {"seed": seed, "version": version, "settings": {}}
    for name, res in rep["settings"].items():
        fold["settings"][name] = {
            "edges": res["edges"],
            **{split: {m: res[split]["proxy"][m] for m in CV_METRICS} for split in ("validation", "test")},
        }
    return fold


def _finished_fold(art: Path, seed: int, encoder: str, distil: bool) -> dict[str, Any] | None:
    """The fold of a split this recipe already trained and scored in art, else None (train it)."""
    meta_path, rep_path = art / "metadata.json", art / "eval" / f"{REPORT}.json"
    if not meta_path.is_file() or not rep_path.is_file():
        return None  # never trained or never scored
    if rep_path.stat().st_mtime < meta_path.stat().st_mtime:
        return None  # retrained after its last score
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    with open(rep_path, encoding="utf-8") as f:
        rep = json.load(f)
    same = (
        meta.get("net", {}).get("encoder") == encoder
        and ("distillation" in meta.get("training", {})) == distil
        and meta.get("data", {}).get("split", {}).get("seed") == seed
        and str(rep.get("artifact", {}).get("ident", "")).endswith(f"@{meta.get('version')}")
    )
    return _fold(seed, str(meta["version"]), rep) if same else None


def _cv_png(path: Path, r: dict[str, Any]) -> None:
    """One panel per metric: each split's test figure per setting, the mean, and the issue's target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["summary"])
    fig, axes = plt.subplots(1, len(CV_METRICS), figsize=(4.0 * len(CV_METRICS), 3.4))
    for ax, m in zip(np.atleast_1d(axes), CV_METRICS, strict=True):
        for x, name in enumerate(names):
            v = [f["settings"][name]["test"][m] for f in r["folds"]]
            ax.scatter([x] * len(v), v, s=18, alpha=0.7)
            ax.hlines(r["summary"][name][m]["mean"], x - 0.25, x + 0.25, colors="black")
        ax.axhline(
            QUALITY_TARGETS[m],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"target {QUALITY_TARGETS[m]}",
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(["27 LLMs" if n == "table_27_models" else "all LLMs" for n in names])
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(f"{m} (test; dot = split, bar = mean)", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(r: dict[str, Any]) -> str:
    """The report: per-split test metrics, then mean / sd / range and how many splits meet each target."""
    recipe = f"{r['encoder']}" + (
        " student distilled from a SmolLM2 teacher of its own split" if r["distilled"] else ""
    )
    lines = [
        "# Proxy length predictor: the recipe over several splits",
        "",
        f"Produced {r['created']} on {r['cpu']} in {r['seconds']} s by `muserve predictor cv` ({recipe}; "
        f"seeds {r['seeds']}). Each split seed draws its own 483/161/161 train/validation/test prompts; the "
        "artifact is trained on its train prompts, its epoch picked and calibrated on validation, and scored "
        "on test as in `muserve predictor eval`. Latency is not measured here.",
        "",
        f"![test metrics per split]({CV_REPORT}.png)",
        "",
    ]
    for name, summ in r["summary"].items():
        title = (
            "the issue's 27 LLMs, edges from their training answers"
            if name == "table_27_models"
            else "all LLMs"
        )
        lines += [
            f"## Test, {title}",
            "",
            "| split seed | edges | accuracy | within one | Kendall tau per model |",
            "|---|---|---|---|---|",
        ]
        for f in r["folds"]:
            s = f["settings"][name]
            cells = " | ".join(f"{s['test'][m]:.3f}" for m in CV_METRICS)
            lines.append(f"| {f['seed']} | {s['edges']} | {cells} |")
        n = len(r["folds"])
        lines.append(
            "| **mean +- sd** | | "
            + " | ".join(f"**{summ[m]['mean']:.3f}** +- {summ[m]['sd']:.3f}" for m in CV_METRICS)
            + " |"
        )
        lines.append(
            "| range | | "
            + " | ".join(f"{summ[m]['min']:.3f}-{summ[m]['max']:.3f}" for m in CV_METRICS)
            + " |"
        )
        lines.append(
            f"| splits meeting the issue's target (of {n}) | | "
            + " | ".join(f">= {QUALITY_TARGETS[m]}: {summ[m]['splits_meeting_target']}" for m in CV_METRICS)
            + " |"
        )
        lines.append("")
    return "\n".join(lines)
