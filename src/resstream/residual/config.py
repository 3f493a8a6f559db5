"""The residual section of a model config: a kind and that kind's options; and residual specs.

``ResidualConfig(kind="block_attnres", block_size=4)`` builds the kind's config: a typed
dataclass whose fields are ``kind`` followed by the fields of the options class the kind
registered (``@register(..., options=...)``), checked by that class's ``validate``. An
option of another kind is rejected with the kind's own options named. On disk (TOML,
config.json) it is the same flat table as always: ``[model.residual] kind = ..., block_size = ...``.

A residual spec is the command-line form ``kind:key=value,key=value`` (values parsed as TOML),
e.g. ``block_attnres:block_size=4,recompute=true``; a list of specs is comma-separated, a piece
with '=' but no ':' continuing the previous spec's options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from resstream.config import ConfigBase, ConfigError, parse_value, require
from resstream.residual.base import available_kinds, get_kind

WHERE = "model.residual."

# Every key of the flat ResidualConfig that held every kind's options, as each saved run's
# config.json still has it. Compatibility step (``from_dict``): a table with exactly these keys
# is such a saved config; its kind's options are kept (under their current names) and the
# other kinds' dropped. Nothing else is ever dropped silently.
LEGACY_KEYS = frozenset({"kind", "block_size", "key_norm_eps", "key_norm_learnable", "n_streams", "dynamic",
                         "sinkhorn_iters", "window", "recompute", "ddl_beta_init"})


@dataclass
class ResidualConfig(ConfigBase):
    """How sublayer outputs are joined: ``kind`` (a registered residual kind,
    ``resstream.residual.available_kinds()``) and that kind's options, e.g.
    ``ResidualConfig(kind="hc", n_streams=2)``. Each kind documents its options on its options
    class (``get_kind(kind).options``); ``resstream kinds`` lists the kinds."""

    kind: str = "prenorm"

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is ResidualConfig:  # dispatch to the kind's config class
            kind = args[0] if args else kwargs.get("kind", "prenorm")
            cls = config_class(kind)
            _check_option_names(kind, kwargs, WHERE)
        return super().__new__(cls)

    def validate(self) -> None:
        require(type(self) is config_class(self.kind),
                f"{WHERE}kind: '{self.kind}' does not match these options; build the config as "
                f"ResidualConfig(kind='{self.kind}', ...)")

    @classmethod
    def from_dict(cls, data: dict, prefix: str = ""):
        where = prefix or WHERE
        if not isinstance(data, dict):
            raise ConfigError(f"{where.rstrip('.')}: expected a table, got {data!r}")
        data = upgrade_saved(data)
        kind = data.get("kind", "prenorm")
        sub = config_class(kind, where)
        _check_option_names(kind, data, where)
        return super(ResidualConfig, sub).from_dict(data, prefix)

    def replace(self, **changes: Any) -> "ResidualConfig":
        """A copy with ``changes``; a new kind starts from its own defaults."""
        same_kind = changes.get("kind", self.kind) == self.kind
        return ResidualConfig(**{**(self.to_dict() if same_kind else {}), **changes})

    def options(self) -> dict[str, Any]:
        """The kind's options and their values (everything but ``kind``)."""
        return {k: v for k, v in self.to_dict().items() if k != "kind"}

    def __reduce__(self):  # pickle and deepcopy through the public constructor
        return (_rebuild, (self.to_dict(),))


def _rebuild(fields: dict) -> ResidualConfig:
    return ResidualConfig(**fields)


_CONFIG_CLASSES: dict[str, type] = {}


def config_class(kind: str, where: str = WHERE) -> type:
    """The config class of ``kind``: ``kind`` plus the fields of the kind's options class."""
    if not isinstance(kind, str):
        raise ConfigError(f"{where}kind: expected str, got {kind!r}")
    if kind not in _CONFIG_CLASSES:
        try:
            options = get_kind(kind).options
        except ConfigError as e:
            raise ConfigError(f"{where}kind: {e}") from None

        def validate(self) -> None:
            ResidualConfig.validate(self)
            options.validate(self)

        _CONFIG_CLASSES[kind] = dataclasses.make_dataclass(
            "ResidualConfig", [("kind", str, dataclasses.field(default=kind))], bases=(options, ResidualConfig),
            namespace={"validate": validate, "__doc__": options.__doc__, "__module__": __name__})
    return _CONFIG_CLASSES[kind]


def option_names(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_kind(kind).options)]


