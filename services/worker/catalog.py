"""Where a catalogue entry's weights and tokenizer live on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.common.settings import ModelSpec


def resolve_model_dir(spec: ModelSpec, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The HF folder of a model, converting packaged weights into the cache on first use."""
    from services.worker import models

    if spec.source == "smollm2":
        return models.ensure_smollm2(cache, log=log)
    if spec.source == "minilm":
        return models.minilm_path()
    path = Path(spec.source).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {spec.name!r}: {path} is not a Hugging Face model folder")
    return path


def tokenizer_file(spec: ModelSpec, cache: Path) -> Path | None:
    """The fast tokenizer's JSON if the model is already on disk (never converts anything)."""
    if spec.source == "smollm2":
        path = cache / "models" / "smollm2-135m-instruct" / "tokenizer.json"
    elif spec.source == "minilm":
        try:
            from services.worker import models

            path = models.minilm_path() / "tokenizer.json"
        except Exception:
            return None
    else:
        path = Path(spec.source).expanduser() / "tokenizer.json"
    return path if path.exists() else None
