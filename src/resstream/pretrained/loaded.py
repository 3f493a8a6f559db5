"""A model loaded from a path, with its tokenizer, and the one way weights enter a fresh LM."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tokenizers import Tokenizer
from torch import Tensor

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model import LM


@dataclass
class LoadedModel:
    """What every command that reads a model gets, whatever the path held.

    model: an LM in eval mode. tokenizer: the model's own tokenizer; tokenizer_file: a
    tokenizer.json holding exactly it (what ``data.tokenizer`` points at to re-tokenize a
    corpus). eot_id: where generation stops. source: "run", "resstream", "hf" or "gguf".
    run_config: the run's config when the path was a run folder.
    """

    model: LM
    tokenizer: Tokenizer
    tokenizer_file: Path
    eot_id: int
    name: str
    source: str
    path: Path
    run_config: Optional[Any] = None  # the run's RunConfig (runs/ sits above this room)
    info: dict = field(default_factory=dict)


def fill_model(cfg: ModelConfig, fetch: Callable[[str], Optional[Tensor]], where: str,
               dtype: torch.dtype = torch.float32, external: Callable[[str], str] = str) -> LM:
    """A new LM of shape ``cfg`` whose every non-residual parameter comes from ``fetch(name)``
    (resstream names; None when absent). Residual parameters keep the stream's own init.

    Shapes are checked, so a file that does not fit the config fails here naming the tensor
    (``external`` turns our name into the file's, for the message).
    """
    model = LM(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name.startswith("residual.") or (name == "head.weight" and cfg.tie_embeddings):
            continue
        t = fetch(name)
        if t is None:
            raise ConfigError(f"{where}: tensor '{external(name)}' is missing; the file does not hold a complete model")
        if tuple(t.shape) != tuple(p.shape):
            raise ConfigError(f"{where}: tensor '{external(name)}' has shape {list(t.shape)}, the config implies {list(p.shape)}")
        state[name] = t.to(p.dtype)
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()
