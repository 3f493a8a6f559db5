"""Typed configuration: dataclasses that reject unknown keys and impossible values.

Every config is a frozen-free dataclass with defaults. ``from_dict`` builds one from a
(nested) mapping, e.g. a parsed TOML file, naming the offending dotted key on any error;
``apply_overrides`` applies ``section.key=value`` strings from the command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad config key or value; the message names the field and what to do."""


# ----------------------------------------------------------------------------- generic machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float only."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, arg, f"{where}[]") for v in value)
    if tp is dict:  # a free-form table checked later (RunConfig.model, whose vocab comes from the tokenizer)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {value!r}")
        return tp.from_dict(value, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - an annotation we do not support is a programming error
        raise TypeError(f"unsupported config annotation {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


class ConfigBase:
    """Mixin: strict construction from dicts, validation, and plain-dict export."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:  # overridden where values constrain each other
        pass

    @classmethod
    def from_dict(cls, data: dict, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(
                f"unknown config key '{prefix}{unknown[0]}'; known keys of "
                f"{prefix.rstrip('.') or cls.__name__}: {', '.join(names)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(prefix + msg if prefix and not msg.startswith(prefix) else msg) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------- model


RESIDUAL_KINDS_DOC = "see resstream.residual.available_kinds()"


@dataclass
class ResidualConfig(ConfigBase):
    """How sublayer outputs are joined.

    kind: a registered residual kind (``resstream.residual.available_kinds()``).
    block_size: Block AttnRes sublayers per block S (S = 1 is Full AttnRes).
    key_norm_eps / key_norm_learnable: the RMSNorm applied to AttnRes keys.
    n_streams: hyper-connection expansion rate n.
    dynamic: dynamic (input-dependent) hyper-connections.
    sinkhorn_iters: mHC's Sinkhorn-Knopp iterations.
    window: depth_swa's window W (sublayer outputs visible besides the embedding).
    recompute: AttnRes keeps less for backward and recomputes it there (less memory, more
    time); only for kinds that support it.
    ddl_beta_init: DDL's gate beta = 2 sigmoid(.) at init, in (0, 2): 1 is the authors'
    default (projection regime); values near 0 start near the identity shortcut.
    """

    kind: str = "prenorm"
    block_size: int = 4
    key_norm_eps: float = 1e-6
    key_norm_learnable: bool = True
    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    window: int = 4
    recompute: bool = False
    ddl_beta_init: float = 1.0

    def validate(self) -> None:
        from resstream.residual import available_kinds  # late: the registry imports config

        kinds = available_kinds()
        _require(self.kind in kinds, f"model.residual.kind: unknown residual kind '{self.kind}'; known kinds: {', '.join(kinds)}")
        _require(self.block_size >= 1, f"model.residual.block_size: must be >= 1 (sublayers per block), got {self.block_size}")
        _require(self.key_norm_eps > 0, f"model.residual.key_norm_eps: must be > 0, got {self.key_norm_eps}")
        _require(self.n_streams >= 1, f"model.residual.n_streams: must be >= 1, got {self.n_streams}")
        _require(self.sinkhorn_iters >= 1, f"model.residual.sinkhorn_iters: must be >= 1, got {self.sinkhorn_iters}")
        _require(self.window >= 1, f"model.residual.window: must be >= 1, got {self.window}")
        if self.recompute:
            from resstream.residual.base import _REGISTRY

            _require(
                getattr(_REGISTRY[self.kind], "supports_recompute", False),
                f"model.residual.recompute: kind '{self.kind}' has no recompute path; kinds that have one: "
                + ", ".join(k for k, c in _REGISTRY.items() if getattr(c, "supports_recompute", False)),
            )
        _require(
            0.0 < self.ddl_beta_init < 2.0,
            f"model.residual.ddl_beta_init: must be in (0, 2) (beta = 2 sigmoid(logit)), got {self.ddl_beta_init}",
        )


@dataclass
class ModelConfig(ConfigBase):
    """Shape of the decoder LM. L = 2 * n_layers sublayers (attention, MLP alternating).

    n_kv_heads: None means n_heads (plain multi-head attention); fewer means grouped-query.
    mlp_hidden: None means the SwiGLU default, 8/3 * d_model rounded up to a multiple of 64.
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    mlp_hidden: Optional[int] = None
    rope_base: float = 10000.0
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    residual: ResidualConfig = field(default_factory=ResidualConfig)

    def validate(self) -> None:
        _require(self.vocab_size >= 2, f"model.vocab_size: must be >= 2, got {self.vocab_size}")
        _require(self.d_model >= 1, f"model.d_model: must be >= 1, got {self.d_model}")
        _require(self.n_layers >= 1, f"model.n_layers: must be >= 1, got {self.n_layers}")
        _require(self.n_heads >= 1, f"model.n_heads: must be >= 1, got {self.n_heads}")
        _require(
            self.d_model % self.n_heads == 0,
            f"model.n_heads: {self.n_heads} heads do not divide d_model {self.d_model}",
        )
        _require(
            (self.d_model // self.n_heads) % 2 == 0,
            f"model.n_heads: head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE",
        )
        kv = self.kv_heads
        _require(kv >= 1, f"model.n_kv_heads: must be >= 1, got {kv}")
        _require(
            self.n_heads % kv == 0,
            f"model.n_kv_heads: {kv} KV heads do not divide n_heads {self.n_heads}",
        )
        _require(self.mlp_hidden is None or self.mlp_hidden >= 1, f"model.mlp_hidden: must be >= 1, got {self.mlp_hidden}")
        _require(self.max_seq_len >= 1, f"model.max_seq_len: must be >= 1, got {self.max_seq_len}")
        _require(self.rope_base > 0, f"model.rope_base: must be > 0, got {self.rope_base}")
        _require(self.norm_eps > 0, f"model.norm_eps: must be > 0, got {self.norm_eps}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# ----------------------------------------------------------------------------- data and training


@dataclass
class DataConfig(ConfigBase):
    """Where text comes from and how it becomes tokens.

    corpus: "kjv", "python-stdlib", a local file/folder/glob, or "hf:NAME[:CONFIG]" for a
    Hugging Face dataset (needs the network and ``pip install resstream[hf]``).
    tokenizer: path to a tokenizer.json; None trains a byte-level BPE on the train split.
    val_fraction: share of documents held out for validation (split by document).
    """

    corpus: str = "kjv"
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    val_fraction: float = 0.05
    text_field: str = "text"
    split_seed: int = 0
    max_bytes: Optional[int] = None
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        _require(bool(self.corpus), "data.corpus: must name a corpus (kjv, python-stdlib, a path, or hf:NAME)")
        _require(self.vocab_size >= 260, f"data.vocab_size: must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        _require(self.max_bytes is None or self.max_bytes > 0, f"data.max_bytes: must be > 0, got {self.max_bytes}")


@dataclass
class TrainConfig(ConfigBase):
    """The optimisation. Token budget = steps * batch_size * grad_accum * seq_len."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every", "keep_last", "log_every"):
            v = getattr(self, name)
            _require(v >= 1, f"train.{name}: must be >= 1, got {v}")
        _require(self.lr > 0, f"train.lr: must be > 0, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _require(0.0 <= self.warmup_frac < 1.0, f"train.warmup_frac: must be in [0, 1), got {self.warmup_frac}")
        _require(self.schedule in ("cosine", "linear", "constant"), f"train.schedule: must be cosine, linear or constant, got '{self.schedule}'")
        _require(self.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2: must be in [0, 1)")
        _require(self.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"), f"train.device: must be auto, cpu, cuda[:N] or mps, got '{self.device}'")
        _require(self.dtype in ("auto", "float32", "bfloat16"), f"train.dtype: must be auto, float32 or bfloat16, got '{self.dtype}'")


@dataclass
class CompareConfig(ConfigBase):
    """Defaults for ``resstream compare``: which residual kinds and how many seeds.

    residuals: kinds, each optionally with options: "block_attnres:block_size=4".
    """

    residuals: tuple[str, ...] = ("prenorm", "attnres", "block_attnres")
    seeds: int = 2
    depth_batches: int = 4

    def validate(self) -> None:
        _require(len(self.residuals) >= 1, "compare.residuals: name at least one residual kind")
        _require(self.seeds >= 1, f"compare.seeds: must be >= 1, got {self.seeds}")
        _require(self.depth_batches >= 1, f"compare.depth_batches: must be >= 1, got {self.depth_batches}")


@dataclass
class RunConfig(ConfigBase):
    """Everything one training run needs; written resolved into the run folder."""

    name: str = "run"
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model config, with the vocabulary size taken from the tokenizer."""
        d = dict(self.model)
        d["vocab_size"] = vocab_size
        return ModelConfig.from_dict(d, prefix="model.")

    def validate(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"name: must be a non-empty name without '/', got '{self.name}'")
        # Check the model section eagerly (vocab_size comes later from the tokenizer).
        d = dict(self.model)
        _require("vocab_size" not in d, "model.vocab_size: is set from the tokenizer; set data.vocab_size instead")
        ModelConfig.from_dict({**d, "vocab_size": self.data.vocab_size}, prefix="model.")

    def hash(self) -> str:
        return config_hash(self.to_dict())


# ----------------------------------------------------------------------------- files and overrides


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_value(text: str) -> Any:
    """Parse a command-line value as TOML would (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=200")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            node = nxt
        value = parse_value(raw.strip())
        node[parts[-1]] = None if value == "none" else value
    return out


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing .toml file (see configs/)")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = load_toml(path) if path else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))
