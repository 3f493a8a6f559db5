"""ladder (residual/ladder.py): sublayer l's input leaves out exactly y_{l-1}, the head sees
every output, it owns nothing, and it is not PreNorm with the same weights (it does not claim
identity at init). The generic contract (reference, causality, decoding) covers it through
the registry; tensor parallelism is in tests/test_tensor_parallel.py."""
from __future__ import annotations

import pytest
import torch

from helpers import prenorm_twin, rel_err, residual_params, tiny_cfg
from resstream import LM


def _inputs_and_outputs(model: LM, idx: torch.Tensor, bump: int | None = None):
    """Each sublayer's input and output; ``bump``: add 1 to that sublayer's output."""
    xs, ys, handles = [], [], []
    for l, sub in enumerate(model.sublayers):
        def hook(module, args, out, l=l):
            xs.append(args[0].detach().clone())
            out = out + 1.0 if l == bump else out
            ys.append(out.detach().clone())
            return out
        handles.append(sub.register_forward_hook(hook))
    logits = model(idx)
    for h in handles:
        h.remove()
    return xs, ys, logits


def test_parameter_free():
    assert residual_params("ladder", 3) == 0


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_each_input_is_the_embedding_plus_all_outputs_but_the_newest(n_layers):
    model = LM(tiny_cfg("ladder", n_layers=n_layers)).double()
    idx = torch.randint(0, 61, (2, 7))
    xs, ys, logits = _inputs_and_outputs(model, idx)
    emb = model.embed(idx)
    for l, x in enumerate(xs):
        assert torch.allclose(x, emb + sum(ys[: max(l - 1, 0)], torch.zeros_like(emb)), rtol=0, atol=1e-12), l
    h = emb + sum(ys, torch.zeros_like(emb))  # the last two outputs are added after the last sublayer
    assert rel_err(logits, model.head(model.final_norm(h))) < 1e-12


@pytest.mark.parametrize("l", [0, 1, 2, 3])
def test_sublayer_after_l_does_not_see_its_output_the_next_one_does(l):
    model = LM(tiny_cfg("ladder", n_layers=3)).double()
    idx = torch.randint(0, 61, (2, 7))
    xs, _, logits = _inputs_and_outputs(model, idx)
    xs_b, _, logits_b = _inputs_and_outputs(model, idx, bump=l)
    assert all(torch.equal(a, b) for a, b in zip(xs[: l + 2], xs_b[: l + 2]))  # f_{l+1} never waits for y_l
    assert not torch.equal(xs[l + 2], xs_b[l + 2])  # f_{l+2} reads it
    assert not torch.allclose(logits, logits_b)


def test_the_last_output_reaches_the_head():
    model = LM(tiny_cfg("ladder", n_layers=2)).double()
    idx = torch.randint(0, 61, (2, 7))
    _, _, logits = _inputs_and_outputs(model, idx)
    _, _, bumped = _inputs_and_outputs(model, idx, bump=model.cfg.n_sublayers - 1)
    assert not torch.allclose(logits, bumped)


def test_not_prenorm_with_the_same_weights():
    model = LM(tiny_cfg("ladder")).double()
    idx = torch.randint(0, 61, (2, 7))
    assert not model.residual.identity_at_init
    assert rel_err(model(idx), prenorm_twin(model)(idx)) > 1e-3
