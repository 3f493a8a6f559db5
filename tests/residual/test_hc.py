"""hc: the wiring follows the paper's orientation (Eqs. 2-5) and the init is Eq. 14."""
from __future__ import annotations

import torch

from helpers import tiny_cfg
from resstream import LM


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


def test_hc_init_is_eq14():
    model = LM(tiny_cfg("hc", n_streams=3))
    r, L = model.residual, model.cfg.n_sublayers
    for l in range(L):
        assert torch.equal(r.static_pre[l], torch.eye(3)[l % 3])
    assert torch.equal(r.static_post, torch.ones(L, 3))
    assert torch.equal(r.static_res, torch.eye(3).expand(L, 3, 3))
    assert torch.equal(r.dynamic_proj, torch.zeros_like(r.dynamic_proj))
    assert torch.allclose(r.dynamic_scale, torch.full((L, 2), 0.01))
