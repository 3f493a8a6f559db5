"""The ResidualStream contract and the registry of residual kinds.

Depth is a sequence of L sublayers (attention and MLP alternating), l = 0..L-1. Each
sublayer returns its raw output y_l = f_l(x_l). A ResidualStream owns every residual
parameter and keeps no state between calls; the state is passed explicitly::

    state = stream.init(emb)            # emb: token embeddings [B, T, D]
    x_l   = stream.read(state, l)       # input of sublayer l
    state = stream.write(state, l, y_l) # raw output of sublayer l
    h     = stream.finish(state)        # input of the final norm and LM head

The state is a plain dict, never modified in place (write returns a new dict), so
torch.compile, activation checkpointing and DDP see pure functions.

Kinds that mix over depth implement ``read_weighted`` / ``finish_weighted``, returning the
input together with its depth-mixing weights [B, T, n_sources] (None for kinds that do not
mix); ``read`` and ``finish`` are those same functions without the weights, so
diagnostics never run a second code path.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from resstream.model.config import ModelConfig

State = dict

_REGISTRY: dict[str, type["ResidualStream"]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a ResidualStream subclass to the registry under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"residual kind '{name}' registered twice")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_kinds() -> list[str]:
    return list(_REGISTRY)


def build_residual(cfg: "ModelConfig") -> "ResidualStream":
    kind = cfg.residual.kind
    if kind not in _REGISTRY:
        raise ValueError(f"unknown residual kind '{kind}'; known kinds: {', '.join(_REGISTRY)}")
    return _REGISTRY[kind](cfg)


class ResidualStream(nn.Module):
    """Base class. Subclasses implement init/read/write/finish and reset_parameters.

    ``identity_at_init``: True when a freshly initialised stream makes the LM compute the
    same logits as PreNorm with the same sublayer weights (tested for every kind that
    claims it).
    """

    kind: str = ""
    identity_at_init: bool = True
    mixes_depth: bool = False  # True when read() returns depth-mixing weights
    weights_sum_to_one: bool = True  # mixing weights form a convex combination (softmax kinds)

    def __init__(self, cfg: "ModelConfig") -> None:
        super().__init__()
        self.n_sublayers = cfg.n_sublayers
        self.d_model = cfg.d_model
        self.rcfg = cfg.residual

    def reset_parameters(self) -> None:
        pass

    def init(self, emb: Tensor) -> State:
        raise NotImplementedError

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def write(self, state: State, l: int, y: Tensor) -> State:
        raise NotImplementedError

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def read(self, state: State, l: int) -> Tensor:
        return self.read_weighted(state, l)[0]

    def finish(self, state: State) -> Tensor:
        return self.finish_weighted(state)[0]

    def input_hooks(self, state: State, l: int, x: Tensor) -> contextlib.AbstractContextManager:
        """Context the model runs sublayer l under, on x = read(state, l). Kinds that can
        recompute x in backward (``residual.recompute``) return autograd saved-tensor hooks."""
        return contextlib.nullcontext()

    def source_names(self, l: int) -> list[str]:
        """Names of the sources mixed by read(l) (l = L: the final mixture)."""
        return []


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 at least: softmax and RMS statistics never run in half precision."""
    return torch.promote_types(x.dtype, torch.float32)
