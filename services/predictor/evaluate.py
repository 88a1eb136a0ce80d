"""Held-out evaluation of length predictors, side by side, and the metrics they are judged by.

Reproduce bench/results/predictor-eval.{md,json,png}::

    from pathlib import Path
    from services.predictor.evaluate import evaluate
    evaluate(Path("../shared/data"), None, Path("bench/results"),
             collected=[Path("~/.cache/muserve/collect/smollm2-135m-instruct.jsonl").expanduser()])

On the test prompts of the same seeded split the artifact was trained with, it compares the proxy
predictor with a per-model median, a per-model regression on log prompt tokens and a ridge
regression on frozen encoder embeddings (plus, for reference, the "oracle" of the other LLMs'
lengths on the same prompt), in two settings: every model with the artifact's class edges, and the
27 models of the issue's target table with their own training edges. Then it times predict().
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.common.machine import cpu_model

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def kendall_tau_b(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Kendall's tau-b (ties handled); NaN when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    iu = np.triu_indices(len(a), 1)
    da = np.sign(a[:, None] - a[None, :])[iu]
    db = np.sign(b[:, None] - b[None, :])[iu]
    den = float(np.sqrt(float(np.count_nonzero(da)) * float(np.count_nonzero(db))))
    return float("nan") if den == 0 else float((da * db).sum() / den)


def rank_average(x: npt.ArrayLike) -> FloatArray:
    """Ranks with ties given their average rank (0-based)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values, then each run's mean position.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_a)) + 1]
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends - 1) / 2.0
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman's rho; NaN when either side is constant."""
    rx, ry = rank_average(x), rank_average(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def per_model_tau(
    score: npt.ArrayLike, tokens: npt.ArrayLike, models: npt.ArrayLike, min_n: int = 3
) -> float:
    """For each model rank its answers by score vs true length (Kendall tau-b), then average over models."""
    s, t, m = np.asarray(score, dtype=np.float64), np.asarray(tokens), np.asarray(models)
    taus = [kendall_tau_b(s[m == k], t[m == k]) for k in np.unique(m) if np.count_nonzero(m == k) >= min_n]
    finite = [v for v in taus if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def confusion(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, classes: int) -> IntArray:
    """classes x classes counts, rows = true class."""
    out = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(out, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return out


def class_metrics(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, classes: int) -> dict[str, float]:
    """Exact accuracy, within-one-class accuracy and macro-F1."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    cm = confusion(yt, yp, classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return {
        "accuracy": float(np.mean(yt == yp)),
        "within_one": float(np.mean(np.abs(yt - yp) <= 1)),
        "macro_f1": float(f1.mean()),
    }


def all_metrics(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    classes: int,
    score: npt.ArrayLike | None,
    tokens: npt.ArrayLike,
    models: npt.ArrayLike,
) -> dict[str, float]:
    """Class metrics plus per-model Kendall tau and pooled Spearman of the score against true lengths."""
    out = class_metrics(y_true, y_pred, classes)
    if score is None:
        out["kendall_tau_per_model"] = float("nan")
        out["spearman"] = float("nan")
    else:
        out["kendall_tau_per_model"] = per_model_tau(score, tokens, models)
        out["spearman"] = spearman(score, tokens)
    return out


BOOTSTRAP_METRICS = ("accuracy", "within_one", "kendall_tau_per_model")
BOOTSTRAP_RESAMPLES = 400
BOOTSTRAP_LEVEL = 0.95
# The quality targets (table-27 setting, test prompts): metric -> lowest passing value.
QUALITY_TARGETS = {"kendall_tau_per_model": 0.45, "accuracy": 0.55, "within_one": 0.93}


def bootstrap_intervals(
    prompt_rows: npt.ArrayLike,
    y_true: npt.ArrayLike,
    y_pred: Mapping[str, npt.ArrayLike],
    score: Mapping[str, npt.ArrayLike],
    tokens: npt.ArrayLike,
    models: npt.ArrayLike,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, dict[str, list[float]]]:
    """Percentile intervals of accuracy, within-one and per-model tau, resampling prompts with replacement.

    One entry per predictor, plus "A - B" for every other predictor A against the first B, paired (the
    same resampled prompts): whether a gap is larger than what another draw of test prompts would give.
    """
    rows, yt, tok, mods = (np.asarray(a) for a in (prompt_rows, y_true, tokens, models))
    names = list(y_pred)
    prompts = np.unique(rows)
    pairs_of = {int(p): np.flatnonzero(rows == p) for p in prompts}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[list[float]]] = {n: [] for n in names}
    for _ in range(resamples):
        idx = np.concatenate([pairs_of[int(p)] for p in rng.choice(prompts, len(prompts))])
        for n in names:
            yp = np.asarray(y_pred[n])[idx]
            draws[n].append(
                [
                    float(np.mean(yt[idx] == yp)),
                    float(np.mean(np.abs(yt[idx] - yp) <= 1)),
                    per_model_tau(np.asarray(score[n])[idx], tok[idx], mods[idx]),
                ]
            )
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    arr = {n: np.asarray(v) for n, v in draws.items()}
    out: dict[str, dict[str, list[float]]] = {}
    for n in names:
        out[n] = {m: np.percentile(arr[n][:, i], q).tolist() for i, m in enumerate(BOOTSTRAP_METRICS)}
    for n in names[1:]:
        diff = arr[n] - arr[names[0]]
        out[f"{n} - {names[0]}"] = {
            m: np.percentile(diff[:, i], q).tolist() for i, m in enumerate(BOOTSTRAP_METRICS)
        }
    return out


# The 27 LLMs whose answers ship as full text: the setting of the target table.
TABLE_MODELS = (
    "FuseChat-Llama-3.2-1B-Instruct", "Meta-Llama-3-70B-Instruct", "Meta-Llama-3-8B-Instruct",
    "Mistral-7B-Instruct-v0.2", "Mixtral-8x7B-Instruct-v0.1", "Qwen1.5-1.8B-Chat", "Qwen1.5-7B-Chat",
    "Yi-34B-Chat", "alpaca-7b", "claude-2", "claude-3-opus-20240229", "falcon-7b-instruct", "gemini-pro",
    "gemma-2b-it", "gpt-3.5-turbo-0301", "gpt-3.5-turbo-1106", "gpt-4o-2024-05-13", "gpt4", "gpt4_0613",
    "gpt4_1106_preview", "llama-2-70b-chat-hf", "llama-2-7b-chat-hf", "oasst-sft-pythia-12b", "phi-2",
    "text_davinci_003", "vicuna-13b-v1.5", "zephyr-7b-beta",
)  # fmt: skip
RIDGE_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
LATENCY_BATCHES = (1, 8, 32)
REPORT = "predictor-eval"


def additive_fit(
    rows: IntArray, cols: IntArray, y: FloatArray, n_rows: int, n_cols: int, iters: int = 30
) -> tuple[FloatArray, FloatArray]:
    """y ~ prompt effect + model effect by alternating means: the denoised prompt-level target."""
    a = np.zeros(n_rows)
    b = np.zeros(n_cols)
    n_r = np.maximum(np.bincount(rows, minlength=n_rows), 1)
    n_c = np.maximum(np.bincount(cols, minlength=n_cols), 1)
    for _ in range(iters):
        b = np.bincount(cols, weights=y - a[rows], minlength=n_cols) / n_c
        a = np.bincount(rows, weights=y - b[cols], minlength=n_rows) / n_r
    return a, b


def ridge(x_train: FloatArray, y_train: FloatArray, lam: float) -> tuple[FloatArray, FloatArray, float]:
    """Ridge regression on standardised features: (mean, weights / std, intercept) for x -> (x-mean)@w + c."""
    mu = x_train.mean(0)
    sd = x_train.std(0) + 1e-6
    xs = (x_train - mu) / sd
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(xs.shape[1]), xs.T @ (y_train - y_train.mean()))
    return mu, w / sd, float(y_train.mean())


def frozen_embeddings(texts: Sequence[str], layers: int, head_tokens: int, tail_tokens: int) -> FloatArray:
    """Mean-pooled outputs of the packaged encoder's first layers, untuned (the embedding baseline)."""
    import torch

    from services.predictor.proxy import (
        NetConfig,
        load_encoder,
        load_tokenizer,
        pad_sequences,
        token_sequences,
    )
    from services.worker.models import minilm_path

    cfg = NetConfig(layers=layers, head_tokens=head_tokens, tail_tokens=tail_tokens)
    enc = load_encoder(minilm_path(), layers)
    seqs = token_sequences(load_tokenizer(minilm_path()), texts, cfg)
    order = np.argsort([len(s) for s in seqs])
    out = np.zeros((len(texts), int(enc.config.hidden_size)))
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            group = order[start : start + 64]
            ids, mask = pad_sequences([seqs[i] for i in group])
            hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out[group] = ((hidden * m).sum(1) / m.sum(1)).double().numpy()
    return out


def _busy_state() -> dict[str, Any]:
    """Load average and whether a `predictor collect` job shares the CPU (it skews latency)."""
    collect = False
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"predictor collect" in cmd or b"predictor train" in cmd:
            collect = True
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan, math.nan, math.nan)
    return {"loadavg_1m": round(load[0], 2), "other_job_running": collect, "cpus": os.cpu_count()}


def measure_latency(
    predictor: Any, texts: Sequence[str], model: str, batches: Sequence[int] = LATENCY_BATCHES, seed: int = 0
) -> dict[str, Any]:
    """Wall time of predict() per request (batch time / batch size) on random held-out prompts."""
    from services.common.schemas import PredictItem

    rng = np.random.default_rng(seed)
    before = _busy_state()
    for i in range(5):  # warm-up: first calls allocate
        predictor.predict([PredictItem(request_id=str(i), model=model, text=texts[i % len(texts)])])
    out: dict[str, Any] = {}
    for b in batches:
        repeats = max(12, 100 // b)
        per_request, cpu_per_request = [], []
        for r in range(repeats):
            pick = rng.integers(0, len(texts), b)
            items = [
                PredictItem(request_id=f"{r}-{j}", model=model, text=texts[k]) for j, k in enumerate(pick)
            ]
            t0, c0 = time.perf_counter(), time.process_time()
            predictor.predict(items)
            per_request.append((time.perf_counter() - t0) * 1000.0 / b)
            cpu_per_request.append((time.process_time() - c0) * 1000.0 / b)
        out[str(b)] = {
            "p50_ms": round(float(np.percentile(per_request, 50)), 3),
            "p99_ms": round(float(np.percentile(per_request, 99)), 3),
            # CPU time of this process (all its threads): what the work costs whatever else runs.
            "cpu_p50_ms": round(float(np.percentile(cpu_per_request, 50)), 3),
            "cpu_p99_ms": round(float(np.percentile(cpu_per_request, 99)), 3),
            "repeats": repeats,
        }
    after = _busy_state()
    out["machine"] = {
        "before": before,
        "after": after,
        "busy": bool(
            before["other_job_running"] or after["other_job_running"] or max(before["loadavg_1m"], 0) > 1.0
        ),
    }
    return out


def _confusion_png(path: Path, panels: Sequence[tuple[str, IntArray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    for ax, (title, cm) in zip(np.atleast_1d(axes), panels, strict=True):
        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_xticks(range(cm.shape[1]))
        ax.set_yticks(range(cm.shape[0]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    """Short commit of the checkout, "+dirty" when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python, floats rounded."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return None if not math.isfinite(v) else round(v, 4)
    return obj


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


PREDICTORS = {
    "proxy": "proxy predictor (this artifact)",
    "median": "per-model median (train)",
    "prompt_length": "per-model linear on log prompt tokens",
    "frozen_ridge": "frozen MiniLM (the artifact's layers, or 4) + ridge",
    "oracle": "reference: other LLMs' lengths on the same prompt",
}


def evaluate(
    data_dir: Path,
    artifact_dir: Path | None,
    out_dir: Path,
    *,
    collected: Sequence[Path] = (),
    seed: int = 0,
    threads: int | None = None,
    latency: bool = True,
    latency_threads: Sequence[int] = (1, 2),
    compare: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Score the artifact and baselines on held-out prompts, time predict(), write out_dir/predictor-eval.*.

    artifact_dir None = the shipped artifact. seed must be the artifact's split seed (the test prompts
    are those it never saw). Latency is measured with each of latency_threads torch threads. compare:
    more artifacts (name -> folder, same split seed), scored and timed side by side with the first.
    Returns what the JSON report holds.
    """
    from services.predictor.data import (
        class_edges,
        classes_of,
        edge_percentiles,
        load_length_data,
        read_prompt_tokens,
        split_by_prompt,
    )
    from services.predictor.proxy import ProxyLengthPredictor
    from services.predictor.train import calibrate, evaluate_pairs

    started = time.time()
    collected = [Path(p).expanduser() for p in collected]

    def load(folder: Path | None, label: str) -> ProxyLengthPredictor:
        art = ProxyLengthPredictor.load(folder, threads=threads)
        split_seed = int(art.metadata["data"]["split"]["seed"])
        if split_seed != seed:
            raise ValueError(f"{label} was split with seed {split_seed}, not {seed}")
        return art

    predictor = load(artifact_dir, "the artifact")
    meta = predictor.metadata
    # The proxy artifacts scored side by side: the one under test first.
    loaded = {"proxy": predictor}
    for name, folder in (compare or {}).items():
        if name in PREDICTORS:
            raise ValueError(f"compare name {name!r} is taken by a baseline")
        loaded[name] = load(folder, str(folder))
    data = load_length_data(data_dir, collected)
    n_p, n_m = len(data.texts), len(data.models)
    rows = dict(zip(("train", "validation", "test"), split_by_prompt(n_p, seed), strict=True))
    parts = {k: data.subset(v) for k, v in rows.items()}
    logy = {k: np.log(d.tokens.astype(np.float64)) for k, d in parts.items()}
    held = ("validation", "test")

    # Continuous predictions (log tokens) of every held-out pair, and the ranking score (None: constant).
    pred: dict[str, dict[str, FloatArray]] = {}
    score: dict[str, dict[str, FloatArray | None]] = {}

    predictors: dict[str, str] = {}
    for name, art in loaded.items():
        matrix = art.log_tokens_matrix(data.texts).double().numpy()
        col = np.array([art.column(m) for m in data.models])
        pred[name] = {k: matrix[parts[k].rows, col[parts[k].cols]] for k in held}
        score[name] = dict(pred[name])  # type: ignore[arg-type]
        distill = art.metadata.get("training", {}).get("distillation")
        predictors[name] = (
            f"proxy predictor {art.ident}"
            + (" (this artifact)" if name == "proxy" else "")
            + (
                f", distilled from {distill['teacher']} (which also labelled {distill['unlabeled_prompts']} "
                "prompts without answers, none of them held out)"
                if distill
                else ""
            )
        )
    predictors |= {k: v for k, v in PREDICTORS.items() if k != "proxy"}

    med = np.full(n_m, float(np.median(parts["train"].tokens)))
    for m in range(n_m):
        mine = parts["train"].tokens[parts["train"].cols == m]
        if len(mine):
            med[m] = float(np.median(mine))
    pred["median"] = {k: np.log(med[parts[k].cols]) for k in held}
    score["median"] = dict.fromkeys(held)

    ptok = read_prompt_tokens(data_dir)
    logp = np.log(np.array([max(ptok.get(i, 1), 1) for i in data.prompt_ids], dtype=np.float64))
    slope, icpt = np.zeros(n_m), np.full(n_m, float(logy["train"].mean()))
    for m in range(n_m):
        sel = parts["train"].cols == m
        if sel.sum() >= 3:
            x, y = logp[parts["train"].rows[sel]], logy["train"][sel]
            slope[m] = float(np.cov(x, y, bias=True)[0, 1] / x.var()) if x.var() > 0 else 0.0
            icpt[m] = float(y.mean() - slope[m] * x.mean())
    pred["prompt_length"] = {
        k: icpt[parts[k].cols] + slope[parts[k].cols] * logp[parts[k].rows] for k in held
    }
    score["prompt_length"] = dict(pred["prompt_length"])  # type: ignore[arg-type]

    net = meta["net"]
    # A MiniLM artifact is compared with its own encoder untuned; an LM artifact with the MiniLM
    # proxy's depth.
    ridge_layers = int(net["layers"]) if net.get("encoder", "minilm") == "minilm" else 4
    emb = frozen_embeddings(data.texts, ridge_layers, int(net["head_tokens"]), int(net["tail_tokens"]))
    tr = parts["train"]
    effect, _ = additive_fit(tr.rows, tr.cols, logy["train"], n_p, n_m)
    train_rows = rows["train"]
    best: tuple[float, float, FloatArray] = (-math.inf, 0.0, np.zeros(n_p))
    for lam in RIDGE_LAMBDAS:
        mu, w, c = ridge(emb[train_rows], effect[train_rows], lam)
        s = (emb - mu) @ w + c
        tau = per_model_tau(s[parts["validation"].rows], parts["validation"].tokens, parts["validation"].cols)
        if tau > best[0]:
            best = (tau, lam, s)
    ridge_lambda, s_ridge = best[1], best[2]
    scale, offset, _ = calibrate(
        s_ridge[parts["validation"].rows], parts["validation"], s_ridge[tr.rows], tr, n_m
    )
    pred["frozen_ridge"] = {k: scale * s_ridge[parts[k].rows] + offset[parts[k].cols] for k in held}
    score["frozen_ridge"] = dict(pred["frozen_ridge"])  # type: ignore[arg-type]

    full = data.matrix()
    total, count = np.nansum(full, 1), np.count_nonzero(~np.isnan(full), 1)

    def loo(d: Any, y: FloatArray) -> FloatArray:
        return np.asarray((total[d.rows] - y) / np.maximum(count[d.rows] - 1, 1), dtype=np.float64)

    off = np.nan_to_num(
        np.bincount(tr.cols, weights=logy["train"] - loo(tr, logy["train"]), minlength=n_m)
        / np.maximum(np.bincount(tr.cols, minlength=n_m), 1)
    )
    pred["oracle"] = {k: loo(parts[k], logy[k]) + off[parts[k].cols] for k in held}
    score["oracle"] = dict(pred["oracle"])  # type: ignore[arg-type]

    # Settings: every model with the artifact's edges; the target table's 27 models with their own edges.
    classes = int(meta["classes"])
    table_cols = np.array([m in TABLE_MODELS for m in data.models])
    tr_table = tr.tokens[table_cols[tr.cols]]
    settings: dict[str, dict[str, Any]] = {
        "all_models": {
            "edges": [int(e) for e in meta["edges_tokens"]],
            "keep": np.ones(n_m, dtype=bool),
        },
        "table_27_models": {
            "edges": class_edges(tr_table, edge_percentiles(classes)) if len(tr_table) else [],
            "keep": table_cols,
        },
    }
    results: dict[str, Any] = {}
    confusions: list[tuple[str, IntArray]] = []
    intervals: dict[str, dict[str, list[float]]] = {}
    for name, st in settings.items():
        if not st["edges"]:
            continue
        edges = st["edges"]
        res: dict[str, Any] = {"edges": edges, "models": int(st["keep"].sum())}
        for split in held:
            d = parts[split]
            sel = st["keep"][d.cols]
            res[split] = {"answers": int(sel.sum()), "prompts": len(rows[split])}
            for p in predictors:
                sc = score[p][split]
                y_true = classes_of(d.tokens[sel], edges)
                y_pred = classes_of(np.exp(pred[p][split][sel]), edges)
                res[split][p] = all_metrics(
                    y_true, y_pred, classes, None if sc is None else sc[sel], d.tokens[sel], d.cols[sel]
                )
                if split == "test" and p in ("median", "proxy"):
                    cm = confusion(y_true, y_pred, classes)
                    confusions.append((f"{PREDICTORS[p]}\n{name}, test", cm))
                    res[split][p]["confusion"] = cm.tolist()  # rows = true class (the simulator reads it)
            if split == "test" and name == "table_27_models":
                # How much the target metrics move with another draw of 161 test prompts.
                intervals = bootstrap_intervals(
                    d.rows[sel],
                    classes_of(d.tokens[sel], edges),
                    {p: classes_of(np.exp(pred[p][split][sel]), edges) for p in loaded},
                    {p: score[p][split][sel] for p in loaded},  # type: ignore[index]
                    d.tokens[sel],
                    d.cols[sel],
                    seed=seed,
                )
        results[name] = res

    served: dict[str, Any] = {}
    for m in meta.get("served_models", []):
        if m not in data.models:
            continue
        c = data.models.index(m)
        served[m] = {
            "train_answers_now": int(np.count_nonzero(tr.cols == c)),
            "train_answers_in_artifact": int(meta.get("train_answers", {}).get(m, 0)),
        }
        for split in held:
            d = parts[split]
            sel = d.cols == c
            served[m][split] = {"answers": int(sel.sum())}
            for p in (p for p in predictors if p != "oracle"):
                sc = score[p][split]
                sub = d.subset(np.unique(d.rows[sel])) if sel.any() else None
                if sub is None:
                    continue
                served[m][split][p] = evaluate_pairs(
                    type(d)(d.prompt_ids, d.texts, d.models, d.rows[sel], d.cols[sel], d.tokens[sel]),
                    pred[p][split][sel],
                    meta["edges_tokens"],
                ) | (
                    {}
                    if sc is not None
                    else {"kendall_tau_per_model": float("nan"), "spearman": float("nan")}
                )

    timed: dict[str, Any] = {}
    if latency:
        texts = [data.texts[i] for i in rows["test"]]
        lat_model = (meta.get("served_models") or predictor.models)[0]
        timed = {k: _latency(art, texts, lat_model, latency_threads, seed) for k, art in loaded.items()}
    lat = timed.get("proxy", {})
    lat_compare = {k: v for k, v in timed.items() if k != "proxy"}

    checks = [(f"{metric} >= {limit}", metric, limit) for metric, limit in QUALITY_TARGETS.items()]
    targets: dict[str, Any] = {}
    for name in loaded:
        suffix = "" if name == "proxy" else f" ({name})"
        table = results.get("table_27_models", {}).get("test", {}).get(name, {})
        every = results["all_models"]["test"][name]
        for key, metric, limit in checks:
            v = table.get(metric)
            targets[key + suffix] = {
                "table_27_setting": v,
                "ci95": intervals.get(name, {}).get(metric),
                "all_models": every[metric],
                "met": None if v is None else bool(v >= limit),
            }
        by_threads = timed.get(name, {}).get("by_threads", {})
        p50_b8 = {t: x["8"]["p50_ms"] for t, x in by_threads.items() if "8" in x}
        if p50_b8:
            fastest = min(p50_b8, key=lambda t: p50_b8[t])
            targets["p50 ms per request at batch 8 <= 5" + suffix] = {
                "value": p50_b8[fastest],
                "threads": int(fastest),
                "met": bool(p50_b8[fastest] <= 5.0),
                "machine_busy": by_threads[fastest]["machine"]["busy"],
            }

    data_hash = data.content_hash()  # hashes every label: once
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "artifact": {
            "dir": str(artifact_dir) if artifact_dir else "services/predictor/artifacts/default (shipped)",
            "ident": predictor.ident,
            "trained_on_data_hash": meta["data"]["hash"],
            "net": meta["net"],
            "served_models": meta.get("served_models", []),
            "collected_answers": meta["data"].get("collected_answers", {}),
        },
        "data": {
            "hash": data_hash,
            "same_as_training": data_hash == meta["data"]["hash"],
            "collected_answers": data.answer_counts(meta.get("served_models", [])),
            "prompts": {k: len(v) for k, v in rows.items()},
            "models": n_m,
            "split_seed": seed,
        },
        "predictors": predictors,
        "ridge_lambda": ridge_lambda,
        "settings": results,
        "served_models": served,
        "latency": lat,
        "latency_compare": lat_compare,
        "targets": targets,
        "bootstrap": {
            "setting": "table_27_models",
            "split": "test",
            "level": BOOTSTRAP_LEVEL,
            "resamples": BOOTSTRAP_RESAMPLES,
            "intervals": intervals,
        },
        "seconds": round(time.time() - started, 1),
    }
    # The simulator's predictor: the proxy's test confusion counts in the first (all-LLM) setting.
    first = next(iter(results.values()), None)
    if first is not None and "proxy" in first.get("test", {}):
        report["confusion"] = first["test"]["proxy"]["confusion"]
    report = _clean(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{REPORT}.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    _confusion_png(out_dir / f"{REPORT}.png", confusions)
    (out_dir / f"{REPORT}.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _latency(
    predictor: Any, texts: Sequence[str], model: str, threads: Sequence[int], seed: int
) -> dict[str, Any]:
    """measure_latency at each torch thread count (the process's default restored after)."""
    import torch

    default_threads = torch.get_num_threads()
    out: dict[str, Any] = {
        "ident": predictor.ident,
        "model": model,
        "int8": predictor.int8,
        "default_threads": default_threads,
        "by_threads": {},
    }
    try:
        for t in threads:
            torch.set_num_threads(t)
            out["by_threads"][str(t)] = measure_latency(predictor, texts, model, seed=seed)
    finally:
        torch.set_num_threads(default_threads)
    return out


def render_markdown(r: dict[str, Any]) -> str:
    """The human report of an evaluate() result."""
    lat = r.get("latency") or {}
    lines = [
        "# Proxy output-length predictor: held-out evaluation",
        "",
        f"Produced {r['created']} on {r['cpu']} ({r.get('cpus', '?')} cores), "
        f"commit `{r['commit']}`, artifact `{r['artifact']['ident']}`, in {r['seconds']} s, by "
        "`muserve predictor eval` (the shipped artifact, compared with the shipped MiniLM one; the "
        "served model's collected lengths from `~/.cache/muserve/collect/`), which calls:",
        "",
        "```python",
        "from pathlib import Path",
        "from services.predictor.artifacts import MINILM_ARTIFACT_DIR",
        "from services.predictor.evaluate import evaluate",
        "",
        "evaluate(",
        '    Path("../shared/data"),',
        "    None,",
        '    Path("bench/results"),',
        '    collected=[Path("~/.cache/muserve/collect/smollm2-135m-instruct.jsonl").expanduser()],',
        '    compare={"minilm": MINILM_ARTIFACT_DIR},',
        ")",
        "```",
        "",
        f"Data: AlpacaEval prompts split by prompt with seed {r['data']['split_seed']} ("
        + "/".join(str(r["data"]["prompts"][k]) for k in ("train", "validation", "test"))
        + f" train/validation/test prompts), {r['data']['models']} target LLMs, lengths in SmolLM2 tokens "
        "(answers <= 1 token dropped, lengths capped at 2048). The artifact never saw a test prompt. "
        + (
            "Evaluation data is identical to the artifact's training data."
            if r["data"]["same_as_training"]
            else "Evaluation data differs from the artifact's training data (the served models' collected "
            f"answers: {r['artifact']['collected_answers'] or 'none'} when trained, "
            f"{r['data'].get('collected_answers') or 'none'} here): the test prompts are still unseen."
        ),
        "",
        "Predictors: " + "; ".join(f"`{k}` = {v}" for k, v in r["predictors"].items()) + ". "
        "Classes come from each predictor's predicted length, thresholded at the class edges. "
        "`proxy` and `frozen_ridge` have one scale and per-model offsets calibrated on the validation "
        f"prompts (so their validation class metrics are optimistic); ridge lambda {r['ridge_lambda']} "
        "was chosen on validation. `oracle` uses the true lengths of the other LLMs on the same prompt: "
        "a ceiling, not a predictor. Kendall tau per model: for each LLM rank its answers by predicted vs "
        "true length, then average over LLMs; Spearman is pooled over all pairs.",
        "",
    ]
    for name, res in r["settings"].items():
        title = (
            "All target LLMs, the artifact's class edges"
            if name == "all_models"
            else "The target table's setting: its 27 LLMs, edges from their training answers"
        )
        lines += [f"## {title} (edges {res['edges']} tokens, {res['models']} LLMs)", ""]
        for split in ("test", "validation"):
            s = res[split]
            lines += [
                f"{split.capitalize()}: {s['prompts']} prompts, {s['answers']} answers.",
                "",
                "| predictor | accuracy | within one | macro-F1 | Kendall tau per model | Spearman |",
                "|---|---|---|---|---|---|",
            ]
            for p in r["predictors"]:
                m = s[p]
                lines.append(
                    f"| {p} | {_fmt(m['accuracy'])} | {_fmt(m['within_one'])} | {_fmt(m['macro_f1'])} | "
                    f"{_fmt(m['kendall_tau_per_model'])} | {_fmt(m['spearman'])} |"
                )
            lines.append("")
    if r["served_models"]:
        lines += [
            "## Served models (their own collected lengths)",
            "",
            "| model | split | answers | predictor | accuracy | within one | Kendall tau | Spearman |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, sv in r["served_models"].items():
            for split in ("test", "validation"):
                for p in (p for p in r["predictors"] if p != "oracle"):
                    x = sv[split].get(p)
                    if x:
                        lines.append(
                            f"| {m} | {split} | {sv[split]['answers']} | {p} | {_fmt(x['accuracy'])} | "
                            f"{_fmt(x['within_one'])} | {_fmt(x['kendall_tau_per_model'])} | "
                            f"{_fmt(x['spearman'])} |"
                        )
        lines += [
            "",
            "Training-split answers of served models (the artifact was trained with / available now): "
            + ", ".join(
                f"{m} {sv['train_answers_in_artifact']} / {sv['train_answers_now']}"
                for m, sv in r["served_models"].items()
            )
            + ". Few answers: these figures are noisy.",
            "",
        ]
    timings = [("proxy", lat)] if lat else []
    timings += list(r.get("latency_compare", {}).items())
    if timings:
        lines += [
            "## Latency of predict()",
            "",
            "Wall time of one predict() call divided by its batch size (random test prompts, model "
            f"`{lat['model']}`), per torch thread count; CPU ms = CPU time "
            "of this process per request (all its threads), less sensitive to other jobs than wall time. "
            "When another process keeps the cores busy, 2 torch threads wait on each other (OpenMP "
            "barriers) and can be far slower than 1: a predictor sharing the CPU should use threads=1.",
            "",
        ]
    for who, one in timings:
        lines += [f"### `{who}`: {one.get('ident', r['artifact']['ident'])}, int8 encoder: {one['int8']}", ""]
        for t, x in one["by_threads"].items():
            m = x["machine"]
            b, a = m["before"], m["after"]
            label = "MEASURED WHILE THE MACHINE WAS BUSY" if m["busy"] else "machine quiet"
            lines += [
                f"{t} torch thread(s), {label}: load average before/after "
                f"{b['loadavg_1m']}/{a['loadavg_1m']}, other heavy job running before/after: "
                f"{b['other_job_running']}/{a['other_job_running']}.",
                "",
                "| batch | p50 ms / request | p99 ms / request | CPU p50 ms | CPU p99 ms | calls |",
                "|---|---|---|---|---|---|",
            ]
            for k in ("1", "8", "32"):
                if k in x:
                    y = x[k]
                    lines.append(
                        f"| {k} | {_fmt(y['p50_ms'], 2)} | {_fmt(y['p99_ms'], 2)} | "
                        f"{_fmt(y['cpu_p50_ms'], 2)} | {_fmt(y['cpu_p99_ms'], 2)} | {y['repeats']} |"
                    )
            lines.append("")
    lines += [
        "## Targets (proxy, test prompts)",
        "",
        "| target | table-27 setting | 95% interval (prompts resampled) | all LLMs | met |",
        "|---|---|---|---|---|",
    ]
    for k, v in r["targets"].items():
        ok = "-" if v.get("met") is None else ("yes" if v["met"] else "no")
        if "value" in v:
            busy = " (machine busy)" if v.get("machine_busy") else ""
            lines.append(
                f"| {k} | {_fmt(v['value'], 2)} ms with {v['threads']} thread(s){busy} | - | - | {ok} |"
            )
        else:
            ci = v.get("ci95")
            span = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
            lines.append(f"| {k} | {_fmt(v['table_27_setting'])} | {span} | {_fmt(v['all_models'])} | {ok} |")
    boot = r.get("bootstrap", {})
    gaps = {k: v for k, v in boot.get("intervals", {}).items() if " - " in k}
    if gaps:
        lines += [
            "",
            "Paired gaps between artifacts on the same resampled test prompts (table-27 setting, "
            f"{100 * boot['level']:.0f}% intervals, {boot['resamples']} resamples; an interval that "
            "excludes 0 is a gap another draw of test prompts would not close):",
            "",
            "| gap | accuracy | within one | Kendall tau per model |",
            "|---|---|---|---|",
        ]
        for k, g in gaps.items():
            cells = " | ".join(f"[{_fmt(g[m][0])}, {_fmt(g[m][1])}]" for m in BOOTSTRAP_METRICS)
            lines.append(f"| {k} | {cells} |")
    lines += [
        "",
        f"![confusion matrices]({REPORT}.png)",
        "",
        "Confusion matrices (rows: true class, normalised per row) on the test prompts.",
        "",
    ]
    return "\n".join(lines)
