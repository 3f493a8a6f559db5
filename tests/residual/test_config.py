"""ResidualConfig: each kind owns its options (typed, checked, unknown keys named with the kind's
own options), the flat on-disk form, configs saved before each kind owned its options, and the
one residual-spec grammar (kind:key=value,key=value) with its labels."""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from resstream import ConfigError, ModelConfig, ResidualConfig
from resstream.config import apply_overrides
from resstream.residual import available_kinds, format_spec, get_kind, parse_spec, parse_specs, spec_label
from resstream.residual.config import LEGACY_KEYS, distinct_options, split_specs


def test_residual_config_errors():
    with pytest.raises(ConfigError, match="block_size"):
        ResidualConfig(kind="block_attnres", block_size=0)
    with pytest.raises(ConfigError, match="known kinds: .*prenorm"):
        ResidualConfig(kind="nope")
    with pytest.raises(ConfigError, match="unknown config key 'model.residual.blocksize'"):
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"blocksize": 2}}, prefix="model.")
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        ModelConfig.from_dict({"vocab_size": 10, "colour": 1})
    with pytest.raises(ConfigError, match=r"^model\.residual\.kind: unknown residual kind 'x'"):  # prefix once
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"kind": "x"}}, prefix="model.")
    with pytest.raises(ConfigError, match="d_model: expected int"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": "big"})


def test_an_option_of_another_kind_names_the_kinds_own_options():
    msg = (r"^model\.residual\.window: not an option of residual kind 'block_attnres' \(window is an option of "
           r"depth_swa\); its options: block_size, heads, key_norm, key_norm_eps, key_norm_learnable, query, recompute, "
           r"score$")
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"kind": "block_attnres", "window": 3}}, prefix="model.")
    with pytest.raises(ConfigError, match=msg):
        ResidualConfig(kind="block_attnres", window=3)
    with pytest.raises(ConfigError, match="ddl_beta_init: not an option of residual kind 'prenorm'.*it has no options"):
        ResidualConfig(kind="prenorm", ddl_beta_init=1.0)
    with pytest.raises(ConfigError, match="recompute: not an option of residual kind 'depth_swa'"):
        ResidualConfig(kind="depth_swa", recompute=True)
    with pytest.raises(ConfigError, match="block_size: expected int"):
        ResidualConfig(kind="block_attnres", block_size="big")


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_hyper_connections_have_their_own_norm_eps(kind):
    cfg = ResidualConfig(kind=kind, stream_norm_eps=1e-5)
    assert cfg.stream_norm_eps == 1e-5 and "key_norm_eps" not in cfg.to_dict()
    with pytest.raises(ConfigError, match=r"^model\.residual\.key_norm_eps: renamed for residual kind "
                                          rf"'{kind}'; write model\.residual\.stream_norm_eps$"):
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"kind": kind, "key_norm_eps": 1e-5}}, prefix="model.")
    with pytest.raises(ConfigError, match=r"stream_norm_eps: must be in \(0, 1\)"):
        ResidualConfig(kind=kind, stream_norm_eps=0.0)


@pytest.mark.parametrize("kind", available_kinds())
def test_flat_on_disk_form_round_trips(kind):
    cfg = ResidualConfig(kind=kind)
    d = cfg.to_dict()
    assert d == {"kind": kind, **get_kind(kind).option_defaults()}
    assert ResidualConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert ModelConfig.from_dict(ModelConfig(vocab_size=10, residual=cfg).to_dict()).residual == cfg
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert isinstance(cfg, get_kind(kind).options)  # typed by the kind's options class


def test_overrides_and_replace():
    data = apply_overrides({"vocab_size": 10, "residual": {"kind": "prenorm"}},
                           ["residual.kind=block_attnres", "residual.block_size=2", "residual.recompute=true"])
    res = ModelConfig.from_dict(data).residual
    assert (res.kind, res.block_size, res.recompute) == ("block_attnres", 2, True)
    assert res.replace(block_size=3).block_size == 3 and res.replace(block_size=3).recompute
    other = res.replace(kind="hc", n_streams=2)  # another kind starts from its own defaults
    assert other == ResidualConfig(kind="hc", n_streams=2)
    assert res.options() == {"key_norm_eps": 1e-6, "key_norm_learnable": True, "recompute": True, "query": "static",
                             "score": "softmax", "key_norm": True, "heads": 1, "block_size": 2}


def _legacy(kind: str, **values) -> dict:
    """A residual table as every config.json saved before each kind owned its options holds it."""
    old = {"kind": kind, "block_size": 4, "key_norm_eps": 1e-6, "key_norm_learnable": True, "n_streams": 4,
           "dynamic": True, "sinkhorn_iters": 20, "window": 4, "recompute": False, "ddl_beta_init": 1.0}
    assert set(old) == LEGACY_KEYS
    return {**old, **values}


@pytest.mark.parametrize("kind", available_kinds())
def test_configs_saved_with_every_kinds_options_still_load(kind):
    model = ModelConfig.from_dict({"vocab_size": 10, "residual": _legacy(kind)})
    expected = ResidualConfig(kind=kind)
    if "recompute" in expected.options():  # saved as false then; Block's default is now "auto"
        expected = expected.replace(recompute=False)
    assert model.residual == expected


