"""The ResidualStream contract and the one registry of residual kinds.

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

A kind is registered once, with everything that defines it::

    @register("hc", options=StreamOptions, reference=hc_reference)
    class HyperConnections(ResidualStream): ...

``options``: a ConfigBase dataclass of the kind's options with their defaults and checks
(``ResidualConfig(kind="hc", n_streams=2)`` is built from it, see residual/config.py);
``reference``: the kind's plain float64 specification (``Reference``). What the stream
declares about itself lives on its class (``ResidualStream``'s class attributes) and is
read through ``get_kind(name).stream`` or on an instance, never guessed from its name.

Pipeline parallelism cuts depth into stages. What crosses a cut before sublayer l is the
stream's ``Boundary``, and the next stage rebuilds the full state from it::

    b     = stream.stage_boundary(state, l)   # tensors only: ``fresh`` and ``history``
    state = stream.from_boundary(b, l)        # caches and other derived entries recomputed

``history`` entries never change once written (a name means the same tensor at every later
cut: Full AttnRes's sublayer outputs, Block AttnRes's completed blocks), so a process that has
seen one need not receive it again (AttnRes paper, section 4.1, cross-stage caching);
``fresh`` entries (PreNorm's h, a partial block sum, hyper-connection streams) always travel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from resstream.config import ConfigBase, ConfigError

State = dict

# reference(emb [B,T,D], sublayers f_l, params by name as in stream.named_parameters(), the
# kind's config) -> (input of the final norm, depth-mixing weights of each sublayer input and of
# the final mixture, [] for kinds that do not mix). Everything in float64.
Reference = Callable[[Tensor, Sequence[Callable[[Tensor], Tensor]], dict, Any], tuple[Tensor, list]]


@dataclass
class NoOptions(ConfigBase):
    """A kind without options."""


@dataclass
class Boundary:
    """The residual state where a pipeline cuts depth: tensors [B, T, ...] by name.

    ``fresh``: entries that change from sublayer to sublayer; they cross every cut.
    ``history``: entries that never change once written; the same name means the same tensor
    at every later cut, so a pipeline may keep them on a process instead of sending them again.
    """

    fresh: dict[str, Tensor] = field(default_factory=dict)
    history: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        return {**self.fresh, **self.history}


class ResidualStream(nn.Module):
    """Base class. Subclasses implement init/read_weighted/write/finish_weighted (and
    reset_parameters when they own parameters), and declare what they are:

    ``identity_at_init``: a fresh stream makes the LM compute PreNorm's logits with the same
    sublayer weights (tested for every kind that claims it).
    ``standard_residual``: the plain sum h = emb + sum_l y_l that standard transformers
    (Hugging Face's Llama, llama.cpp) compute, so a model of this kind exports to them.
    ``mixes_depth``: read() mixes sources over depth and returns their weights.
    ``weights_sum_to_one``: those weights form a convex combination (softmax kinds); False for
    free, possibly negative coefficients.
    ``supports_recompute``: the kind has the ``recompute`` option (inputs recomputed in backward).
    ``mixes_positions``: the residual reads other positions (a KV cache alone cannot decode it).
    ``fused_kernels``: training runs fused kernels (native CPU or compiled, residual/compiled.py)
    where they build, eager PyTorch otherwise: RESSTREAM_COMPILE_MIXING chooses.
    ``source_legend``: the naming scheme of ``source_names``, pattern -> meaning, for plots.
    """

    kind: ClassVar[str] = ""  # set by register()
    identity_at_init: ClassVar[bool] = True
    standard_residual: ClassVar[bool] = False
    mixes_depth: ClassVar[bool] = False
    weights_sum_to_one: ClassVar[bool] = True
    supports_recompute: ClassVar[bool] = False
    mixes_positions: ClassVar[bool] = False
    fused_kernels: ClassVar[bool] = False
    source_legend: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any, n_sublayers: int, d_model: int) -> None:
        super().__init__()
        self.options = options  # the kind's ResidualConfig (kind + its options)
        self.n_sublayers = n_sublayers
        self.d_model = d_model

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

    def inference(self, scratch: dict | None = None) -> Any:
        """The stream to run when no gradient is needed (``LM.decode``, under inference mode):
        the same init / read / write / finish on the same parameters, free to keep its state in
        buffers written in place and to reuse them across calls through ``scratch`` (a dict the
        caller keeps for one generation). Default: this stream (see attnres/lean.py)."""
        return self

    def input_hooks(self, state: State, l: int, x: Tensor) -> contextlib.AbstractContextManager:
        """Context the model runs sublayer l under, on x = read(state, l). Kinds that can
        recompute x in backward (``supports_recompute``) return autograd saved-tensor hooks."""
        return contextlib.nullcontext()

    def source_names(self, l: int) -> list[str]:
        """Names of the sources mixed by read(l) (l = L: the final mixture)."""
        return []

    def stage_boundary(self, state: State, l: int) -> Boundary:
        """What a pipeline stage hands on before sublayer l (after l sublayers were written).
        Default: every entry of the state is a fresh tensor (PreNorm-like kinds, state {"h"})."""
        bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
        if bad:
            raise NotImplementedError(f"residual kind '{self.kind}' keeps non-tensor state '{bad[0]}': it must "
                                      "implement stage_boundary/from_boundary to run in a pipeline")
        return Boundary(fresh=dict(state))

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        """The state before sublayer l, rebuilt from ``stage_boundary(state, l)``: the same
        forward values as the uncut state, with this stage's own caches and autograd graph."""
        return dict(boundary.fresh)


def outside_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The context every stream call runs in: autocast off. Under mixed precision
    (``train.dtype=bf16``) the sublayers compute in bfloat16 and return bfloat16, while depth
    mixing keeps its statistics (softmax, RMS, coefficients) in float32 and its state in the
    dtype PreNorm's running sum h + y would have (float32: the embedding is float32), so no
    kind accumulates its residual in bfloat16. Streams therefore take sources of mixed dtypes."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # no autocast here (or none for this device, e.g. meta)


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 at least: softmax and RMS statistics never run in half precision."""
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Kind:
    """A registered residual kind: its stream class, options class and float64 reference."""

    name: str
    stream: type[ResidualStream]
    options: type
    reference: Reference

    @property
    def summary(self) -> str:
        """The first line of the stream's docstring (or of its module's)."""
        doc = self.stream.__doc__ or sys.modules[self.stream.__module__].__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def option_defaults(self) -> dict[str, Any]:
        """The kind's options and their defaults, in declaration order."""
        return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(self.options)}

    def describe(self) -> dict[str, Any]:
        """What the stream declares about itself, as plain data."""
        s = self.stream
        return {"identity_at_init": s.identity_at_init, "mixes_depth": s.mixes_depth,
                "weights_sum_to_one": s.weights_sum_to_one, "supports_recompute": s.supports_recompute,
                "mixes_positions": s.mixes_positions, "source_legend": dict(s.source_legend)}


