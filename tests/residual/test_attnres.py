"""Attention Residuals (Full and Block) fast paths: each autograd kernel by gradcheck, whole models
(both recompute settings, short last blocks, deeper stacks) against the float64 reference,
forward and every gradient, what the fast paths save for backward, and the pseudo-queries."""
from __future__ import annotations

import pytest
import torch

from helpers import KIND_CASES, assert_matches_reference, case_id, randomize_residual, rel_err, tiny_cfg
from resstream import LM, ConfigError, ModelConfig, ResidualConfig
from resstream.residual.attnres import kernels as K
from resstream.residual.attnres import phases as P
from resstream.residual.attnres.recompute import Recipe
from resstream.residual.attnres.reference import attend

ATTNRES = [c for c in KIND_CASES if c[0] in ("attnres", "block_attnres")]

F64 = torch.float64




def _rand(*shape, grad=True):
    return torch.randn(*shape, dtype=F64, requires_grad=grad)


# ----------------------------------------------------------------------------- kernels


def test_normed_logits_gradcheck_and_value():
    v, Q = _rand(2, 3, 8), _rand(5, 8)
    assert torch.autograd.gradcheck(lambda v, Q: K.NormedLogits.apply(v, Q, 1e-6), (v, Q))
    expected = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)) @ Q.t()
    assert rel_err(K.NormedLogits.apply(v, Q, 1e-6), expected) < 1e-13


def test_weighted_sum_gradcheck():
    alpha, vs = _rand(2, 3, 4), [_rand(2, 3, 8) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda a, *v: K.WeightedSum.apply(a, *v), (alpha, *vs))


def test_phase1_gradcheck():
    alpha, blocks = _rand(2, 3, 4, 5), [_rand(2, 3, 6) for _ in range(5)]
    assert torch.autograd.gradcheck(lambda a, *b: P.Phase1.apply(a, None, *b), (alpha, *blocks))
    # outputs nobody reads (the last block may be short) get no gradient, the rest stay exact
    assert torch.autograd.gradcheck(lambda a, *b: P.Phase1.apply(a, None, *b)[1] * 2, (alpha, *blocks))
    ref = torch.einsum("btsj,jbtd->btsd", alpha, torch.stack(blocks))
    assert rel_err(torch.stack(P.Phase1.apply(alpha, None, *blocks), -2), ref) < 1e-13


def test_gradient_sums_by_source():
    """Readers leave (weight, gradient) pairs; each source adds them once (_Source). Through two
    reads and a phase 1 that share sources, every gradient must equal plain autograd's."""
    alpha1, alpha2, A2 = _rand(2, 3, 2), _rand(2, 3, 3), _rand(2, 3, 2, 3)
    vs = [_rand(2, 3, 8) for _ in range(3)]

    def f(a1, a2, a3, v0, v1, v2):
        sums = K.GradSums()
        s0, s1, s2 = (K.Source.apply(v, sums, i) for i, v in enumerate((v0, v1, v2)))
        h1 = K.ReadAll.apply(a1, sums, None, s0, s1)
        h2 = K.ReadAll.apply(a2, sums, None, s0, s1, s2)
        o1, o2 = P.Phase1.apply(a3, sums, s0, s1, s2)
        return h1 * h2 + o1 - o2.square() + s2 * 3  # a source also used directly

    assert torch.autograd.gradcheck(f, (alpha1, alpha2, A2, *vs))


@pytest.mark.parametrize("recompute", [False, True])
def test_phase2_gradcheck_and_online_softmax_identity(recompute):
    """x = o + sigmoid(s - lse) (p - o) equals the joint softmax over [phase-1 sources, p]."""
    blocks = [_rand(2, 3, 8, grad=False) for _ in range(3)]
    w = _rand(8, grad=False)
    logits = torch.stack([K.source_logit(b, K.source_rstd(b, 1e-6), w) for b in blocks], -1)
    lse1 = torch.logsumexp(logits, -1)
    a_row = torch.softmax(logits, -1)
    o1 = K.weighted_sum(a_row, blocks)
    p = _rand(2, 3, 8)
    # with recompute the backward takes x from a Recipe (rebuilt from (a_row, blocks) and the
    # unperturbed inputs), as the next norm would share it
    recipe = Recipe(lambda: P.merge(K.weighted_sum(a_row, blocks), p.detach(), w, lse1, 1e-6)[0]) if recompute else None

    def f(o, p, q, lse):
        return P.Phase2.apply(o, p, q, lse, 1e-6, recipe)

    assert torch.autograd.gradcheck(f, (o1.clone().requires_grad_(), p, w.clone().requires_grad_(), lse1.clone().requires_grad_()))
    x_ref, _ = attend(blocks + [p.detach()], w, None, 1e-6)
    assert rel_err(f(o1, p.detach(), w, lse1), x_ref) < 1e-13


