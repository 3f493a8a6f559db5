"""hc and mhc facts beyond the generic property tests of test_core.py: the wiring follows the
papers' orientation, the residual mixing matrix is applied, Sinkhorn-Knopp gives doubly
stochastic matrices in float32 at least with an exact backward, the inits are what the
module says, static and dynamic variants differ only where they should, and training
breaks the streams' initial symmetry."""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.residual.hyper import INIT_LOGIT, _ScaledProjection, sinkhorn




def streams_after(model: LM, idx: torch.Tensor, upto: int):
    """Run the stream API by hand up to sublayer ``upto``; returns (state, per-sublayer inputs)."""
    stream = model.residual
    state = stream.init(model.embed(idx))
    inputs = []
    for l in range(upto):
        x = stream.read(state, l)
        inputs.append(x)
        state = stream.write(state, l, model.sublayers[l](x))
    return state, inputs


# ----------------------------------------------------------------------------- wiring


@torch.no_grad()
def test_hc_wiring_follows_the_paper_orientation():
    """A_r[j, i] carries stream j into stream i, B[i] scales the output into stream i,
    A_m[j] reads stream j (HC Eqs. 2-5), checked on hand-set static weights."""
    model = LM(tiny_cfg("hc", n_streams=2, dynamic=False)).double()
    r = model.residual
    r.static_res[0] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # stream 0 -> stream 1 only
    r.static_post[0] = torch.tensor([0.0, 2.0])
    r.static_pre[0] = torch.tensor([3.0, 0.0])
    r.static_pre[1] = torch.tensor([0.0, 1.0])  # sublayer 1 reads stream 1
    idx = torch.randint(0, 61, (2, 7))
    emb = model.embed(idx)
    state = r.init(emb)
    x0 = r.read(state, 0)
    assert torch.equal(x0, 3 * emb)
    y0 = model.sublayers[0](x0)
    state = r.write(state, 0, y0)
    assert torch.allclose(r.read(state, 1), emb + 2 * y0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind,opts", [("hc", {"dynamic": False}), ("hc", {}), ("mhc", {}), ("mhc", {"dynamic": False})],
                         ids=["hc-static", "hc-dynamic", "mhc-dynamic", "mhc-static"])
def test_residual_mixing_matrix_is_applied(kind, opts):
    """Changing only the static residual-mixing parameters changes the logits (a public HC
    implementation computed the matrix and never applied it), and in dynamic mode so does
    changing only the projection columns that feed the mixing matrix."""
    model = LM(tiny_cfg(kind, n_streams=3, **opts)).double()
    randomize_residual(model, scale=0.3)
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = model(idx)
        perm = torch.tensor([2, 0, 1])
        model.residual.static_res.copy_(model.residual.static_res[:, perm])  # another mixing
        after = model(idx)
    assert rel_err(after, before) > 1e-3
    if opts.get("dynamic", True):
        n = 3
        res_cols = slice(2, 2 + n) if kind == "hc" else slice(2 * n, 2 * n + n * n)  # W_r; phi_res
        with torch.no_grad():
            proj = model.residual.dynamic_proj
            proj[:, :, res_cols] += 0.5 * torch.randn_like(proj[:, :, res_cols])
            assert rel_err(model(idx), after) > 1e-5  # float64: rounding is ~1e-15


def test_first_sublayer_input_is_a_scaled_embedding():
    """The streams start as n copies of the embedding (HC section 2.1): sublayer 0 reads
    sum_j pre_j emb."""
    model = LM(tiny_cfg("mhc", n_streams=4, dynamic=False)).double()
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 5))
    emb = model.embed(idx)
    pre = torch.sigmoid(model.residual.static_pre[0]).sum()
    assert torch.allclose(model.residual.read(model.residual.init(emb), 0), pre * emb, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- Sinkhorn


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


def test_scaled_projection_backward():
    """(v @ W) / RMS(v) with its hand-written backward, against finite differences."""
    torch.manual_seed(0)
    v = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _ScaledProjection.apply(a, b, 1e-6), (v, W))
    expected = (v @ W) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(_ScaledProjection.apply(v, W, 1e-6), expected) < 1e-14


