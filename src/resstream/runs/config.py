"""The config of one training run: model, data, training, comparison and scaling sections, read from a
TOML file or a built-in preset plus ``key=value`` overrides, written resolved into the run folder."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from resstream.config import (
    CompareConfig,
    ConfigBase,
    ConfigError,
    DataConfig,
    TrainConfig,
    apply_overrides,
    config_hash,
    load_toml,
    require,
)
from resstream.model.config import ModelConfig
from resstream.parallel.config import ParallelConfig
from resstream.residual.base import available_kinds, get_kind

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class ScaleConfig(ConfigBase):
    """Defaults for ``resstream scale`` (kinds, seeds and baseline come from ``[compare]``).

    sizes: model shapes "N_LAYERSxD_MODEL"; or params: target parameter counts ("200k", "1.5M"),
    each turned into a shape with the base model's depth-to-width ratio.
    tokens_per_param: tokens per run = this x the size's parameters (non-embedding); or
    tokens: the same number of tokens for every size.
    evals: validation evaluations per run; bootstrap: resamples of the seeds for intervals.
    """

    sizes: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    tokens_per_param: float = 20.0
    tokens: Optional[int] = None
    evals: int = 8
    bootstrap: int = 2000

    def validate(self) -> None:
        require(not (self.sizes and self.params), "scale: give either scale.sizes or scale.params, not both")
        require(self.tokens_per_param > 0, f"scale.tokens_per_param: must be > 0, got {self.tokens_per_param}")
        require(self.tokens is None or self.tokens >= 1, f"scale.tokens: must be >= 1, got {self.tokens}")
        require(self.evals >= 1, f"scale.evals: must be >= 1, got {self.evals}")
        require(self.bootstrap >= 100, f"scale.bootstrap: must be >= 100, got {self.bootstrap}")


@dataclass
class RunConfig(ConfigBase):
    """Everything one training run needs; written resolved into the run folder.

    init_from: a pretrained model (a run folder, GGUF file, Hugging Face or resstream model
    folder, or a fetched model's name) to continue training: its shape, weights and
    tokenizer (see ``resstream.runs.init``); ``model`` may then only choose the residual and
    max_seq_len, and holds the model's whole shape once resolved.
    """

    name: str = "run"
    init_from: Optional[str] = None
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model config, with the vocabulary size taken from the tokenizer (a pretrained
        model's own, which may hold more ids than its tokenizer, when initialised from one)."""
        d = dict(self.model)
        if "vocab_size" in d:
            require(d["vocab_size"] >= vocab_size, f"model.vocab_size: {d['vocab_size']} embeddings for a tokenizer of {vocab_size} ids")
        else:
            d["vocab_size"] = vocab_size
        return ModelConfig.from_dict(d, prefix="model.")

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, f"name: must be a non-empty name without '/', got '{self.name}'")
        require(self.init_from is None or bool(self.init_from), "init_from: name a model path, or leave it unset")
        # Check the model section eagerly (vocab_size comes later from the tokenizer).
        d = dict(self.model)
        require("vocab_size" not in d or self.init_from is not None,
                "model.vocab_size: is set from the tokenizer; set data.vocab_size instead")
        ModelConfig.from_dict({"vocab_size": self.data.vocab_size, **d}, prefix="model.")

    def hash(self) -> str:
        return config_hash(self.to_dict())


def dotted_fields(cls, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config dataclass tree -> its annotation."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = ModelConfig if cls is RunConfig and f.name == "model" else hints[f.name]  # a free-form table
        if dataclasses.is_dataclass(tp):
            out.update(dotted_fields(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def run_config_fields() -> dict[str, Any]:
    """Every dotted key a run config takes -> its annotation (for fuzzing and help): model.*
    from ModelConfig, model.residual.* from every residual kind's options."""
    fields = dotted_fields(RunConfig)
    fields.pop("model.vocab_size", None)  # set from the tokenizer
    for kind in available_kinds():
        fields.update(dotted_fields(get_kind(kind).options, "model.residual."))
    return fields


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ConfigError(f"unknown preset '{name}'; known presets: {known}")
    return path


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    preset: str | None = None) -> RunConfig:
    """A RunConfig from a TOML file or a built-in preset (at most one), then overrides."""
    if path and preset:
        raise ConfigError("pass either --config or --preset, not both")
    source = preset_path(preset) if preset else path
    data = load_toml(source) if source else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))
