"""depth_swa: a window covering depth is Full AttnRes, window 1 against the reference in float64,
source counts and names, and identity at init only when the window covers depth."""
from __future__ import annotations

import pytest
import torch

from helpers import residual_params, grads, prenorm_twin, randomize_residual, reference_logits, rel_err, tiny_cfg
from resstream import LM


@pytest.mark.parametrize("n_layers", [1, 3, 4])
def test_parameter_count(n_layers):
    D = 32
    L = 2 * n_layers
    assert residual_params("depth_swa", n_layers) == 2 * (L + 1) * D  # queries and key-norm weights
    assert residual_params("depth_swa", n_layers, key_norm_learnable=False) == (L + 1) * D


@pytest.mark.parametrize("window", [6, 9])  # L = 6 sublayers
def test_depth_swa_covering_window_equals_full_attnres(window):
    full = LM(tiny_cfg("attnres")).double()
    randomize_residual(full)
    swa = LM(tiny_cfg("depth_swa", window=window)).double()
    swa.load_state_dict(full.state_dict())  # same parameter names: queries, key_norm_weight
    idx = torch.randint(0, 61, (2, 11))
    a, _, wa = full(idx, return_mixing=True)
    b, _, wb = swa(idx, return_mixing=True)
    assert rel_err(b, a) < 1e-12
    for l, (u, v) in enumerate(zip(wa, wb)):
        assert u.shape == v.shape and rel_err(v, u) < 1e-12, l
        assert full.residual.source_names(l) == swa.residual.source_names(l)


def test_depth_swa_window_one_matches_reference_in_float64():
    """Window 1 is not in KIND_CASES (its float32 gradients are ill-conditioned, see helpers.py);
    its exact equality with the reference is checked here, forward and every gradient."""
    model = LM(tiny_cfg("depth_swa", window=1)).double()
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 11))
    logits, _, mixing = model(idx, return_mixing=True)
    ref_model, ref_logits, ref_weights = reference_logits(model, idx)
    assert rel_err(logits, ref_logits) < 1e-10
    for w, w_ref in zip(mixing, ref_weights):
        assert w.shape == w_ref.shape and w.shape[-1] <= 2 and rel_err(w, w_ref) < 1e-10
    R = torch.randn_like(ref_logits)
    g, g_ref = grads(model, logits, R), grads(ref_model, ref_logits, R)
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


def test_depth_swa_source_counts_and_names():
    for W in range(1, 8):
        model = LM(tiny_cfg("depth_swa", window=W))
        _, _, mixing = model(torch.randint(0, 61, (1, 4)), return_mixing=True)
        L = model.cfg.n_sublayers
        for l in range(L + 1):
            names = model.residual.source_names(l)
            assert mixing[l].shape[-1] == len(names) == 1 + min(l, W)
            assert names[0] == "emb" and names[1:] == [f"f{i}" for i in range(max(0, l - W), l)]


def test_depth_swa_starts_as_prenorm_only_when_the_window_covers_depth():
    idx = torch.randint(0, 61, (2, 9))
    for W, same in ((6, True), (3, False)):
        model = LM(tiny_cfg("depth_swa", window=W).replace(norm_eps=1e-14)).double()
        err = rel_err(model(idx), prenorm_twin(model)(idx))
        assert (err < 1e-8) if same else (err > 1e-3), (W, err)