# ----------------------------------------------------------------------------- inits


def test_hc_init_is_eq14():
    model = LM(tiny_cfg("hc", n_streams=3))
    r, L = model.residual, model.cfg.n_sublayers
    for l in range(L):
        assert torch.equal(r.static_pre[l], torch.eye(3)[l % 3])
    assert torch.equal(r.static_post, torch.ones(L, 3))
    assert torch.equal(r.static_res, torch.eye(3).expand(L, 3, 3))
    assert torch.equal(r.dynamic_proj, torch.zeros_like(r.dynamic_proj))
    assert torch.allclose(r.dynamic_scale, torch.full((L, 2), 0.01))


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


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_streams_start_equal_and_training_separates_them(kind):
    """At init every stream holds PreNorm's h_l (so the model is PreNorm); the init is not
    symmetric across streams (sublayer l reads stream l mod n), so one SGD step makes the
    streams differ. A symmetric init (e.g. uniform pre and res) would never separate them."""
    torch.manual_seed(0)
    model = LM(tiny_cfg(kind, n_streams=4)).double()
    idx = torch.randint(0, 61, (2, 9))
    state, _ = streams_after(model, idx, model.cfg.n_sublayers)
    H = state["H"]
    assert (H - H[..., :1, :]).abs().max() < 1e-12
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx, idx)[1].backward()
    opt.step()
    with torch.no_grad():
        H = streams_after(model, idx, model.cfg.n_sublayers)[0]["H"]
    assert (H - H[..., :1, :]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- static vs dynamic


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_static_and_dynamic_parameters_and_counts(kind):
    """Static: only the per-sublayer static coefficients, L n (n + 2) numbers for both kinds.
    Dynamic adds, per sublayer, hc: D (n + 2) projection + D norm weight + 2 scales (HC
    appendix B); mhc: nD (n^2 + 2n) projection phi + 3 scales (mHC Eq. 7)."""
    n, D = 4, 32
    static = LM(tiny_cfg(kind, n_streams=n, dynamic=False))
    dynamic = LM(tiny_cfg(kind, n_streams=n))
    L = static.cfg.n_sublayers
    assert sorted(name for name, _ in static.residual.named_parameters()) == ["static_post", "static_pre", "static_res"]
    assert static.num_params(residual_only=True) == L * n * (n + 2)
    extra = D * (n + 2) + D + 2 if kind == "hc" else n * D * (n * n + 2 * n) + 3
    assert dynamic.num_params(residual_only=True) == L * (n * (n + 2) + extra)


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_dynamic_coefficients_vary_by_token_and_static_do_not(kind):
    """Dynamic at init computes the same logits as static (zero projection); once the
    projection is non-zero the coefficients differ between tokens."""
    torch.manual_seed(0)
    static = LM(tiny_cfg(kind, n_streams=3, dynamic=False)).double()
    dynamic = LM(tiny_cfg(kind, n_streams=3)).double()
    dynamic.load_state_dict(static.state_dict(), strict=False)
    idx = torch.randint(0, 61, (2, 9))
    assert rel_err(dynamic(idx), static(idx)) < 1e-14
    randomize_residual(dynamic, scale=0.3)
    H = torch.randn(2, 9, 3, dynamic.cfg.d_model, dtype=torch.float64)
    r = dynamic.residual
    for c in r.coefficients(r.static_coefficients(torch.float64), H, 2):
        assert c.shape[:2] == (2, 9)
        assert (c - c[:1, :1]).abs().max() > 1e-3
    s = static.residual
    for c in s.coefficients(s.static_coefficients(torch.float64), H, 2):
        assert c.dim() in (1, 2)  # one value per sublayer, broadcast over tokens
