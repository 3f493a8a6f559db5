"""The Table 4 ablations of Full and Block AttnRes (residual/attnres/variants.py) beyond the
generic contract (tests/residual/test_contract.py runs every KIND_CASES row of them against
the float64 reference): which path runs, their parameters, Block S = 1 equals Full, a static
checkpoint loads, and bad combinations fail in one line."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err, tiny_cfg
from resstream import LM, ConfigError, ResidualConfig
from resstream.residual.attnres.block import BlockAttnRes
from resstream.residual.attnres.full import FullAttnRes
from resstream.residual.attnres.variants import AblationBlock, AblationFull


def test_defaults_take_the_fast_path_and_ablations_the_plain_one():
    assert type(LM(tiny_cfg("attnres")).residual) is FullAttnRes
    assert type(LM(tiny_cfg("block_attnres")).residual) is BlockAttnRes
    full = LM(tiny_cfg("attnres", score="sigmoid")).residual
    block = LM(tiny_cfg("block_attnres", heads=2)).residual
    assert type(full) is AblationFull and full.kind == "attnres"
    assert type(block) is AblationBlock and block.kind == "block_attnres"
    assert full.weights_sum_to_one is False and block.weights_sum_to_one is True


def test_parameters_of_each_ablation():
    L, D = 6, 32  # tiny_cfg: 3 layers, d_model 32

    def shapes(kind, **opts):
        return {n: tuple(p.shape) for n, p in LM(tiny_cfg(kind, **opts)).residual.named_parameters()}

    assert shapes("attnres", query="input") == {"queries": (L + 1, D), "key_norm_weight": (L + 1, D),
                                                "query_proj": (L + 1, D, D)}
    assert shapes("attnres", query="none") == {"source_logits": (L + 1, L + 1)}
    assert shapes("block_attnres", query="none", block_size=4) == {"source_logits": (L + 1, 1 + 2)}
    assert shapes("attnres", key_norm=False) == {"queries": (L + 1, D)}  # no norm, no norm weight
    assert shapes("attnres", heads=4) == shapes("attnres")  # channel groups add no parameters


def test_sigmoid_starts_at_one_half_for_every_source():
    model = LM(tiny_cfg("block_attnres", score="sigmoid", block_size=2))
    _, _, mixing = model(torch.randint(0, 61, (2, 5)), return_mixing=True)
    for w in mixing:
        assert torch.all(w == 0.5)


@pytest.mark.parametrize("opts", [{"heads": 4}, {"query": "input"}, {"key_norm": False, "score": "sigmoid"}])
def test_block_with_s1_equals_full_under_each_ablation(opts):
    full = LM(tiny_cfg("attnres", **opts)).double()
    with torch.no_grad():
        for p in full.residual.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    block = LM(tiny_cfg("block_attnres", block_size=1, **opts)).double()
    block.load_state_dict(full.state_dict())
    idx = torch.randint(0, 61, (2, 9))
    assert rel_err(block(idx), full(idx)) < 1e-12


def test_a_static_full_checkpoint_loads_into_the_input_dependent_query():
    static = LM(tiny_cfg("attnres")).double()
    with torch.no_grad():
        static.residual.queries.normal_()
    variant = LM(tiny_cfg("attnres", query="input")).double()
    missing, unexpected = variant.load_state_dict(static.state_dict(), strict=False)
    assert missing == ["residual.query_proj"] and not unexpected
    idx = torch.randint(0, 61, (2, 9))
    assert rel_err(variant(idx), static(idx)) < 1e-12  # a zero projection adds nothing to the query


@pytest.mark.parametrize("opts,match", [
    ({"heads": 3}, "3 channel groups do not divide d_model 32"),
    ({"heads": 0}, "heads: must be >= 1"),
    ({"query": "dynamic"}, "query: must be one of static, input, none"),
    ({"score": "relu"}, "score: must be softmax or sigmoid"),
    ({"query": "none", "heads": 2}, "'none' mixes with one scalar per source"),
    ({"score": "sigmoid", "recompute": True}, "recompute: not available with the ablation options"),
])
def test_bad_ablation_options_fail_in_one_line(opts, match):
    with pytest.raises(ConfigError, match=match) as e:
        LM(tiny_cfg("attnres", **opts))
    assert "\n" not in str(e.value)


def test_ablation_options_in_specs_and_saved_configs():
    cfg = ResidualConfig.from_dict({"kind": "block_attnres", "block_size": 4, "heads": 16, "key_norm": False})
    assert cfg.is_ablation() and cfg.heads == 16
    assert not ResidualConfig(kind="attnres").is_ablation()
