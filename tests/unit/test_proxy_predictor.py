"""Proxy length predictor: data rules, metrics, the shipped artifact, online updates, a tiny training run."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from services.common.schemas import PredictItem
from services.predictor.artifacts import MINILM_ARTIFACT_DIR
from services.predictor.base import length_class
from services.predictor.data import (
    MAX_TOKENS,
    build_length_data,
    class_edges,
    classes_of,
    clean_length,
    edge_percentiles,
    load_length_data,
    split_by_prompt,
)
from services.predictor.evaluate import class_metrics, kendall_tau_b, per_model_tau, rank_average, spearman
from services.predictor.proxy import DEFAULT_ARTIFACT, ProxyLengthPredictor, cut_text, length_groups
from tests.shared_data import SHARED_DATA, needs_shared_data

# -- data rules -------------------------------------------------------------------------------------


def test_split_by_prompt_is_disjoint_complete_and_seeded() -> None:
    train, val, test = split_by_prompt(805, seed=0)
    assert (len(train), len(val), len(test)) == (483, 161, 161)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert set(train) | set(val) | set(test) == set(range(805))
    again = split_by_prompt(805, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(split_by_prompt(805, seed=1)[2], test)


def test_a_prompt_answered_by_many_models_never_leaks_across_splits() -> None:
    prompts = {i: f"prompt {i}" for i in range(50)}
    labels = [(f"m{m}", i, 10 + i + m) for i in range(50) for m in range(7)]
    data = build_length_data(prompts, labels)
    train, val, test = split_by_prompt(len(data.texts), seed=3)
    rows = [set(data.subset(r).rows.tolist()) for r in (train, val, test)]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]
    assert sum(len(data.subset(r).tokens) for r in (train, val, test)) == len(labels)


def test_empty_answers_are_dropped_and_long_ones_capped() -> None:
    assert clean_length(0) is None and clean_length(1) is None
    assert clean_length(2) == 2
    assert clean_length(5000) == MAX_TOKENS
    data = build_length_data(
        {0: "a", 1: "b"}, [("m", 0, 1), ("m", 1, 5000), ("n", 0, 300), ("n", 7, 100)]
    )  # idx 7 has no prompt: ignored
    assert sorted(data.tokens.tolist()) == [300, MAX_TOKENS]
    assert data.models == ["m", "n"]


def test_edges_come_from_training_percentiles() -> None:
    assert edge_percentiles(5) == [25.0, 50.0, 75.0, 99.0]
    assert edge_percentiles(3) == [50.0, 99.0]
    tokens = np.arange(1, 1001)
    assert class_edges(tokens, edge_percentiles(5)) == [251, 500, 750, 990]
    # Ties still give strictly increasing edges.
    assert class_edges(np.full(100, 7), edge_percentiles(5)) == [7, 8, 9, 10]
    edges = [96, 265, 451, 1039]
    values = np.array([0, 96, 97, 265, 451, 452, 1039, 1040, 5000])
    assert classes_of(values, edges).tolist() == [length_class(v, edges) for v in values]


# -- metrics ----------------------------------------------------------------------------------------


def _tau_brute(x: list[float], y: list[float]) -> float:
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx and dy:
                conc += dx == dy
                disc += dx != dy
            elif dx:
                tx += 1
            elif dy:
                ty += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_ranking_metrics_match_definitions() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float).tolist()
    y = (np.array(x) + rng.integers(0, 3, 40)).tolist()
    assert kendall_tau_b(x, y) == pytest.approx(_tau_brute(x, y))
    assert rank_average([10, 20, 20, 5]).tolist() == [1.0, 2.5, 2.5, 0.0]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    # Per model: model 0 perfectly ranked, model 1 reversed -> average 0.
    assert per_model_tau([1, 2, 3, 1, 2, 3], [1, 2, 3, 3, 2, 1], [0, 0, 0, 1, 1, 1]) == pytest.approx(0.0)


def test_class_metrics() -> None:
    m = class_metrics([0, 1, 2, 3], [0, 2, 2, 0], 4)
    assert m["accuracy"] == 0.5 and m["within_one"] == 0.75
    assert 0 < m["macro_f1"] < 1


def test_bootstrap_intervals_cover_the_estimate_and_pair_the_gaps() -> None:
    from services.predictor.evaluate import bootstrap_intervals

    rng = np.random.default_rng(1)
    prompts, models = 40, 3
    rows = np.repeat(np.arange(prompts), models)
    cols = np.tile(np.arange(models), prompts)
    tokens = rng.integers(10, 1000, len(rows))
    truth = np.searchsorted([100, 300, 600], tokens)
    noisy = np.clip(truth + rng.integers(-1, 2, len(rows)), 0, 3)
    score_noisy = np.log(tokens) + rng.normal(0, 1.0, len(rows))
    out = bootstrap_intervals(
        rows, truth, {"exact": truth, "noisy": noisy}, {"exact": np.log(tokens), "noisy": score_noisy},
        tokens, cols, resamples=200,
    )  # fmt: skip
    assert out["exact"]["accuracy"] == [1.0, 1.0] and out["exact"]["kendall_tau_per_model"] == [1.0, 1.0]
    lo, hi = out["noisy"]["accuracy"]
    assert lo < float(np.mean(noisy == truth)) < hi and hi - lo < 0.3
    assert out["noisy"]["within_one"] == [1.0, 1.0]
    gap = out["noisy - exact"]["kendall_tau_per_model"]
    assert gap[1] < 0  # a real gap: every resample agrees
    same = bootstrap_intervals(
        rows, truth, {"a": noisy, "b": noisy}, {"a": score_noisy, "b": score_noisy}, tokens, cols
    )
    assert same["b - a"]["accuracy"] == [0.0, 0.0]  # paired: identical predictors never differ


# -- text handling ----------------------------------------------------------------------------------


def test_cut_text_keeps_head_and_tail() -> None:
    text = "A" * 1000 + "B" * 1000
    cut = cut_text(text, 10, 20)
    assert cut.startswith("A" * 10) and cut.endswith("B" * 20) and len(cut) < 40
    assert cut_text("short", 10, 20) == "short"


def test_length_groups_cover_every_item_once() -> None:
    lengths = [5, 200, 6, 7, 180, 30, 5]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert any(set(g) == {1, 4} or {1, 4} <= set(g) for g in groups)  # the two long ones together
    assert all(1 not in g for g in groups if 0 in g)  # a long prompt does not pad the short ones


# -- the shipped artifact ---------------------------------------------------------------------------


SHIPPED = {"default": DEFAULT_ARTIFACT, "minilm": MINILM_ARTIFACT_DIR}


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request: pytest.FixtureRequest) -> ProxyLengthPredictor:
    return ProxyLengthPredictor.load(SHIPPED[request.param])


def _items(model: str, texts: list[str]) -> list[PredictItem]:
    return [PredictItem(request_id=str(i), model=model, text=t) for i, t in enumerate(texts)]


TEXTS = [
    "What is the capital of France?",
    "Write a detailed 2000-word essay on the history of the Roman Empire, with sections and a conclusion.",
    "Translate 'good morning' into Spanish.",
    "Give me a step-by-step guide to set up a Python project with tests, linting and CI.",
]


@pytest.mark.parametrize("folder", sorted(SHIPPED.values()))
def test_shipped_artifact_is_small_and_complete(folder: Path) -> None:
    files = list(folder.iterdir())
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 5 * 1024 * 1024
    assert (folder / "metadata.json").is_file() and (folder / "proxy.safetensors").is_file()


def test_the_default_artifact_reads_the_served_llm_and_the_other_minilm() -> None:
    assert json.loads((DEFAULT_ARTIFACT / "metadata.json").read_text())["net"]["encoder"] == "smollm2"
    assert json.loads((MINILM_ARTIFACT_DIR / "metadata.json").read_text())["net"].get(
        "encoder", "minilm"
    ) == ("minilm")


def test_the_minilm_artifact_is_distilled_from_the_shipped_default_and_knows_the_served_llm() -> None:
    default = json.loads((DEFAULT_ARTIFACT / "metadata.json").read_text())
    minilm = json.loads((MINILM_ARTIFACT_DIR / "metadata.json").read_text())
    # Retraining the default artifact means re-distilling the MiniLM one (`predictor train --encoder minilm`).
    assert minilm["training"]["distillation"]["teacher"] == default["version"]
    assert set(default["served_models"]) <= set(minilm["served_models"]) <= set(minilm["models"])
    assert minilm["edges_tokens"][:3] == default["edges_tokens"][:3]


@pytest.mark.parametrize("has_bf16", [True, False])
def test_the_minilm_artifact_runs_bf16_where_the_cpu_has_it_else_int8(
    has_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import services.predictor.proxy as proxy

    monkeypatch.setattr(proxy, "native_bf16", lambda: has_bf16)
    p = ProxyLengthPredictor.load(MINILM_ARTIFACT_DIR)
    assert p.int8 is not has_bf16
    if has_bf16:
        assert next(p.net.encoder.parameters()).dtype == torch.bfloat16
    assert ProxyLengthPredictor.load(MINILM_ARTIFACT_DIR, quantize=False).int8 is False  # explicit wins
    assert p.predict(_items(p.models[0], TEXTS[:2]))[0].predicted_tokens > 0


def test_shipped_artifact_predicts_a_batch(shipped: ProxyLengthPredictor) -> None:
    model = shipped.models[0]
    preds = shipped.predict(_items(model, TEXTS))
    assert len(preds) == len(TEXTS)
    k = len(shipped.edges_tokens) + 1
    for p in preds:
        assert 0 <= p.length_class < k
        assert p.predicted_tokens > 0
        assert p.predictor == shipped.ident == f"{shipped.name}@{shipped.metadata['version']}"
        assert shipped.name in ("proxy-minilm", "proxy-smollm2")
        # predicted_tokens sits inside its own class.
        assert length_class(p.predicted_tokens, shipped.edges_tokens) == p.length_class
    assert shipped.predict(_items(model, TEXTS)) == preds  # deterministic
    alone = [shipped.predict(_items(model, [t]))[0] for t in TEXTS]
    # int8 activations are quantized with one scale per forward pass (bfloat16 rounds by shape), so a
    # score moves a little with its batch neighbours; the float32 encoder is batch-invariant (right
    # padding: a causal LM's last real token never sees the pads), and the served one stays near it.
    exact = ProxyLengthPredictor.load(
        SHIPPED["minilm" if not shipped.net.frozen else "default"], quantize=False
    )
    exact.net.encoder.float()
    exact_batch = exact.predict(_items(model, TEXTS))
    exact_alone = [exact.predict(_items(model, [t]))[0] for t in TEXTS]
    for a, b, e, ea in zip(alone, preds, exact_batch, exact_alone, strict=True):
        assert e.score_tokens == pytest.approx(ea.score_tokens, rel=1e-3)
        assert a.score_tokens == pytest.approx(e.score_tokens, rel=0.25)
        assert b.score_tokens == pytest.approx(e.score_tokens, rel=0.25)
    assert shipped.predict([]) == []
    scores = shipped.log_tokens(_items(model, TEXTS)).tolist()
    assert scores[1] > scores[0] and scores[3] > scores[2]  # an essay outlasts a one-line answer


def test_shipped_artifact_knows_the_served_model(shipped: ProxyLengthPredictor) -> None:
    assert "smollm2-135m-instruct" in shipped.models
    assert shipped.knows("smollm2-135m-instruct")


def test_unknown_model_falls_back_to_the_average_model(shipped: ProxyLengthPredictor) -> None:
    (pred,) = shipped.predict(_items("no-such-model", TEXTS[:1]))
    assert pred.predicted_tokens > 0 and 0 <= pred.length_class <= len(shipped.edges_tokens)
    assert "no-such-model" in shipped.fallback_models
    assert not shipped.knows("no-such-model")


def test_empty_and_huge_texts_are_quick(shipped: ProxyLengthPredictor) -> None:
    huge = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    t0 = time.perf_counter()
    preds = shipped.predict(_items(shipped.models[0], ["", huge, "x"]))
    assert time.perf_counter() - t0 < 2.0
    assert len(preds) == 3 and all(p.predicted_tokens > 0 for p in preds)


def test_observe_moves_predicted_tokens_towards_observed_lengths(shipped: ProxyLengthPredictor) -> None:
    p = ProxyLengthPredictor(shipped.net, shipped.tokenizer, shipped.metadata)  # fresh online state
    model = "smollm2-135m-instruct"
    (before,) = p.predict(_items(model, TEXTS[:1]))
    lo = ([0, *p.edges_tokens][before.length_class]) + 1
    hi = [*p.edges_tokens, MAX_TOKENS][before.length_class]
    target = hi if abs(hi - before.predicted_tokens) > abs(lo - before.predicted_tokens) else lo
    for _ in range(25):
        p.observe(model, target, before)
    p.observe(model, 0, before)  # ignored
    (after,) = p.predict(_items(model, TEXTS[:1]))
    assert after.length_class == before.length_class
    assert abs(after.predicted_tokens - target) < abs(before.predicted_tokens - target)
    assert after.predicted_tokens == target


def test_missing_artifact_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no proxy predictor artifact"):
        ProxyLengthPredictor.load(tmp_path)


# -- training end to end on a synthetic data set ----------------------------------------------------


def _synthetic_data_dir(root: Path) -> tuple[Path, Path]:
    """AlpacaEval-shaped files: long-answer prompts ask for essays, short ones for one word."""
    rng = np.random.default_rng(0)
    topics = ["cats", "rivers", "taxes", "jazz", "chess", "volcanoes", "bread", "rockets", "tea", "maps"]
    prompts, lengths = [], ["model,idx,resp_words,resp_chars,resp_tokens_smollm2"]
    collected = []
    for i in range(40):
        long = i % 2 == 0
        topic = topics[i % len(topics)]
        text = (
            f"Write a long detailed essay about {topic}." if long else f"One word: what colour are {topic}?"
        )
        prompts.append(
            json.dumps({"idx": i, "dataset": "x", "instruction": text, "prompt_tokens_smollm2": 9})
        )
        for m, scale in (("big", 2.0), ("small", 1.0), ("NullModel", 1.0)):
            n = int((600 if long else 20) * scale * rng.uniform(0.7, 1.3))
            lengths.append(f"{m},{i},{n},{n * 5},{n}")
        lengths.append(f"gpt4_gamed,{i},1,1,{4000}")
        rec = {"idx": i, "model": "served", "prompt_tokens": 9, "output_tokens": 300 if long else 1}
        collected.append(
            rec | {"finish_reason": "stop", "seconds": 1.0, "max_tokens": 2048, "temperature": 0.7}
        )
    data_dir = root / "data"
    data_dir.mkdir()
    (data_dir / "alpaca_eval_prompts.jsonl").write_text("\n".join(prompts) + "\n")
    with gzip.open(data_dir / "alpaca_eval_response_lengths.csv.gz", "wt") as f:
        f.write("\n".join(lengths) + "\n")
    col = root / "served.jsonl"
    col.write_text("\n".join(json.dumps(c) for c in collected) + "\n" + '{"idx": 99, "trunc')
    return data_dir, col


def test_loading_applies_the_rules_to_files(tmp_path: Path) -> None:
    data_dir, col = _synthetic_data_dir(tmp_path)
    data = load_length_data(data_dir, [col, tmp_path / "missing.jsonl"])
    assert sorted(data.models) == ["big", "served", "small"]  # excluded models dropped
    served = data.tokens[data.cols == data.models.index("served")]
    assert len(served) == 20 and set(served.tolist()) == {300}  # 1-token answers dropped
    assert len(data.content_hash()) == 64


def test_tiny_training_run_writes_a_loadable_artifact(tmp_path: Path) -> None:
    from services.predictor.train import train

    data_dir, col = _synthetic_data_dir(tmp_path)
    out = tmp_path / "artifact"
    meta = train(data_dir, out, collected=[col], layers=1, epochs=2, lr=3e-3, seed=0, progress=False)
    assert (out / "metadata.json").is_file() and (out / "proxy.safetensors").is_file()
    assert meta["models"] == ["big", "small", "served"] and meta["served_models"] == ["served"]
    assert len(meta["edges_tokens"]) == 4 and meta["net"]["layers"] == 1
    assert set(meta["metrics"]["validation"]) >= {"accuracy", "within_one", "kendall_tau_per_model"}
    p = ProxyLengthPredictor.load(out)
    assert p.version == meta["version"] and p.models == meta["models"]
    long, short = p.log_tokens(_items("big", ["Write a long detailed essay about owls.", "One word: owls?"]))
    assert float(long) > float(short)
    assert p.predict(_items("served", ["hello"]))[0].predictor == p.ident


@needs_shared_data("alpaca_eval_prompts.jsonl")
def test_real_data_loads_with_the_documented_shape() -> None:
    data = load_length_data(SHARED_DATA)
    assert len(data.texts) == 805
    assert "NullModel" not in data.models and "gpt4_gamed" not in data.models
    assert len(data.models) == 225
    assert data.tokens.min() >= 2 and data.tokens.max() <= MAX_TOKENS
    train, _, _ = split_by_prompt(len(data.texts), seed=0)
    assert class_edges(data.subset(train).tokens, edge_percentiles(5)) == [145, 308, 484, 1132]


def test_collected_answers_cut_by_max_tokens_count_as_longest(tmp_path: Path) -> None:
    """A runaway answer stopped by the collection's max_tokens is labelled with the global cap."""

    from services.predictor.data import read_collected

    path = tmp_path / "m.jsonl"
    rows = [
        {
            "idx": 1,
            "model": "m",
            "prompt_tokens": 5,
            "output_tokens": 300,
            "finish_reason": "stop",
            "seconds": 1.0,
            "max_tokens": 1100,
            "temperature": 0.7,
        },
        {
            "idx": 2,
            "model": "m",
            "prompt_tokens": 5,
            "output_tokens": 1100,
            "finish_reason": "length",
            "seconds": 9.0,
            "max_tokens": 1100,
            "temperature": 0.7,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(read_collected([path])) == [("m", 1, 300), ("m", 2, MAX_TOKENS)]


def test_fast_encoder_matches_hf_bert_on_padded_batches() -> None:
    import copy

    import torch

    from services.predictor.fast_encoder import FastBertEncoder
    from services.predictor.proxy import load_encoder, load_tokenizer, pad_sequences
    from services.worker.models import minilm_path

    bert = load_encoder(minilm_path(), 3)
    fast = FastBertEncoder(copy.deepcopy(bert))
    tok = load_tokenizer(minilm_path())
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ids, mask = pad_sequences(seqs)
    with torch.inference_mode():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fast(ids, mask)
        alone = fast(*pad_sequences(seqs[:1]))
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], atol=1e-4)
    assert torch.allclose(alone[0], ref[0, : len(seqs[0])], atol=1e-4)  # no mask path


