"""Block AttnRes: S = 1 equals Full, the source sets of the paper's Eq. 6, the first sublayer reads
the embedding itself, the parameter-free key norm, and bfloat16 against the float64 reference
(the generic properties run over KIND_CASES in test_contract.py, the kernels in test_attnres.py)."""
from __future__ import annotations

import torch

from helpers import randomize_residual, reference_logits, rel_err, tiny_cfg
from resstream import LM


def test_block_with_s1_equals_full():
    full = LM(tiny_cfg("attnres")).double()
    randomize_residual(full)
    block = LM(tiny_cfg("block_attnres", block_size=1)).double()
    block.load_state_dict(full.state_dict())
    idx = torch.randint(0, 61, (2, 11))
    assert rel_err(block(idx), full(idx)) < 1e-12


def test_block_source_counts():
    """Sublayer l sees 1 + floor(l/S) completed sources, plus a partial iff l mod S != 0;
    the final mixture sees 1 + ceil(L/S)."""
    for S in (1, 2, 3, 4, 5, 6, 9):
        model = LM(tiny_cfg("block_attnres", block_size=S))
        _, _, mixing = model(torch.randint(0, 61, (1, 4)), return_mixing=True)
        L = model.cfg.n_sublayers
        for l in range(L):
            assert mixing[l].shape[-1] == 1 + l // S + (1 if l % S else 0)
        assert mixing[L].shape[-1] == 1 + -(-L // S)


def test_first_sublayer_reads_the_embedding_exactly():
    model = LM(tiny_cfg("block_attnres", block_size=3))
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 5))
    emb = model.embed(idx)
    state = model.residual.init(emb)
    assert torch.equal(model.residual.read(state, 0), emb)


def test_parameter_free_key_norm():
    model = LM(tiny_cfg("block_attnres", block_size=2, key_norm_learnable=False)).double()
    assert [n for n, _ in model.residual.named_parameters()] == ["queries"]
    randomize_residual(model)
    idx = torch.randint(0, 61, (1, 7))
    _, ref, _ = reference_logits(model, idx)
    assert rel_err(model(idx), ref) < 1e-10


def test_bfloat16_stays_close_to_the_reference():
    model = LM(tiny_cfg("block_attnres", n_layers=3, block_size=2))
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 9))
    _, ref, _ = reference_logits(model, idx)
    assert rel_err(model.to(torch.bfloat16)(idx), ref) < 3e-2
