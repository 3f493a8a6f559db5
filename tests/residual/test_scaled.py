"""rezero and scaled (residual/scaled.py): rezero starts as the embedding-only model and is PreNorm
at alpha = 1; scaled multiplies every branch by exactly 1/sqrt(L)."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import residual_params, embedding_only_logits, prenorm_twin, rel_err, tiny_cfg
from resstream import LM


@pytest.mark.parametrize("n_layers", [1, 3, 4])
def test_parameter_count(n_layers):
    L = 2 * n_layers
    assert residual_params("rezero", n_layers) == L
    assert residual_params("scaled", n_layers) == 0


def test_rezero_at_init_is_the_embedding_only_model():
    model = LM(tiny_cfg("rezero")).double()
    idx = torch.randint(0, 61, (2, 7))
    logits, loss = model(idx, idx)
    assert torch.equal(logits, embedding_only_logits(model, idx))
    loss.backward()
    # Only alpha learns at step 0: every sublayer is multiplied by alpha = 0.
    assert model.residual.alpha.grad.abs().min() > 0
    for name, p in model.sublayers.named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, name


def test_rezero_alpha_one_is_prenorm():
    model = LM(tiny_cfg("rezero")).double()
    with torch.no_grad():
        model.residual.alpha.fill_(1.0)
    idx = torch.randint(0, 61, (2, 7))
    assert torch.equal(model(idx), prenorm_twin(model)(idx))


@pytest.mark.parametrize("n_layers", [1, 2, 3, 8])
def test_scaled_branch_scale_is_one_over_sqrt_of_the_sublayer_count(n_layers):
    model = LM(tiny_cfg("scaled", n_layers=n_layers)).double()
    assert model.residual.scale == 1.0 / math.sqrt(2 * n_layers)
    assert not list(model.residual.parameters())
    h, y = torch.randn(2, 3, 32, dtype=torch.float64), torch.randn(2, 3, 32, dtype=torch.float64)
    out = model.residual.write(model.residual.init(h), 0, y)["h"]
    assert rel_err(out - h, y / math.sqrt(2 * n_layers)) < 1e-15


def test_scaled_with_four_sublayers_halves_every_branch_exactly():
    model = LM(tiny_cfg("scaled", n_layers=2)).double()
    idx = torch.randint(0, 61, (2, 6))
    h = model.embed(idx)
    for f in model.sublayers:
        h = h + 0.5 * f(h)  # 1/sqrt(4) is exact in binary
    assert torch.equal(model(idx), model.head(model.final_norm(h)))