# -- the LM encoder (the served LLM's own first layers) ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> object:
    from services.predictor.proxy import default_encoder_dir, load_tokenizer

    return load_tokenizer(default_encoder_dir("smollm2"))


def test_lm_prompt_tokens_are_what_the_worker_feeds_the_model(smollm2_tokenizer: object) -> None:
    from services.predictor.proxy import NetConfig, token_sequences
    from services.worker.models import chat_prompt_ids

    texts = ["What is the capital of France?", " leading space", "Line\nbreak and émoji 🎉", ""]
    got = token_sequences(smollm2_tokenizer, texts, NetConfig(encoder="smollm2"))
    assert got == [chat_prompt_ids(smollm2_tokenizer, [{"role": "user", "content": t}]) for t in texts]
    # A long prompt keeps its head and tail tokens inside the template's frame.
    long = " ".join(f"w{i}" for i in range(2000))
    (cut,) = token_sequences(
        smollm2_tokenizer, [long], NetConfig(encoder="smollm2", head_tokens=10, tail_tokens=5)
    )
    full = chat_prompt_ids(smollm2_tokenizer, [{"role": "user", "content": long}])
    frame = len(got[3])  # the empty prompt is the frame alone
    assert len(cut) == frame + 15
    assert cut[-6:] == full[-6:] and cut[:30] == full[:30]


