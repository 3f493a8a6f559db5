"""Typed configuration: dataclasses that reject unknown keys and impossible values.

Every config is a frozen-free dataclass with defaults. ``from_dict`` builds one from a
(nested) mapping, e.g. a parsed TOML file, naming the offending dotted key on any error;
``apply_overrides`` applies ``section.key=value`` strings from the command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad config key or value; the message names the field and what to do. Always one
    line: line breaks echoed from the user's input are shown escaped."""

    def __init__(self, msg: str = "") -> None:
        super().__init__(str(msg).replace("\r", "\\r").replace("\n", "\\n"))


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_SEED = INT_MAX  # torch.manual_seed and numpy take non-negative 64-bit seeds
MAX_LR = 10.0
MAX_SEEDS = 1000  # seeds per kind in a comparison; every one is a training run
# Past the largest tokenizers in use (~256k); BPE training allocates per vocabulary entry
# (a vocab_size of 10**9 made the tokenizers library abort the process asking for 70 GB).
MAX_VOCAB = 2**20
# train.dtype: the autocast precision; names accepted -> the torch dtype's name
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


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
            if not INT_MIN <= value <= INT_MAX:  # torch and numpy take 64-bit integers
                raise ConfigError(f"{where}: {value} does not fit in a 64-bit integer; use a smaller value")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int past the float range
                raise ConfigError(f"{where}: {value} is too large for a float") from None
            if not math.isfinite(value):  # nan and inf are never a meaningful setting
                raise ConfigError(f"{where}: must be a finite number, got {value}")
            return value
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
            raise ConfigError(_qualify(str(e), prefix)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _qualify(msg: str, prefix: str) -> str:
    """Put ``prefix`` before a message's field unless the field already carries it (messages of
    nested sections are written with their full path, e.g. "model.residual.kind: ...")."""
    field = msg.split(":", 1)[0]
    if not prefix or field.startswith(prefix) or f".{prefix}" in f".{field}.":
        return msg
    return prefix + msg


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
        require(bool(self.corpus), "data.corpus: must name a corpus (kjv, python-stdlib, a path, or hf:NAME)")
        require(self.vocab_size >= 260, f"data.vocab_size: must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        require(0.0 < self.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        require(self.vocab_size <= MAX_VOCAB, f"data.vocab_size: must be <= {MAX_VOCAB}, got {self.vocab_size}")
        require(self.max_bytes is None or self.max_bytes > 0, f"data.max_bytes: must be > 0, got {self.max_bytes}")
        require(bool(self.text_field), "data.text_field: must name a column")


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
            require(v >= 1, f"train.{name}: must be >= 1, got {v}")
        # AdamW moves each weight by about lr per step: past MAX_LR nothing trains, and lr=1e38
        # overflows the optimizer's arithmetic. Decoupled weight decay multiplies every decayed
        # weight by 1 - lr * weight_decay per step, which must stay positive.
        require(0 < self.lr <= MAX_LR, f"train.lr: must be in (0, {MAX_LR:g}], got {self.lr}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        require(0.0 <= self.warmup_frac < 1.0, f"train.warmup_frac: must be in [0, 1), got {self.warmup_frac}")
        require(self.schedule in ("cosine", "linear", "constant"), f"train.schedule: must be cosine, linear or constant, got '{self.schedule}'")
        require(self.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        require(self.lr * self.weight_decay < 1, f"train.weight_decay: lr x weight_decay = {self.lr * self.weight_decay:g} must be < 1 (AdamW scales weights by 1 - lr x weight_decay each step)")
        require(0 <= self.beta1 < 1, f"train.beta1: must be in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, f"train.beta2: must be in [0, 1), got {self.beta2}")
        require(self.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
        require(0 <= self.seed <= MAX_SEED, f"train.seed: must be in [0, {MAX_SEED}] (a 63-bit seed), got {self.seed}")
        require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, f"train.device: must be auto, cpu, cuda[:N] or mps, got '{self.device}'")
        require(self.dtype in DTYPES, f"train.dtype: must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


@dataclass
class CompareConfig(ConfigBase):
    """Defaults for ``resstream compare``. residuals: kinds, each optionally with options
    ("block_attnres:block_size=4"); baseline: the entry of ``residuals`` every other kind is
    compared with (None: the first); max_seeds: the cap of ``--seeds auto``."""

    residuals: tuple[str, ...] = ("prenorm", "attnres", "block_attnres")
    seeds: int = 2
    depth_batches: int = 4
    baseline: Optional[str] = None
    max_seeds: int = 8

    def validate(self) -> None:
        require(len(self.residuals) >= 1, "compare.residuals: name at least one residual kind")
        require(1 <= self.seeds <= MAX_SEEDS, f"compare.seeds: must be in [1, {MAX_SEEDS}], got {self.seeds}")
        require(self.depth_batches >= 1, f"compare.depth_batches: must be >= 1, got {self.depth_batches}")
        require(2 <= self.max_seeds <= MAX_SEEDS, f"compare.max_seeds: must be in [2, {MAX_SEEDS}], got {self.max_seeds}")


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
