"""Continued training from a pretrained model (``RunConfig.init_from``).

The run takes the model's shape, tokenizer and weights; the config chooses only the residual
kind (and may lower max_seq_len). ``resolve_init_from`` writes the model's whole shape into
the config's model section and a cached copy of its tokenizer into ``data.tokenizer``, so the
corpus is re-tokenized with it and the resolved config, saved in the run folder, describes
the run on its own: resuming needs neither the model file nor a second resolution
(resolving again changes nothing). ``init_weights`` then loads the weights into
the freshly built LM: every non-residual parameter, and the residual ones when the source
already has the run's residual config. A stream that starts as PreNorm (``identity_at_init``)
makes step 0 compute exactly the pretrained model's function, up to the norms' epsilon.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from resstream.config import ConfigError
from resstream.model import LM
from resstream.model.config import ModelConfig
from resstream.pretrained import copy_weights_into, describe
from resstream.pretrained.load import cached_tokenizer_file
from resstream.runs.config import RunConfig
from resstream.runs.folder import TOKENIZER, read_run_config
from resstream.runs.load import is_run_folder, load_model

FREE_KEYS = ("residual", "max_seq_len")  # what a run may choose; the rest is the model's


def _source(path: str) -> tuple[ModelConfig, Path]:
    if is_run_folder(path):
        tok = cached_tokenizer_file(Path(path) / TOKENIZER)
        return ModelConfig.from_dict(read_run_config(path)["model"], prefix="model."), tok
    return describe(path)


def _same_file(a: str | Path, b: Path) -> bool:
    a = Path(a).expanduser()
    return a.is_file() and (a.resolve() == b.resolve() or a.read_bytes() == b.read_bytes())


def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the pretrained model's shape and tokenizer filled in (unchanged without
    ``init_from``). A shape key the config sets to another value than the model's is an error."""
    if cfg.init_from is None:
        return cfg
    src_cfg, tok_file = _source(cfg.init_from)
    src = src_cfg.to_dict()
    for key, value in cfg.model.items():
        if key not in FREE_KEYS and src.get(key, value) != value:
            raise ConfigError(f"model.{key}: {value!r} differs from {cfg.init_from}'s {src[key]!r}; with init_from the "
                              f"shape comes from the model (only {' and '.join(FREE_KEYS)} may be set)")
    if cfg.data.tokenizer is not None and not _same_file(cfg.data.tokenizer, tok_file):
        raise ConfigError(f"data.tokenizer: with init_from the data is tokenized with {cfg.init_from}'s own tokenizer; "
                          "drop data.tokenizer")
    model = {**src, **{k: cfg.model[k] for k in FREE_KEYS if k in cfg.model}}
    d = cfg.to_dict()
    return RunConfig.from_dict({**d, "model": model, "data": {**d["data"], "tokenizer": str(tok_file)}})


@torch.no_grad()
def init_weights(model: LM, cfg: RunConfig, say: Callable[[str], None] = print) -> None:
    """Load ``cfg.init_from``'s weights into ``model`` (built from the resolved config)."""
    loaded = load_model(cfg.init_from, dtype=next(model.parameters()).dtype)
    fresh = copy_weights_into(model, loaded.model)
    if fresh and not model.residual.identity_at_init:
        say(f"warning: residual kind '{model.cfg.residual.kind}' does not start as PreNorm: step 0 does not compute "
            f"{loaded.name}'s function")
    say(f"initialised from {loaded.path} ({loaded.source}); {len(fresh)} residual parameter tensors at their own init")
