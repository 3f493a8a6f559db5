"""mhc: Sinkhorn-Knopp gives doubly stochastic matrices in float32 at least with an exact backward,
the coefficients stay float32 in a bfloat16 model, the init is near hc's, and sublayer 0 reads
a scaled embedding."""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.residual.hyper.mhc import INIT_LOGIT
from resstream.residual.hyper.sinkhorn import sinkhorn


def test_first_sublayer_input_is_a_scaled_embedding():
    """The streams start as n copies of the embedding (HC section 2.1): sublayer 0 reads
    sum_j pre_j emb."""
    model = LM(tiny_cfg("mhc", n_streams=4, dynamic=False)).double()
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 5))
    emb = model.embed(idx)
    pre = torch.sigmoid(model.residual.static_pre[0]).sum()
    assert torch.allclose(model.residual.read(model.residual.init(emb), 0), pre * emb, rtol=1e-14, atol=0)


def test_sinkhorn_is_doubly_stochastic():
    """20 iterations (columns, then rows): rows sum to 1 to rounding (the last step), columns
    within 1e-5 for logits of spread 0.5; all entries positive. Near-permutation inputs
    converge far more slowly (see the mhc docstring); rows stay exact there too."""
    torch.manual_seed(0)
    z = 0.5 * torch.randn(4096, 4, 4)
    P = sinkhorn(z, 20)
    assert P.dtype == torch.float32 and bool((P > 0).all())
    assert (P.sum(-1) - 1).abs().max() < 1e-6
    assert (P.sum(-2) - 1).abs().max() < 1e-5
    hard = (torch.eye(4) - 1) * INIT_LOGIT + 0.3 * torch.randn(4096, 4, 4)
    assert (sinkhorn(hard, 20).sum(-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                            (torch.float64, torch.float64)])
def test_sinkhorn_runs_in_float32_at_least(dtype, expected):
    """bf16 logits are projected in float32 (a bf16 projection is only good to ~1e-2);
    float64 stays float64 so the model can be checked against the float64 reference."""
    torch.manual_seed(0)
    z = (0.5 * torch.randn(512, 4, 4)).to(dtype)
    P = sinkhorn(z, 20)
    assert P.dtype == expected
    assert (P.sum(-1) - 1).abs().max() < 1e-6 and (P.sum(-2) - 1).abs().max() < 1e-5
    ref = sinkhorn(z.double(), 20)
    assert (P.double() - ref).abs().max() < 1e-6


def test_mhc_coefficients_in_bfloat16_model_are_float32():
    model = LM(tiny_cfg("mhc", n_streams=4)).to(torch.bfloat16)
    randomize_residual(model, scale=0.05)
    H = torch.randn(2, 5, 4, model.cfg.d_model, dtype=torch.bfloat16)
    C, post = model.residual.coefficients(model.residual.static_coefficients(torch.float32), H, 3)
    assert C.dtype == post.dtype == torch.float32
    assert (C[..., 1:, :].sum(-1) - 1).abs().max() < 1e-6
    _, loss = model(torch.randint(0, 61, (2, 5)), torch.randint(0, 61, (2, 5)))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.residual.parameters())


def test_sinkhorn_backward_is_the_gradient_of_the_iterations():
    """The hand-written backward against finite differences, and against autograd through
    the same iterations written plainly."""
    torch.manual_seed(0)
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 7), (z,))

    def plain(t: torch.Tensor, iters: int) -> torch.Tensor:
        m = t.exp()
        for _ in range(iters):
            m = m / m.sum(-2, keepdim=True)
            m = m / m.sum(-1, keepdim=True)
        return m

    R = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad((sinkhorn(z, 20) * R).sum(), z)
    (g_ref,) = torch.autograd.grad((plain(z, 20) * R).sum(), z)
    assert rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("dynamic", [True, False])
def test_mhc_init_is_near_hc_init(dynamic):
    """pre within sigmoid(-8) = 3.4e-4 of e_{l mod n}, post = 1 exactly, res within
    (n - 1) 3.4e-4 of I (and doubly stochastic); whatever the streams, since phi = 0."""
    n = 4
    model = LM(tiny_cfg("mhc", n_streams=n, dynamic=dynamic))
    r = model.residual
    H = torch.randn(2, 5, n, model.cfg.d_model)
    static = r.static_coefficients(torch.float32)
    for l in range(model.cfg.n_sublayers):
        C, post = r.coefficients(static, H, l)
        pre, res = C[..., 0, :], C[..., 1:, :]
        assert (pre - torch.eye(n)[l % n]).abs().max() < 3.4e-4
        assert torch.equal(post, torch.ones_like(post))
        assert (res - torch.eye(n)).abs().max() < (n - 1) * 3.4e-4
        assert (res.sum(-1) - 1).abs().max() < 1e-6 and (res.sum(-2) - 1).abs().max() < 1e-6