def test_tiny_lm_encoder_training_run_writes_a_loadable_artifact(tmp_path: Path) -> None:
    from services.predictor.train import train

    data_dir, col = _synthetic_data_dir(tmp_path)
    out = tmp_path / "lm-artifact"
    with pytest.raises(ValueError, match="bfloat16"):
        train(data_dir, out, collected=[col], encoder="smollm2", layers=2, int8=True, progress=False)
    meta = train(
        data_dir, out, collected=[col], encoder="smollm2", layers=2, epochs=30, seed=0, progress=False
    )
    assert meta["name"] == "proxy-smollm2" and meta["net"]["encoder"] == "smollm2"
    assert meta["inference"] == {"int8": False, "dtype": "bfloat16"}
    assert meta["encoder"]["frozen"] and meta["encoder"]["layers_used"] == 2
    # Only the head, the model table and the feature statistics are stored: no encoder weights.
    from safetensors.torch import load_file

    stored = load_file(str(out / "proxy.safetensors"))
    assert not any(k.startswith("encoder.") for k in stored) and {"feat_mu", "feat_sd"} <= set(stored)
    p = ProxyLengthPredictor.load(out)
    assert p.ident == f"proxy-smollm2@{meta['version']}"
    long, short = p.log_tokens(_items("big", ["Write a long detailed essay about owls.", "One word: owls?"]))
    assert float(long) > float(short)
    with pytest.raises(ValueError, match="bfloat16"):
        ProxyLengthPredictor.load(out, quantize=True)


