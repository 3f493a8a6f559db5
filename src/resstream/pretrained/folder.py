"""Writing model folders atomically, and resstream's own model folder.

A resstream model folder holds a model of any residual kind (what ``resstream convert``
writes)::

    DIR/model.json          {"format": "resstream-model", "model": ModelConfig, "eot_id", ...}
    DIR/model.safetensors   every parameter, residual ones included (a tied head stored once)
    DIR/tokenizer.json      the model's tokenizer

Every folder is built under a temporary name beside its destination, fsynced, and renamed
into place, so an interrupted write never leaves a folder that looks complete, and an
existing folder is never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model import LM

FORMAT = "resstream-model"
MODEL_JSON = "model.json"


def write_folder(out: Path | str, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Create the folder ``out`` holding one file per ``writers`` entry (name -> write(path))."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"'{out}' already exists; choose another --out (nothing is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot write '{out}': {e.strerror}; choose another --out") from None
    try:
        for name, write in writers.items():
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_tensors(model: LM) -> dict[str, torch.Tensor]:
    """The state dict with a tied head stored once (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not (k == "head.weight" and model.cfg.tie_embeddings)}


def is_model_folder(path: Path) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def save_model_folder(out: Path | str, model: LM, tokenizer_json: str, eot_id: int, record: dict | None = None) -> Path:
    """Write ``model`` (any residual kind) with its tokenizer as a resstream model folder.
    ``record``: anything worth keeping with it (where it came from, conversion figures)."""
    meta = {"format": FORMAT, "version": 1, "model": model.cfg.to_dict(), "eot_id": eot_id, **(record or {})}
    return write_folder(out, {
        MODEL_JSON: lambda p: p.write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n"),
        "model.safetensors": lambda p: save_file(model_tensors(model), str(p), metadata={"format": "pt"}),
        "tokenizer.json": lambda p: p.write_text(tokenizer_json, encoding="utf-8"),
    })


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / MODEL_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path / MODEL_JSON}' is unreadable ({e}); the folder is damaged") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"'{path / MODEL_JSON}' is not a resstream model folder (format {meta.get('format')!r})")
    return meta


def read_model_config(path: Path | str) -> ModelConfig:
    return ModelConfig.from_dict(_read_meta(Path(path))["model"], prefix="model.")


def read_model_folder(path: Path | str, dtype: torch.dtype = torch.float32) -> tuple[LM, dict]:
    """(model in eval mode, the model.json record) of a resstream model folder."""
    path = Path(path)
    meta = _read_meta(path)
    model = LM(ModelConfig.from_dict(meta["model"], prefix="model."))
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own errors on truncated files
        raise ConfigError(f"'{path / 'model.safetensors'}' is unreadable ({type(e).__name__}); the folder is damaged") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"'{path}': weights do not fit model.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype).eval(), meta