_KINDS: dict[str, Kind] = {}


def register(name: str, *, reference: Reference, options: type = NoOptions) -> Callable[[type], type]:
    """Class decorator adding a ResidualStream subclass to the registry under ``name``, with its
    options dataclass and its float64 reference."""

    def deco(cls: type) -> type:
        if name in _KINDS:
            raise ValueError(f"residual kind '{name}' registered twice")
        if not (isinstance(cls, type) and issubclass(cls, ResidualStream)):
            raise TypeError(f"residual kind '{name}': {cls!r} is not a ResidualStream")
        if not (dataclasses.is_dataclass(options) and issubclass(options, ConfigBase)):
            raise TypeError(f"residual kind '{name}': options must be a ConfigBase dataclass, got {options!r}")
        names = {f.name for f in dataclasses.fields(options)}
        if "kind" in names:
            raise TypeError(f"residual kind '{name}': 'kind' cannot be an option")
        if cls.supports_recompute != ("recompute" in names):
            raise TypeError(f"residual kind '{name}': supports_recompute must match a 'recompute' option")
        cls.kind = name
        _KINDS[name] = Kind(name, cls, options, reference)
        return cls

    return deco


def available_kinds() -> list[str]:
    return list(_KINDS)


def get_kind(name: str) -> Kind:
    """The registered kind ``name``; ConfigError naming the known kinds otherwise."""
    if name not in _KINDS:
        raise ConfigError(f"unknown residual kind '{name}'; known kinds: {', '.join(_KINDS)}")
    return _KINDS[name]


def describe(kind: str | None) -> dict[str, Any]:
    """What ``kind`` declares about itself, as plain data (``Kind.describe``); {} for a kind not
    registered here (e.g. named in a comparison written by another version)."""
    return _KINDS[kind].describe() if kind in _KINDS else {}


def build_residual(cfg: Any, n_sublayers: int, d_model: int) -> ResidualStream:
    """The stream of ``cfg`` (a ResidualConfig) for ``n_sublayers`` sublayers of width ``d_model``."""
    return get_kind(cfg.kind).stream(cfg, n_sublayers, d_model)


def import_rooms(package: str, path: Sequence[str], first: Sequence[str] = ()) -> None:
    """Import every module and subpackage of ``package`` (each registers its kinds), ``first``
    in that order, the rest by name: a new kind is found by dropping its module in the folder."""
    import importlib
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(path) if m.name not in ("base", "config", "reference")]
    for name in [n for n in first if n in names] + sorted(n for n in names if n not in first):
        importlib.import_module(f"{package}.{name}")