def test_lm_encoder_lora_starts_neutral_trains_and_merges_to_the_same_function(
    smollm2_tokenizer: object,
) -> None:
    import torch

    from services.predictor.lm_encoder import chat_frame, load_lm_encoder
    from services.predictor.proxy import NetConfig, default_encoder_dir, token_sequences

    enc = load_lm_encoder(default_encoder_dir("smollm2"), 2)
    enc.set_prefix(chat_frame(smollm2_tokenizer)[0])
    seqs = token_sequences(smollm2_tokenizer, TEXTS, NetConfig(encoder="smollm2"))
    with torch.inference_mode():
        base = enc.encode(seqs)
    enc.add_lora(rank=4, alpha=8.0)
    lora = [p for n, p in enc.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 5 * 2  # A and B on each of the 5 fused weights of both layers
    with torch.inference_mode():
        assert torch.allclose(enc.encode(seqs), base, atol=1e-5)  # B starts at zero
    opt = torch.optim.SGD(lora, lr=1e-3)
    for _ in range(2):  # gradients flow through the packed forward and the per-call prefix
        loss = enc.encode(seqs).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in lora)
    with torch.inference_mode():
        tuned = enc.encode(seqs)
        enc.merge_lora()
        merged = enc.encode(seqs)
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert torch.allclose(merged, tuned, atol=1e-3, rtol=1e-4)
    assert not any("lora_" in n for n, _ in enc.named_parameters())


