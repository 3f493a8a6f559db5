"""Kind-specific facts of denseformer, ddl, depth_swa, rezero and scaled (the generic
properties, reference equality included, run over KIND_CASES in test_core.py)."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import grads, randomize_residual, reference_logits, rel_err, tiny_cfg
from resstream import LM, ConfigError, ResidualConfig


def embedding_only_logits(model: LM, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the model with every sublayer skipped: head(final_norm(emb))."""
    return model.head(model.final_norm(model.embed(idx)))


def prenorm_twin(model: LM) -> LM:
    """A PreNorm LM with the same non-residual weights as ``model``."""
    base = LM(model.cfg.replace(residual=ResidualConfig(kind="prenorm"))).to(next(model.parameters()).dtype)
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("residual.") for k in unexpected)
    return base


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("n_layers", [1, 3, 4])
def test_parameter_counts(n_layers):
    D = 32
    L = 2 * n_layers
    expected = {
        ("denseformer", ()): n_layers * (n_layers + 3) // 2,  # i + 1 weights at block i = 1..n
        ("ddl", ()): 2 * L * (D + 1),                          # w_beta, b_beta, w_v, b_v per sublayer
        ("depth_swa", ()): 2 * (L + 1) * D,                    # queries and key-norm weights
        ("depth_swa", (("key_norm_learnable", False),)): (L + 1) * D,
        ("rezero", ()): L,
        ("scaled", ()): 0,
    }
    for (kind, opts), count in expected.items():
        model = LM(tiny_cfg(kind, n_layers=n_layers, **dict(opts)))
        assert model.num_params(residual_only=True) == count, kind


# ----------------------------------------------------------------------------- denseformer


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


# ----------------------------------------------------------------------------- ddl


@pytest.mark.parametrize("beta0", [1.0, 0.3, 1.9])
def test_ddl_gate_and_value_at_init(beta0):
    model = LM(tiny_cfg("ddl", ddl_beta_init=beta0))
    x = torch.randn(2, 5, 32) * 3
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        model = model.to(dtype)
        model.residual.reset_parameters()  # the logit of beta0/2, in the parameters' precision
        for l in range(model.cfg.n_sublayers):
            beta, v = model.residual.gate_and_value(x.to(dtype), l)
            assert torch.allclose(beta, torch.full_like(beta, beta0), rtol=0, atol=tol), l
            assert torch.equal(v, torch.full_like(v, 2.0)), l


def test_ddl_write_is_the_delta_rule():
    """k^T x' - v = (1 - beta)(k^T x - v) along k = y/|y|, and x' - x is parallel to k."""
    model = LM(tiny_cfg("ddl")).double()
    randomize_residual(model)
    stream = model.residual
    x, y = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    for l in (0, 3):
        beta, v = stream.gate_and_value(x, l)
        x_new = stream.write(stream.init(x), l, y)["h"]
        k = y / y.norm(dim=-1, keepdim=True)  # eps_k = 1e-5 is negligible at |y| ~ 5.7
        before, after = (k * x).sum(-1) - v, (k * x_new).sum(-1) - v
        assert rel_err(after, (1 - beta) * before) < 1e-9
        step = x_new - x
        assert rel_err(step, (step * k).sum(-1, keepdim=True) * k) < 1e-9


def test_ddl_small_gate_is_the_identity_shortcut_and_default_is_not():
    idx = torch.randint(0, 61, (2, 7))
    near_identity = LM(tiny_cfg("ddl", ddl_beta_init=1e-9)).double()
    assert rel_err(near_identity(idx), embedding_only_logits(near_identity, idx)) < 1e-6
    default = LM(tiny_cfg("ddl")).double()
    assert rel_err(default(idx), embedding_only_logits(default, idx)) > 1e-2
    assert rel_err(default(idx), prenorm_twin(default)(idx)) > 1e-2  # identity_at_init = False


@pytest.mark.parametrize("value", [0.0, 2.0, -0.5, 3.0])
def test_ddl_beta_init_must_be_inside_the_gate_range(value):
    with pytest.raises(ConfigError, match="residual.ddl_beta_init"):
        ResidualConfig(kind="ddl", ddl_beta_init=value)


# ----------------------------------------------------------------------------- depth_swa


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


# ----------------------------------------------------------------------------- rezero


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


# ----------------------------------------------------------------------------- scaled


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