def test_shared_mixture_helpers_keep_their_meaning():
    """softmax_mixture (every read of Full and depth_swa, Block's final mixture), source_rstd and
    source_logit are shared by the family: a softmax over q · RMSNorm(v_i), applied to raw v_i."""
    vs = [_rand(2, 3, 8, grad=False) for _ in range(3)]
    q = _rand(8, grad=False)
    h, alpha = K.softmax_mixture([K.source_logit(v, K.source_rstd(v, 1e-6), q) for v in vs], tuple(vs), None)
    h_ref, alpha_ref = attend(vs, q, None, 1e-6)
    assert rel_err(h, h_ref) < 1e-13 and rel_err(alpha, alpha_ref) < 1e-13
    # with gradient sums (ReadAll, Source) the mixture and every gradient are the same
    vg = [v.clone().requires_grad_() for v in vs]
    sums = K.GradSums()
    srcs = tuple(K.as_source(v, sums, i) for i, v in enumerate(vg))
    h2, _ = K.softmax_mixture([K.source_logit(v, K.source_rstd(v, 1e-6), q) for v in srcs], srcs, sums, (0, 1, 2))
    assert rel_err(h2, h_ref) < 1e-13
    R = torch.randn_like(h2)
    g = torch.autograd.grad((h2 * R).sum(), vg)
    vr = [v.clone().requires_grad_() for v in vs]
    g_ref = torch.autograd.grad((attend(vr, q, None, 1e-6)[0] * R).sum(), vr)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(g, g_ref))


# ----------------------------------------------------------------------------- whole models


CASES = [
    ("attnres", {}, 4),
    ("attnres", {"recompute": True}, 3),
    *[("block_attnres", {"block_size": s, "recompute": r}, 4) for s in (3, 4) for r in (False, True, 2, 1, "auto")],
    ("block_attnres", {"block_size": 7, "recompute": True}, 5),  # L = 10: one full block, one short
    ("block_attnres", {"block_size": 4, "key_norm_learnable": False}, 3),
]


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kind,opts,layers", CASES, ids=[f"{k}-{o}-{n}L" for k, o, n in CASES])
def test_fast_path_matches_reference(kind, opts, layers, dtype, tol):
    model = LM(tiny_cfg(kind, n_layers=layers, **opts)).to(dtype)
    randomize_residual(model)
    mixing, ref_weights = assert_matches_reference(model, torch.randint(0, 61, (2, 9)), tol)
    for w, w_ref in zip(mixing, ref_weights):
        assert rel_err(w, w_ref) < tol


RECOMPUTE = [("attnres", {}, True), *[("block_attnres", {"block_size": s}, r) for s in (1, 3, 4) for r in (True, 2, "auto")],
             ("block_attnres", {"block_size": 4}, 3), ("block_attnres", {"block_size": 3}, 1)]


@pytest.mark.parametrize("kind,opts,recompute", RECOMPUTE, ids=[f"{k}-{o}-{r}" for k, o, r in RECOMPUTE])
def test_recompute_gives_equal_gradients(kind, opts, recompute):
    base = LM(tiny_cfg(kind, n_layers=4, recompute=False, **opts))
    randomize_residual(base)
    re = LM(tiny_cfg(kind, n_layers=4, recompute=recompute, **opts))
    re.load_state_dict(base.state_dict())
    idx = torch.randint(0, 61, (2, 9))
    out = []
    for m in (base, re):
        _, loss = m(idx, idx)
        out.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    # the recomputed inputs are bitwise the forward's, so the gradients are bitwise equal too
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backward", [True, False])
def test_block_recompute_leaves_no_reference_cycles(monkeypatch, backward):
    """Block's recompute objects of a step are freed by reference counting alone: a cycle would
    keep their tensors until Python's cycle collector ran (memory grew by most of a step's
    activations per step in a training loop)."""
    import gc
    import weakref

    made, init = [], P.BlockInputs.__init__

    def recording_init(self, *args):
        init(self, *args)
        made.append(weakref.ref(self))

    monkeypatch.setattr(P.BlockInputs, "__init__", recording_init)
    model = LM(tiny_cfg("block_attnres", n_layers=4, block_size=4, recompute=2))
    idx = torch.randint(0, 61, (2, 9))
    gc.collect()  # what earlier tests left for the collector
    gc.disable()
    try:
        logits, loss = model(idx, idx)
        if backward:
            loss.backward()
        del logits, loss
        assert made and all(r() is None for r in made)
        # nor does the graph of a forward whose result is dropped (saved outputs under the hooks)
        nodes = sum(type(o).__name__ == "Phase2Backward" for o in gc.get_objects())
        assert nodes == 0
    finally:
        gc.enable()


