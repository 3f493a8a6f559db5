"""Loading a trained run: its model from the newest good checkpoint, its tokenizer, its data,
and generation from it. Readers of runs (generate, diagnose, the comparison report) come here."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

from resstream.config import ConfigError
from resstream.data import PreparedData, prepare
from resstream.data.tokenizer import find_eot_id, load_tokenizer
from resstream.model import LM
from resstream.model.config import ModelConfig
from resstream.model.generate import stream_generate
from resstream.runs.checkpoint import latest_good_checkpoint, load_model_state
from resstream.runs.config import RunConfig
from resstream.runs.folder import TOKENIZER, read_run_config


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


def load_run(run_dir: Path | str, device: str = "cpu"):
    """Load a finished or partial run: (model in eval mode, RunConfig, PreparedData).

    Uses the newest checkpoint that verifies. The data is reopened from its cache folder
    or prepared again from the recorded config (deterministic) if the cache is gone.
    """
    meta = read_run_config(run_dir)
    model, run_cfg, _, _ = load_run_model(run_dir, device, meta=meta)
    try:
        data = PreparedData.from_dir(Path(meta.get("data_dir", "")))
    except Exception:
        data = prepare(run_cfg.data)
    return model, run_cfg, data


def generate_from_run(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                      out: TextIO = sys.stdout) -> str:
    """Load a run (its newest good checkpoint), write the prompt and its streamed continuation
    to ``out``, and return the continuation. Stops early at the run's end-of-text token."""
    model, _run_config, tokenizer, eot = load_run_model(run_dir)  # the run's own tokenizer.json
    pieces = stream_generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, eot)
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
