"""denseformer: the identity init of the depth-weighted averages (exactly PreNorm), their source
names, and a DWA that reaches back to the embedding."""
from __future__ import annotations

import pytest
import torch

from helpers import residual_params, embedding_only_logits, prenorm_twin, randomize_residual, tiny_cfg
from resstream import LM


@pytest.mark.parametrize("n_layers", [1, 3, 4])
def test_parameter_count(n_layers):
    assert residual_params("denseformer", n_layers) == n_layers * (n_layers + 3) // 2  # i + 1 weights at block i = 1..n


@pytest.mark.parametrize("n_layers", [1, 3, 5])
def test_denseformer_identity_init_weights(n_layers):
    model = LM(tiny_cfg("denseformer", n_layers=n_layers))
    for i, a in enumerate(model.residual.dwa):
        assert a.shape == (i + 2,)  # DWA after block i+1 sees X_0..X_{i+1}
        assert torch.equal(a.detach(), torch.eye(i + 2)[-1])
    _, _, mixing = model(torch.randint(0, 61, (2, 5)), return_mixing=True)
    L = 2 * n_layers
    for l in range(L + 1):
        names, w = model.residual.source_names(l), mixing[l]
        assert w.shape == (2, 5, len(names))
        expected = torch.zeros(len(names))
        if l < L and l % 2:  # an MLP reads Y_b + its attention output
            expected[-2:] = 1.0
        else:  # an attention sublayer (or the head) reads Y_b = X_b at init
            expected[-1] = 1.0
        assert torch.equal(w, expected.expand_as(w)), l
    assert model.residual.source_names(L) == ["emb"] + [f"X{j}" for j in range(1, n_layers + 1)]
    if n_layers >= 2:
        assert model.residual.source_names(3) == ["emb", "X1", "f2"]  # block 2's MLP


def test_denseformer_identity_is_exact_prenorm():
    """Y_i = 1 * X_i + 0 * rest: exactly PreNorm, with the default norm epsilon and no rounding."""
    model = LM(tiny_cfg("denseformer", n_layers=4))
    base = prenorm_twin(model)
    idx = torch.randint(0, 61, (2, 9))
    assert torch.equal(model(idx), base(idx))


def test_denseformer_dwa_reaches_back_to_the_embedding():
    model = LM(tiny_cfg("denseformer")).double()
    randomize_residual(model)
    with torch.no_grad():
        model.residual.dwa[-1].copy_(torch.eye(len(model.residual.dwa[-1]))[0])  # Y_n = X_0
    idx = torch.randint(0, 61, (2, 7))
    assert torch.equal(model(idx), embedding_only_logits(model, idx))
