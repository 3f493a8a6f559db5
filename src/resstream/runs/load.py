"""Loading a trained run: its model from the newest good checkpoint, its tokenizer, its data,
and generation from it. Readers of runs (generate, diagnose, the comparison report) come here.
``load_model`` takes a run folder or any pretrained model path (``resstream.pretrained``)."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Optional, TextIO

import torch

from resstream.config import ConfigError, DataConfig
from resstream.data import PreparedData, prepare
from resstream.data.tokenizer import find_eot_id, load_tokenizer
from resstream.model import LM
from resstream.model.config import ModelConfig
from resstream.model.generate import check_sampling, stream_generate
from resstream.model.memory import check_memory
from resstream.parallel.checkpoint import read_sharded
from resstream.pretrained import LoadedModel, load
from resstream.runs.checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints, load_model_state, nonfinite_tensor
from resstream.runs.config import RunConfig
from resstream.runs.folder import CONFIG, TOKENIZER, read_json, read_run_config


def load_run_model(run_dir: Path | str, device: str = "cpu", meta: dict | None = None,
                   trust_unverified: bool = False, prompt: str = "", max_new_tokens: int = 0):
    """Load a run's model without its data: (model in eval mode, RunConfig, tokenizer, eot id).

    The tokenizer is the copy in RUN_DIR/tokenizer.json, so generation never needs the data
    cache. ``meta``: the run's config.json when the caller has read it already. Its values are
    validated like any config, and a model that cannot fit in memory while generating
    ``max_new_tokens`` after ``prompt`` is refused before anything is allocated.
    ``trust_unverified``: load checkpoints that record no SHA-256 (refused otherwise).
    """
    run_dir = Path(run_dir)
    meta = read_run_config(run_dir) if meta is None else meta
    run_cfg, mcfg = _configs(run_dir, meta)
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    context = max(1, min(len(tokenizer.encode(prompt).ids) + max(max_new_tokens, 0), mcfg.max_seq_len))
    knobs = {"model.vocab_size": (mcfg.vocab_size, DataConfig.vocab_size, {"weights": 1, "activations": 1}),
             "--max-new-tokens": (max_new_tokens, 100, {"activations": 1})}
    try:
        check_memory(mcfg, 1, context, torch.device(device), training=False, knobs=knobs)
    except ConfigError as e:
        raise ConfigError(f"{run_dir / CONFIG}: {e}") from None
    found = latest_good_checkpoint(run_dir, trust_unverified=trust_unverified)
    if found is None and list_checkpoints(run_dir):
        raise ConfigError(f"no checkpoint of '{run_dir}' can be used (see the warnings above); "
                          "--trust-unverified loads those that only lack hashes")
    if found is None:
        raise ConfigError(f"run folder '{run_dir}' has no checkpoint yet; train it first (or resume it with --resume)")
    model = LM(mcfg)
    path, _, model_sd, _ = found
    if model_sd is None:  # sharded (FSDP / pipeline run): every piece read into the whole model
        read_sharded(path, model)
        bad = nonfinite_tensor(model.state_dict())
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} holds non-finite values ({bad}); it is not a good checkpoint")
    else:
        load_model_state(model, model_sd)
    return model.to(device).eval(), run_cfg, tokenizer, find_eot_id(tokenizer)


def _configs(run_dir: Path, meta: dict) -> tuple[RunConfig, ModelConfig]:
    """The run's configs from its config.json, validated (it may have been edited)."""
    try:
        return RunConfig.from_dict(meta["run"]), ModelConfig.from_dict(meta["model"], prefix="model.")
    except ConfigError as e:
        raise ConfigError(f"{run_dir / CONFIG}: {e}") from None


def run_data(run_dir: Path | str, run_cfg: RunConfig, meta: dict | None = None) -> PreparedData:
    """The run's prepared data: reopened from its cache folder, or prepared again from the
    recorded config (deterministic) if the cache is gone."""
    meta = read_run_config(run_dir) if meta is None else meta
    try:
        return PreparedData.from_dir(Path(meta.get("data_dir", "")))
    except Exception:
        return prepare(run_cfg.data)


def load_run(run_dir: Path | str, device: str = "cpu", trust_unverified: bool = False):
    """Load a finished or partial run: (model in eval mode, RunConfig, PreparedData).

    Uses the newest checkpoint that verifies; the data as ``run_data`` finds it.
    """
    meta = read_run_config(run_dir)
    model, run_cfg, _, _ = load_run_model(run_dir, device, meta=meta, trust_unverified=trust_unverified)
    return model, run_cfg, run_data(run_dir, run_cfg, meta)


def is_run_folder(path: Path | str) -> bool:
    """A folder made by ``resstream train`` (its config.json has a "run" section; a Hugging
    Face folder's has none). A damaged config.json (unreadable, not a JSON object) counts, so
    that reading it reports why."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    meta = read_json(path / CONFIG)
    return not isinstance(meta, dict) or "run" in meta


def load_model(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               trust_unverified: bool = False, prompt: str = "", max_new_tokens: int = 0) -> LoadedModel:
    """Any model path: a run folder (its newest good checkpoint; ``trust_unverified``, ``prompt``
    and ``max_new_tokens`` as in load_run_model), a resstream model folder, a Hugging Face folder
    or a GGUF file, with its own tokenizer (see ``resstream.pretrained``)."""
    if not is_run_folder(path):
        return load(path, dtype=dtype, device=device)
    run_dir = Path(path)
    model, run_cfg, tokenizer, eot = load_run_model(run_dir, device, trust_unverified=trust_unverified, prompt=prompt,
                                                    max_new_tokens=max_new_tokens)
    return LoadedModel(model.to(dtype), tokenizer, run_dir / TOKENIZER, eot, run_cfg.name, "run", run_dir,
                       run_config=run_cfg)


def generate_from_run(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                      out: TextIO = sys.stdout, trust_unverified: bool = False, tp: int = 1) -> str:
    """Load a run (its newest good checkpoint) or any model path (a GGUF file, a Hugging Face or
    resstream model folder), write the prompt and its streamed continuation to ``out``, and
    return the continuation. Stops early at the model's end-of-text token. Warnings (a
    checkpoint skipped, ...) go to stderr, never into ``out``.

    ``tp`` > 1: tensor-parallel over the processes of a torchrun launch (a multiple of tp);
    every rank computes the same tokens (one shared seed), rank 0 writes them."""
    check_sampling(temperature, top_k, top_p, seed)  # before the model is loaded
    loaded = load_model(run_dir, trust_unverified=trust_unverified, prompt=prompt, max_new_tokens=max_new_tokens)
    if tp > 1:
        from resstream.parallel import tensor as tp_

        tp_.parallelize(loaded.model, tp_.make_mesh("cpu", tp)["tp"])
        seed = tp_.shared_seed(seed)
        out = out if tp_.is_main() else io.StringIO()
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