def test_recompute_rejected_for_kinds_without_it():
    with pytest.raises(ConfigError, match="recompute"):
        ResidualConfig(kind="prenorm", recompute=True)
    assert ResidualConfig(kind="block_attnres", recompute=True).recompute
    assert ResidualConfig(kind="block_attnres", recompute=2).recompute == 2
    assert ResidualConfig(kind="block_attnres").recompute == "auto"
    for bad in ("sometimes", -1, 1.5):
        with pytest.raises(ConfigError, match="recompute"):
            ResidualConfig(kind="block_attnres", recompute=bad)
    with pytest.raises(ConfigError, match="ablation"):
        ResidualConfig(kind="block_attnres", score="sigmoid", recompute=2)
    # "auto" asks for nothing: the ablations' plain path simply keeps every input
    assert ResidualConfig(kind="block_attnres", score="sigmoid").recompute == "auto"


def test_block_recompute_counts_blocks_from_the_first():
    """recompute=k: the inputs of the first k blocks (the cheapest to recompute) and no others;
    "auto" the first third of them (rounded up), true every block."""
    def recomputed(rc):
        stream = LM(tiny_cfg("block_attnres", n_layers=5, block_size=3, recompute=rc)).residual
        return [l for l in range(stream.n_sublayers) if stream.recomputes(l)]

    assert recomputed(False) == recomputed(0) == []
    assert recomputed(1) == [0, 1, 2]
    assert recomputed(2) == [0, 1, 2, 3, 4, 5]
    assert recomputed("auto") == recomputed(2)  # 10 sublayers: 4 blocks
    assert recomputed(True) == recomputed(9) == list(range(10))


# ----------------------------------------------------------------------------- pseudo-queries


@pytest.mark.parametrize("kind,opts", ATTNRES, ids=[case_id(c) for c in ATTNRES])
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


# ----------------------------------------------------------------------------- saved activations


def _bytes_kept_by_forward(model, idx) -> int:
    """Bytes a forward pass leaves allocated (saved activations, logits, loss), counted exactly
    from the allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(idx, idx)  # noqa: F841  (keeps the graph, and what it saved, alive)
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_saved_activations():
    """Beyond PreNorm, AttnRes keeps its sources (outputs, or blocks and partial sums: one
    [B,T,D] per sublayer) and small statistics, nothing else; with recompute it also drops the
    mixture each sublayer read (L - 1 of them: the first reads the embedding itself)."""
    def cfg(kind, **opts):
        return ModelConfig(vocab_size=61, d_model=128, n_layers=4, n_heads=4, max_seq_len=16,
                           residual=ResidualConfig(kind=kind, **opts))

    B, T, L = 2, 16, 8
    act = B * T * 128 * 4  # one fp32 [B, T, D]
    idx = torch.randint(0, 61, (B, T))
    pre = _bytes_kept_by_forward(LM(cfg("prenorm")), idx)
    for kind, opts in [("attnres", {}), ("block_attnres", {"block_size": 2}), ("block_attnres", {"block_size": 4})]:
        kept = _bytes_kept_by_forward(LM(cfg(kind, recompute=False, **opts)), idx)
        lean = _bytes_kept_by_forward(LM(cfg(kind, recompute=True, **opts)), idx)
        assert kept - pre <= (L + 1.5) * act, (kind, opts, (kept - pre) / act)
        assert kept - lean >= (L - 1.5) * act, (kind, opts, (kept - lean) / act)
        assert lean - pre <= 2.5 * act, (kind, opts, (lean - pre) / act)
    # recompute=k: the inputs of the first k blocks (not the embedding, a source); "auto": a third
    for S, k, n_recomputed in [(2, 2, 3), (4, 1, 3), (4, "auto", 3), (2, "auto", 3), (1, "auto", 2)]:
        some = _bytes_kept_by_forward(LM(cfg("block_attnres", block_size=S, recompute=k)), idx)
        kept = _bytes_kept_by_forward(LM(cfg("block_attnres", block_size=S, recompute=False)), idx)
        assert abs((kept - some) / act - n_recomputed) < 0.5, (S, k, (kept - some) / act)
