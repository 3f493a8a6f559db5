"""hc and mhc together (the n-stream wiring of residual/hyper/streams.py): the residual mixing
matrix is really applied, the streams start equal and training separates them, the static and
dynamic parameters and counts, per-token dynamic coefficients, and the shared projection kernel.
The generic properties run over KIND_CASES in test_contract.py."""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.residual.hyper.streams import ScaledProjection


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


def test_scaled_projection_backward():
    """(v @ W) / RMS(v) with its hand-written backward, against finite differences."""
    torch.manual_seed(0)
    v = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ScaledProjection.apply(a, b, 1e-6), (v, W))
    expected = (v @ W) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(ScaledProjection.apply(v, W, 1e-6), expected) < 1e-14