def _check_option_names(kind: str, data: Mapping[str, Any], where: str) -> None:
    own = option_names(kind)
    renamed = getattr(get_kind(kind).options, "renamed", {})
    for key in data:
        if key == "kind" or key in own:
            continue
        listing = f"its options: {', '.join(sorted(own))}" if own else "it has no options"
        if key in renamed:
            raise ConfigError(f"{where}{key}: renamed for residual kind '{kind}'; write {where}{renamed[key]}")
        elsewhere = [k for k in available_kinds() if key in option_names(k)]
        if elsewhere:
            raise ConfigError(f"{where}{key}: not an option of residual kind '{kind}' ({key} is an option of "
                              f"{', '.join(elsewhere)}); {listing}")
        raise ConfigError(f"unknown config key '{where}{key}'; residual kind '{kind}': {listing}")


def upgrade_saved(data: dict) -> dict:
    """A residual table saved before each kind owned its options (see LEGACY_KEYS) in today's
    form: its kind's options under their current names; any other table unchanged."""
    if set(data) != LEGACY_KEYS or not isinstance(data["kind"], str) or data["kind"] not in available_kinds():
        return data
    renamed = getattr(get_kind(data["kind"]).options, "renamed", {})
    own = option_names(data["kind"])
    out = {"kind": data["kind"]}
    for key, value in data.items():
        if renamed.get(key, key) in own:
            out[renamed.get(key, key)] = value
    return out


# ----------------------------------------------------------------------------- residual specs


def split_specs(specs: str | Sequence[str]) -> list[str]:
    """'prenorm,block_attnres:block_size=4,recompute=true' (or its comma-split pieces) ->
    ['prenorm', 'block_attnres:block_size=4,recompute=true']."""
    pieces = specs.split(",") if isinstance(specs, str) else [p for s in specs for p in s.split(",")]
    out: list[str] = []
    for piece in (p.strip() for p in pieces):
        if out and ":" in out[-1] and "=" in piece and ":" not in piece:
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def parse_spec(spec: str, where: str = "--residuals") -> dict[str, Any]:
    """'block_attnres:block_size=4' -> {'kind': 'block_attnres', 'block_size': 4}, checked as a
    ResidualConfig (unknown kinds and options fail here)."""
    kind, _, opts = spec.strip().partition(":")
    residual: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or ":" in item:
            raise ConfigError(f"{where}: bad option '{item}' in '{spec}'; write kind:key=value,key=value")
        residual[key.strip()] = parse_value(raw.strip())
    ResidualConfig.from_dict(residual, prefix=WHERE)
    return residual


def spec_label(spec: str) -> str:
    """A name for a spec usable in paths: 'block_attnres:block_size=4' -> 'block_attnres-block_size=4'."""
    return spec.strip().replace(":", "-").replace(",", "-")


def parse_specs(specs: str | Sequence[str], where: str = "--residuals") -> list[tuple[str, dict[str, Any]]]:
    """A list of specs -> [(label, residual table)], each checked, none listed twice."""
    out, labels = [], set()
    for spec in split_specs(specs):
        residual = parse_spec(spec, where)
        label = spec_label(spec)
        if label in labels:
            raise ConfigError(f"{where}: '{spec}' is listed twice")
        labels.add(label)
        out.append((label, residual))
    if not out:
        raise ConfigError(f"{where}: name at least one residual kind")
    return out


def _format_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_spec(residual: Mapping[str, Any] | ResidualConfig) -> str:
    """The spec of a residual table (or config): {'kind': 'hc', 'n_streams': 2} -> 'hc:n_streams=2'."""
    table = residual.to_dict() if isinstance(residual, ResidualConfig) else dict(residual)
    opts = ",".join(f"{k}={_format_value(v)}" for k, v in table.items() if k != "kind")
    return f"{table['kind']}:{opts}" if opts else str(table["kind"])


def distinct_options(residual: Mapping[str, Any]) -> dict[str, Any]:
    """The options that set a residual table apart: as given, or, for a complete table (a saved
    config, every option of its kind present), those that differ from the kind's defaults;
    options of other kinds (in tables saved before each kind owned its options) are left out."""
    table = upgrade_saved(dict(residual))
    opts = {k: v for k, v in table.items() if k != "kind"}
    kind = table.get("kind")
    if kind not in available_kinds():
        return opts
    defaults = get_kind(kind).option_defaults()
    opts = {k: v for k, v in opts.items() if k in defaults}
    if set(opts) == set(defaults):
        opts = {k: v for k, v in opts.items() if v != defaults[k]}
    return opts