def test_saved_options_keep_their_values():
    assert ResidualConfig.from_dict(_legacy("block_attnres", block_size=2, recompute=True)) == \
        ResidualConfig(kind="block_attnres", block_size=2, recompute=True)
    assert ResidualConfig.from_dict(_legacy("mhc", key_norm_eps=1e-4, n_streams=3, sinkhorn_iters=7)) == \
        ResidualConfig(kind="mhc", stream_norm_eps=1e-4, n_streams=3, sinkhorn_iters=7)
    assert ResidualConfig.from_dict(_legacy("ddl", ddl_beta_init=0.5)).ddl_beta_init == 0.5
    # only a complete saved table is upgraded; a partial one is checked as written
    with pytest.raises(ConfigError, match="window: not an option"):
        ResidualConfig.from_dict({"kind": "block_attnres", "window": 4})
    with pytest.raises(ConfigError, match="block_size: must be >= 1"):  # saved values are still checked
        ResidualConfig.from_dict(_legacy("block_attnres", block_size=0))


def test_report_options_of_a_kind():
    assert distinct_options({"kind": "block_attnres", "block_size": 4}) == {"block_size": 4}  # as given
    assert distinct_options(ResidualConfig(kind="block_attnres", block_size=2).to_dict()) == {"block_size": 2}
    assert distinct_options(_legacy("prenorm")) == {}
    assert distinct_options(_legacy("hc", n_streams=2, key_norm_eps=1e-5)) == {"n_streams": 2, "stream_norm_eps": 1e-5}


# ----------------------------------------------------------------------------- specs


def test_spec_grammar():
    assert parse_spec("block_attnres:block_size=4,recompute=true") == \
        {"kind": "block_attnres", "block_size": 4, "recompute": True}
    assert parse_spec(" prenorm ") == {"kind": "prenorm"}
    assert parse_spec("ddl:ddl_beta_init=1e-3") == {"kind": "ddl", "ddl_beta_init": 1e-3}
    assert split_specs("prenorm,block_attnres:block_size=4,recompute=true,hc:n_streams=2") == \
        ["prenorm", "block_attnres:block_size=4,recompute=true", "hc:n_streams=2"]
    assert split_specs(["prenorm", "block_attnres:block_size=4", "recompute=true"]) == \
        ["prenorm", "block_attnres:block_size=4,recompute=true"]
    assert parse_specs("prenorm,block_attnres:block_size=2,recompute=true") == [
        ("prenorm", {"kind": "prenorm"}),
        ("block_attnres-block_size=2-recompute=true", {"kind": "block_attnres", "block_size": 2, "recompute": True})]
    assert spec_label("block_attnres:block_size=4") == "block_attnres-block_size=4"
    for spec in ["prenorm", "hc:n_streams=2,dynamic=false", "ddl:ddl_beta_init=0.001", "depth_swa:window=3"]:
        assert format_spec(parse_spec(spec)) == spec
    assert format_spec(ResidualConfig(kind="hc", n_streams=2)) == "hc:n_streams=2,dynamic=true,stream_norm_eps=1e-06"
    assert parse_spec(format_spec(ResidualConfig(kind="hc", n_streams=2))) == ResidualConfig(kind="hc", n_streams=2).to_dict()


@pytest.mark.parametrize("specs,needle", [
    ("nope", "unknown residual kind 'nope'"),
    ("block_attnres:block_size", "bad option 'block_size' in 'block_attnres:block_size'; write kind:key=value,key=value"),
    ("block_attnres:block_size=8:recompute=true", "write kind:key=value,key=value"),
    ("block_attnres:window=2", "window: not an option of residual kind 'block_attnres'"),
    ("prenorm,prenorm", "'prenorm' is listed twice"),
    (",", "name at least one residual kind"),
])
def test_spec_errors(specs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_specs(specs)


def test_cli_names_the_kinds_options(tmp_path, capsys):
    from resstream.cli import main

    out = tmp_path / "run"
    for args, needle in [
        (["model.residual.kind=block_attnres", "model.residual.window=3"], "its options: block_size, heads, key_norm, key_norm_eps"),
        (["model.residual.kind=hc", "model.residual.key_norm_eps=1e-5"], "write model.residual.stream_norm_eps"),
    ]:
        code = main(["train", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


def test_a_run_folder_saved_with_every_kinds_options_still_loads(tmp_path, monkeypatch):
    """config.json as written before each kind owned its options (the hc stream norm then named
    key_norm_eps) loads into the same model."""
    from resstream.runs.config import RunConfig
    from resstream.train import train
    from resstream.runs import load_run_model

    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig.from_dict({
        "name": "old", "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 16,
                                 "residual": {"kind": "hc", "n_streams": 2}},
        "data": {"corpus": "kjv", "vocab_size": 300, "max_bytes": 30_000},
        "train": {"steps": 1, "batch_size": 2, "seq_len": 8, "eval_every": 1, "eval_batches": 1, "save_every": 1},
    })
    assert train(cfg, tmp_path / "run", progress=False, log=lambda s: None).status == "finished"
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["model"]["residual"] == ResidualConfig(kind="hc", n_streams=2).to_dict()  # today's flat form
    meta["model"]["residual"] = _legacy("hc", n_streams=2, key_norm_eps=2e-6)
    path.write_text(json.dumps(meta))
    model = load_run_model(tmp_path / "run")[0]
    assert model.cfg.residual == ResidualConfig(kind="hc", n_streams=2, stream_norm_eps=2e-6)