def test_tuned_lm_student_stores_only_adapters_and_loads_merged(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from services.predictor.train import train

    data_dir, col = _synthetic_data_dir(tmp_path)
    teacher = tmp_path / "teacher"
    train(data_dir, teacher, collected=[col], encoder="smollm2", layers=2, epochs=10, seed=0, progress=False)
    out = tmp_path / "student"
    meta = train(
        data_dir, out, encoder="smollm2", layers=1, epochs=2, lr=1e-3, seed=0, progress=False,
        teacher=teacher, unlabeled=["Write a long essay about owls."], tune=True,
    )  # fmt: skip
    assert meta["net"]["tune"] is True and not meta["encoder"]["frozen"]
    assert "-1L-lora-" in meta["version"]
    assert meta["training"]["distillation"]["models_from_teacher"] == ["served"]
    stored = load_file(str(out / "proxy.safetensors"))
    adapters = [k for k in stored if k.startswith("encoder.")]
    assert adapters and all(".lora_" in k for k in adapters)  # never the packaged weights themselves
    assert {"feat_mu", "feat_sd"} <= set(stored)
    p = ProxyLengthPredictor.load(out)
    assert not any(".lora_" in n for n, _ in p.net.named_parameters())  # merged for serving
    texts = ["Write a long detailed essay about owls.", "One word: owls?"]
    long, short = p.log_tokens(_items("served", texts))
    assert math.isfinite(float(long)) and math.isfinite(float(short))


def test_distilled_student_learns_from_a_teacher_on_unlabeled_prompts(tmp_path: Path) -> None:
    from services.predictor.train import train

    data_dir, col = _synthetic_data_dir(tmp_path)
    teacher = tmp_path / "teacher"
    train(data_dir, teacher, collected=[col], layers=1, epochs=3, lr=3e-3, seed=0, progress=False)
    unlabeled = [f"Write a long detailed essay about {t}." for t in ("owls", "glue")] + ["One word: owls?"]
    out = tmp_path / "student"
    # No collected file this time: the served model's column comes from the teacher alone.
    meta = train(
        data_dir, out, layers=1, epochs=2, lr=3e-3, seed=0, progress=False,
        teacher=teacher, unlabeled=unlabeled, augment=1,
    )  # fmt: skip
    distill = meta["training"]["distillation"]
    assert distill["unlabeled_prompts"] == 3 + (24 + 3) and distill["augment"] == 1  # 24 train prompts
    assert distill["teacher"].startswith("1.") and distill["models_unknown_to_teacher"] == []
    assert distill["models_from_teacher"] == ["served"] and meta["served_models"] == ["served"]
    assert meta["models"] == ["big", "small", "served"] and meta["train_answers"]["served"] == 0
    student = ProxyLengthPredictor.load(out)
    assert student.version == meta["version"] and student.knows("served")
    texts = ["Write a long detailed essay about owls.", "One word?"]
    long, short = student.log_tokens(_items("served", texts))
    assert float(long) > float(short)
    # A teacher trained on another split may have learnt this run's held-out prompts.
    with pytest.raises(ValueError, match="split seed"):
        train(data_dir, tmp_path / "x", collected=[col], layers=1, epochs=1, seed=1, progress=False,
              teacher=teacher)  # fmt: skip
    with pytest.raises(ValueError, match="teacher"):
        train(data_dir, tmp_path / "y", layers=1, epochs=1, progress=False, unlabeled=unlabeled)


@needs_shared_data("sharegpt_v3_first_prompts_1000.json")
def test_unlabeled_prompts_never_include_an_alpacaeval_prompt() -> None:
    from services.predictor.data import read_prompt_table, read_unlabeled_prompts

    every = read_unlabeled_prompts(SHARED_DATA)
    assert 900 <= len(every) <= 1000 and all(t.strip() for t in every)
    assert len({" ".join(t.split()).lower() for t in every}) == len(every)  # no duplicates
    banned = [every[0].upper() + "  ", every[5]]
    kept = read_unlabeled_prompts(SHARED_DATA, banned)
    assert len(kept) == len(every) - 2 and every[0] not in kept and every[5] not in kept
    alpaca = read_prompt_table(SHARED_DATA).values()
    assert len(read_unlabeled_prompts(SHARED_DATA, alpaca)) <= len(every)


def test_unknown_encoder_is_rejected(tmp_path: Path) -> None:
    from services.predictor.proxy import default_encoder_dir
    from services.predictor.train import train

    with pytest.raises(ValueError, match="encoder"):
        default_encoder_dir("bert-large")
    with pytest.raises(ValueError, match="encoder"):
        train(tmp_path, tmp_path / "x", encoder="bert-large", progress=False)


def test_lm_encoder_prefix_cache_changes_nothing_but_the_cost(smollm2_tokenizer: object) -> None:
    import torch

    from services.predictor.lm_encoder import chat_frame, load_lm_encoder
    from services.predictor.proxy import NetConfig, default_encoder_dir, pad_sequences, token_sequences

    enc = load_lm_encoder(default_encoder_dir("smollm2"), 2)
    texts = [*TEXTS, "x"]
    cfg = NetConfig(encoder="smollm2")
    ids, mask = pad_sequences(token_sequences(smollm2_tokenizer, texts, cfg))
    other = smollm2_tokenizer("no template at all", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    mixed_ids, mixed_mask = pad_sequences([*token_sequences(smollm2_tokenizer, texts[:2], cfg), other])
    with torch.inference_mode():
        full, mixed_full = enc(ids, mask), enc(mixed_ids, mixed_mask)
        enc.set_prefix(chat_frame(smollm2_tokenizer)[0])
        cached, mixed_cached = enc(ids, mask), enc(mixed_ids, mixed_mask)
        enc.to(torch.bfloat16)  # the cached prefix follows the encoder's dtype
        half = enc(ids, mask).float()
    assert torch.allclose(full, cached, atol=1e-3)
    assert torch.allclose(mixed_full, mixed_cached, atol=1e-3)  # a row without the prefix: no shortcut
    cos = torch.nn.functional.cosine_similarity(full, half, dim=-1)
    assert bool((cos > 0.99).all())


def test_lm_encoder_matches_transformers_hidden_states_packed_or_alone(smollm2_tokenizer: object) -> None:
    """The lean packed forward is transformers' Llama forward: same hidden state at each last token."""
    import torch

    from services.predictor.lm_encoder import ROW_BUCKET, chat_frame, load_lm_encoder
    from services.predictor.proxy import NetConfig, default_encoder_dir, token_sequences
    from services.worker.models import load_causal_lm

    folder = default_encoder_dir("smollm2")
    # One layer more: transformers' last hidden state is after the final norm; layer 2's output is not.
    ref_model, _ = load_causal_lm(folder, dtype="float32", num_hidden_layers=3)
    enc = load_lm_encoder(folder, 2)
    enc.set_prefix(chat_frame(smollm2_tokenizer)[0])
    seqs = token_sequences(smollm2_tokenizer, [*TEXTS, "x" * 300], NetConfig(encoder="smollm2"))
    seqs.append(smollm2_tokenizer("no template", add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    assert sum(len(s) for s in seqs) % ROW_BUCKET != 0  # the bucket padding is exercised
    with torch.inference_mode():
        layer_out = [ref_model.model(input_ids=torch.tensor([s]), output_hidden_states=True) for s in seqs]
        want = torch.stack([out.hidden_states[2][0, -1] for out in layer_out])
        packed = enc.encode(seqs)
        alone = torch.cat([enc.encode([s]) for s in seqs])
    assert torch.allclose(packed, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(alone, packed, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        enc.encode([seqs[0], []])


def test_lm_encoder_bf16_fused_products_agree_with_plain_ones(
    smollm2_tokenizer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN's packed, fused bf16 products (where this CPU has them) give the plain products' result."""
    import torch

    from services.predictor import lm_encoder
    from services.predictor.proxy import NetConfig, default_encoder_dir, token_sequences

    enc = lm_encoder.load_lm_encoder(default_encoder_dir("smollm2"), 2)
    enc.set_prefix(lm_encoder.chat_frame(smollm2_tokenizer)[0])
    seqs = token_sequences(smollm2_tokenizer, TEXTS, NetConfig(encoder="smollm2"))
    with torch.inference_mode():
        full = enc.encode(seqs)
        enc.to(torch.bfloat16)
        fused = enc.encode(seqs).float()
        assert (enc.blocks[0].packed() is not None) == lm_encoder._onednn_ok(torch.bfloat16)
        monkeypatch.setattr(lm_encoder, "_onednn_ok", lambda dtype: False)
        assert enc.blocks[0].packed() is None
        plain = enc.encode(seqs).float()
    for got in (fused, plain):
        assert bool((torch.nn.functional.cosine_similarity(full, got, dim=-1) > 0.999).all())


def test_lm_encoder_rejects_other_architectures() -> None:
    from types import SimpleNamespace

    from services.predictor.lm_encoder import LMLastTokenEncoder

    cfg = SimpleNamespace(model_type="gpt2", hidden_act="gelu_new", attention_bias=True)
    with pytest.raises(ValueError, match="Llama"):
        LMLastTokenEncoder(SimpleNamespace(config=cfg))


def test_eval_scores_two_artifacts_side_by_side_and_writes_the_report(tmp_path: Path) -> None:
    from services.predictor.evaluate import evaluate
    from services.predictor.train import train

    data_dir, col = _synthetic_data_dir(tmp_path)
    mini, lm = tmp_path / "mini", tmp_path / "lm"
    train(data_dir, mini, collected=[col], layers=1, epochs=1, progress=False)
    train(data_dir, lm, collected=[col], encoder="smollm2", layers=1, epochs=5, progress=False)
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="taken"):
        evaluate(data_dir, mini, out, collected=[col], compare={"median": lm}, latency=False)
    r = evaluate(data_dir, mini, out, collected=[col], compare={"lm": lm}, latency_threads=(1,))
    assert {"proxy", "lm", "median", "prompt_length", "frozen_ridge", "oracle"} <= set(r["predictors"])
    test = r["settings"]["all_models"]["test"]
    assert {"accuracy", "kendall_tau_per_model"} <= set(test["lm"]) and test["lm"] != test["proxy"]
    assert r["latency"]["ident"].startswith("proxy-minilm@")
    assert r["latency_compare"]["lm"]["ident"].startswith("proxy-smollm2@")
    assert "p50 ms per request at batch 8 <= 5 (lm)" in r["targets"]
    assert set(r["served_models"]["served"]["test"]) >= {"proxy", "lm", "median"}
    md = (out / "predictor-eval.md").read_text()
    assert "| lm |" in md and "### `lm`: proxy-smollm2@" in md
    assert (out / "predictor-eval.json").is_file() and (out / "predictor-eval.png").stat().st_size > 0


def test_cross_validation_trains_and_scores_one_artifact_per_split(tmp_path: Path) -> None:
    from services.predictor.crossval import cross_validate

    data_dir, col = _synthetic_data_dir(tmp_path)
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="teacher"):
        cross_validate(data_dir, tmp_path / "w", out, encoder="smollm2", distil=True)
    r = cross_validate(
        data_dir, tmp_path / "work", out, seeds=(0, 1), encoder="minilm", distil=True, collected=[col],
        teacher_kwargs={"layers": 1, "epochs": 2}, layers=1, epochs=1, progress=False, log=lambda _: None,
    )  # fmt: skip
    assert [f["seed"] for f in r["folds"]] == [0, 1]
    teacher = json.loads((tmp_path / "work" / "seed1-teacher" / "metadata.json").read_text())
    student = json.loads((tmp_path / "work" / "seed1" / "metadata.json").read_text())
    assert teacher["data"]["split"]["seed"] == 1 and student["data"]["split"]["seed"] == 1
    assert student["training"]["distillation"]["teacher"] == teacher["version"]
    folds = [f["settings"]["all_models"]["test"]["accuracy"] for f in r["folds"]]
    acc = r["summary"]["all_models"]["accuracy"]
    assert acc["mean"] == pytest.approx(np.mean(folds)) and acc["min"] == min(folds)
    md = (out / "predictor-cv.md").read_text()
    assert "mean +- sd" in md and (out / "predictor-cv.json").is_file()
    assert (out / "predictor-cv.png").stat().st_size > 0
    # Another split added to the report later: splits 0 and 1 are read back from work, not retrained.
    trained = (tmp_path / "work" / "seed1" / "metadata.json").stat().st_mtime_ns
    more = cross_validate(
        data_dir, tmp_path / "work", out, seeds=(1, 2), encoder="minilm", distil=True, collected=[col],
        teacher_kwargs={"layers": 1, "epochs": 2}, layers=1, epochs=1, progress=False, log=lambda _: None,
        add=True,
    )  # fmt: skip
    assert more["seeds"] == [0, 1, 2] and (tmp_path / "work" / "seed2" / "metadata.json").is_file()
    assert (tmp_path / "work" / "seed1" / "metadata.json").stat().st_mtime_ns == trained
    assert more["folds"][:2] == r["folds"]
    with pytest.raises(ValueError, match="another recipe"):
        cross_validate(data_dir, tmp_path / "w2", out, seeds=(3,), encoder="smollm2", add=True)
