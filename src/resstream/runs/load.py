"""Loading a trained run: its model from the newest good checkpoint, its tokenizer, its data,
and generation from it. Readers of runs (generate, diagnose, the comparison report) come here.
``load_model`` takes a run folder or any pretrained model path (``resstream.pretrained``)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from typing import Optional, TextIO

from resstream.config import ConfigError
from resstream.data import PreparedData, prepare
from resstream.data.tokenizer import find_eot_id, load_tokenizer
from resstream.model import LM
from resstream.model.config import ModelConfig
from resstream.model.generate import stream_generate
from resstream.pretrained import LoadedModel, load
from resstream.runs.checkpoint import latest_good_checkpoint, load_model_state
from resstream.runs.config import RunConfig
from resstream.runs.folder import CONFIG, TOKENIZER, read_json, read_run_config


def load_run_model(run_dir: Path | str, device: str = "cpu", meta: dict | None = None):
    """Load a run's model without its data: (model in eval mode, RunConfig, tokenizer, eot id).

    The tokenizer is the copy in RUN_DIR/tokenizer.json, so generation never needs the data
    cache. ``meta``: the run's config.json when the caller has read it already.
    """
    run_dir = Path(run_dir)
    meta = read_run_config(run_dir) if meta is None else meta
    found = latest_good_checkpoint(run_dir)
    if found is None:
        raise ConfigError(f"run folder '{run_dir}' has no usable checkpoint; train it first (or resume it with --resume)")
    model = LM(ModelConfig.from_dict(meta["model"]))
    load_model_state(model, found[2])
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    return model.to(device).eval(), RunConfig.from_dict(meta["run"]), tokenizer, find_eot_id(tokenizer)


def run_data(run_dir: Path | str, run_cfg: RunConfig, meta: dict | None = None) -> PreparedData:
    """The run's prepared data: reopened from its cache folder, or prepared again from the
    recorded config (deterministic) if the cache is gone."""
    meta = read_run_config(run_dir) if meta is None else meta
    try:
        return PreparedData.from_dir(Path(meta.get("data_dir", "")))
    except Exception:
        return prepare(run_cfg.data)


def load_run(run_dir: Path | str, device: str = "cpu"):
    """Load a finished or partial run: (model in eval mode, RunConfig, PreparedData).

    Uses the newest checkpoint that verifies; the data as ``run_data`` finds it.
    """
    meta = read_run_config(run_dir)
    model, run_cfg, _, _ = load_run_model(run_dir, device, meta=meta)
    return model, run_cfg, run_data(run_dir, run_cfg, meta)


def is_run_folder(path: Path | str) -> bool:
    """A folder made by ``resstream train`` (its config.json has a "run" section; a Hugging
    Face folder's has none). A damaged config.json counts, so that reading it reports why."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    meta = read_json(path / CONFIG)
    return meta is None or "run" in meta


def load_model(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Any model path: a run folder (its newest good checkpoint), a resstream model folder, a
    Hugging Face folder or a GGUF file, with its own tokenizer (see ``resstream.pretrained``)."""
    if not is_run_folder(path):
        return load(path, dtype=dtype, device=device)
    run_dir = Path(path)
    model, run_cfg, tokenizer, eot = load_run_model(run_dir, device)
    return LoadedModel(model.to(dtype), tokenizer, run_dir / TOKENIZER, eot, run_cfg.name, "run", run_dir,
                       run_config=run_cfg)


def generate_from_run(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                      out: TextIO = sys.stdout) -> str:
    """Load a run (its newest good checkpoint) or any model path (a GGUF file, a Hugging Face or
    resstream model folder), write the prompt and its streamed continuation to ``out``, and
    return the continuation. Stops early at the model's end-of-text token."""
    loaded = load_model(run_dir)  # with the model's own tokenizer
    pieces = stream_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                             loaded.eot_id)
    out.write(prompt)
    out.flush()
    parts = []
    for piece in pieces:
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)
