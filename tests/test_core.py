"""Core: every residual kind against its float64 reference, identity at init, S = 1 equals
Full, causality, every residual parameter matters, and config errors."""
from __future__ import annotations


import pytest
import torch

from helpers import KIND_CASES, assert_matches_reference, case_id, randomize_residual, reference_logits, rel_err, tiny_cfg
from resstream import LM, ConfigError, ModelConfig, ResidualConfig

IDS = [case_id(c) for c in KIND_CASES]
ATTNRES = [c for c in KIND_CASES if c[0] in ("attnres", "block_attnres")]
ATTNRES_IDS = [case_id(c) for c in ATTNRES]


def identity_cases():
    from resstream.residual.base import _REGISTRY
    cases = [c for c in KIND_CASES if c[0] != "prenorm" and _REGISTRY[c[0]].identity_at_init]
    return cases, [case_id(c) for c in cases]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind,opts", KIND_CASES, ids=IDS)
def test_matches_reference_forward_and_gradients(kind, opts, dtype, tol):
    model = LM(tiny_cfg(kind, **opts)).to(dtype)
    randomize_residual(model)
    mixing, ref_weights = assert_matches_reference(model, torch.randint(0, 61, (2, 11)), tol)
    if ref_weights:
        assert len(mixing) == model.cfg.n_sublayers + 1
        for l, (w, w_ref) in enumerate(zip(mixing, ref_weights)):
            assert w.shape == w_ref.shape, l
            assert len(model.residual.source_names(l)) == w.shape[-1]
            assert rel_err(w, w_ref) < tol
            if model.residual.weights_sum_to_one:  # softmax kinds; not DenseFormer
                assert torch.allclose(w.sum(-1).double(), torch.ones((), dtype=torch.float64), atol=1e-5)
    else:
        assert all(w is None for w in mixing)


@pytest.mark.parametrize("kind,opts", identity_cases()[0], ids=identity_cases()[1])
def test_identity_at_init_reproduces_prenorm(kind, opts):
    # a tiny norm epsilon: the mixtures are the *mean* of the sources, equal to PreNorm's sum
    # only after the scale-invariant norms
    cfg = tiny_cfg(kind, **opts).replace(norm_eps=1e-14)
    base_cfg = tiny_cfg("prenorm").replace(norm_eps=1e-14)
    base = LM(base_cfg).double()
    model = LM(cfg).double()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("residual.") for k in missing)
    idx = torch.randint(0, 61, (2, 11))
    assert rel_err(model(idx), base(idx)) < 1e-8


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


@pytest.mark.parametrize("kind,opts", KIND_CASES, ids=IDS)
def test_causality(kind, opts):
    model = LM(tiny_cfg(kind, **opts))
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 12))
    t = 7
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 61
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


PARAMETER_FREE_KINDS = {"prenorm", "scaled"}
PARAM_CASES = [c for c in KIND_CASES if c[0] not in PARAMETER_FREE_KINDS]


@pytest.mark.parametrize("kind,opts", PARAM_CASES, ids=[case_id(c) for c in PARAM_CASES])
def test_every_residual_parameter_matters(kind, opts):
    model = LM(tiny_cfg(kind, **opts)).double()
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 9))
    logits, loss = model(idx, idx)
    loss.backward()
    assert list(model.residual.parameters()), f"{kind} is not in PARAMETER_FREE_KINDS, so it should own parameters"
    for name, p in model.residual.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        with torch.no_grad():
            before = model(idx)
            p.add_(torch.randn_like(p) * 0.1)
            assert not torch.allclose(model(idx), before), name


@pytest.mark.parametrize("kind,opts", ATTNRES, ids=ATTNRES_IDS)
def test_every_attnres_query_row_matters(kind, opts):
    model = LM(tiny_cfg(kind, **opts)).double()
    randomize_residual(model)
    idx = torch.randint(0, 61, (2, 9))
    model(idx, idx)[1].backward()
    # Row 0 drives sublayer 0, whose only source is the embedding: a softmax over one
    # source is constant, so that row cannot matter. Every other row must.
    for name, p in model.residual.named_parameters():
        for row in range(1, model.cfg.n_sublayers + 1):
            assert p.grad[row].abs().sum() > 0, f"{name}[{row}]"


def test_zero_query_init_is_uniform_and_key_norm_gets_no_gradient():
    model = LM(tiny_cfg("attnres")).double()
    idx = torch.randint(0, 61, (2, 6))
    _, loss, mixing = model(idx, idx, return_mixing=True)
    for w in mixing:
        assert torch.allclose(w, torch.full_like(w, 1.0 / w.shape[-1]))
    loss.backward()
    assert model.residual.queries.grad.abs().sum() > 0
    assert model.residual.key_norm_weight.grad.abs().sum() == 0  # w = 0: g cannot move yet


def test_parameter_free_key_norm():
    model = LM(tiny_cfg("block_attnres", block_size=2, key_norm_learnable=False)).double()
    assert [n for n, _ in model.residual.named_parameters()] == ["queries"]
    randomize_residual(model)
    idx = torch.randint(0, 61, (1, 7))
    _, ref, _ = reference_logits(model, idx)
    assert rel_err(model(idx), ref) < 1e-10


def test_non_residual_parameters_identical_across_kinds():
    shapes = {}
    for kind, opts in KIND_CASES:
        sd = LM(tiny_cfg(kind, **opts)).state_dict()
        shapes[kind] = {k: v.shape for k, v in sd.items() if not k.startswith("residual.")}
    first = next(iter(shapes.values()))
    assert all(s == first for s in shapes.values())


def test_loss_ignores_minus_one_targets():
    model = LM(tiny_cfg())
    idx = torch.randint(0, 61, (2, 8))
    tgt = idx.clone()
    tgt[:, :4] = -1
    _, loss = model(idx, tgt)
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), idx[:, 4:].flatten())
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_heads": 5}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"d_model": 36, "n_heads": 4}, "n_heads"),  # head dim 9: odd, RoPE needs pairs
    ],
)
def test_model_config_errors_name_the_field(kwargs, field):
    base = dict(vocab_size=100, d_model=32, n_heads=4)
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **kwargs})


def test_residual_config_errors():
    with pytest.raises(ConfigError, match="block_size"):
        ResidualConfig(kind="block_attnres", block_size=0)
    with pytest.raises(ConfigError, match="known kinds: .*prenorm"):
        ResidualConfig(kind="nope")
    with pytest.raises(ConfigError, match="unknown config key 'model.residual.blocksize'"):
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"blocksize": 2}}, prefix="model.")
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        ModelConfig.from_dict({"vocab_size": 10, "colour": 1})
    with pytest.raises(ConfigError, match=r"^model\.residual\.kind: unknown residual kind 'x'"):  # prefix once
        ModelConfig.from_dict({"vocab_size": 10, "residual": {"kind": "x"}}, prefix="model.")
    with pytest.raises(ConfigError, match="d_model: expected int"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": "big"})
