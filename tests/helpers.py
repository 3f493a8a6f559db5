"""Shared test helpers: tiny model configs and relative errors."""
from __future__ import annotations

import copy

import torch

from resstream import LM, ModelConfig, ResidualConfig
from resstream.residual import available_kinds, get_kind

# Options beyond the defaults that the generic property tests (tests/residual/test_contract.py,
# generation and diagnostics tests) also cover. Every registered kind is covered with its
# default options without a row here; a new kind adds at most one row.
EXTRA_CASES: list[tuple[str, dict]] = [
    *[("block_attnres", {"block_size": s}) for s in (1, 2, 5, 6, 9)],
    ("hc", {"n_streams": 2, "dynamic": False}),
    ("hc", {"n_streams": 1}),
    ("mhc", {"n_streams": 3, "dynamic": False}),
    ("ddl", {"ddl_beta_init": 1.9}),  # near the reflection regime
    # window 1 is checked in float64 only (tests/residual/test_depth_swa.py): its float32
    # gradients of the first sublayer are ill-conditioned under random queries (1.8e-5 at worst)
    ("depth_swa", {"window": 2, "key_norm_learnable": False}),
    ("depth_swa", {"window": 3}),
    # the ablations of the AttnRes paper's Table 4 (residual/attnres/variants.py)
    ("attnres", {"query": "input"}),
    ("attnres", {"query": "none"}),
    ("attnres", {"score": "sigmoid"}),
    ("attnres", {"key_norm": False}),
    ("attnres", {"heads": 4, "query": "input", "score": "sigmoid", "key_norm_learnable": False}),
    ("block_attnres", {"heads": 4, "block_size": 2}),
    ("block_attnres", {"key_norm": False, "block_size": 3}),
    ("block_attnres", {"query": "input", "block_size": 2}),
    ("block_attnres", {"query": "none", "score": "sigmoid", "block_size": 4}),
]

# Kinds that own no parameters (tests/residual/test_contract.py checks that every other kind does).
PARAMETER_FREE_KINDS = {"prenorm", "scaled", "ladder"}

# (kind, residual options): every registered kind with its defaults, then EXTRA_CASES.
KIND_CASES: list[tuple[str, dict]] = [(kind, {}) for kind in available_kinds()] + EXTRA_CASES


def case_id(case: tuple[str, dict]) -> str:
    kind, opts = case
    return kind + "".join(f"-{k}={v}" for k, v in opts.items())


def tiny_cfg(kind: str = "prenorm", n_layers: int = 3, **residual) -> ModelConfig:
    return ModelConfig(
        vocab_size=61, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=32,
        residual=ResidualConfig(kind=kind, **residual),
    )


def randomize_residual(model: LM, scale: float = 0.5) -> None:
    """Random non-zero residual parameters, so tests do not pass merely because of the init."""
    with torch.no_grad():
        for name, p in model.residual.named_parameters():
            p.add_(torch.randn_like(p) * scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference_logits(model: LM, idx: torch.Tensor):
    """A float64 copy of the model, its logits through the kind's registered reference, and the weights."""
    m = copy.deepcopy(model).double()
    params = dict(m.residual.named_parameters())
    reference = get_kind(m.cfg.residual.kind).reference
    h, weights = reference(m.embed(idx), list(m.sublayers), params, m.cfg.residual)
    return m, m.head(m.final_norm(h)), weights


def grads(model: LM, logits: torch.Tensor, R: torch.Tensor) -> dict:
    """Gradients of sum(logits * R) for every parameter, by name (None where unused)."""
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad((logits * R).sum(), list(model.parameters()), allow_unused=True)))


def assert_matches_reference(model: LM, idx: torch.Tensor, tol: float) -> tuple[list, list]:
    """Logits and every parameter's gradient of ``model`` against the float64 reference of its
    kind, relative error below ``tol``; returns (model's mixing weights, reference's)."""
    logits, _, mixing = model(idx, return_mixing=True)
    ref_model, ref_logits, ref_weights = reference_logits(model, idx)
    assert rel_err(logits, ref_logits) < tol
    R = torch.randn_like(ref_logits)
    g, g_ref = grads(model, logits, R.to(logits.dtype)), grads(ref_model, ref_logits, R)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g[name] is not None and g_ref[name] is not None, name
        assert rel_err(g[name], g_ref[name]) < tol, name
    return mixing, ref_weights


def residual_params(kind: str, n_layers: int, **opts) -> int:
    """Number of residual parameters of a tiny model (d_model 32) of ``kind``."""
    return LM(tiny_cfg(kind, n_layers=n_layers, **opts)).num_params(residual_only=True)


def embedding_only_logits(model: LM, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the model with every sublayer skipped: head(final_norm(emb))."""
    return model.head(model.final_norm(model.embed(idx)))


def prenorm_twin(model: LM) -> LM:
    """A PreNorm LM with the same non-residual weights as ``model``."""
    base = LM(model.cfg.replace(residual=ResidualConfig(kind="prenorm"))).to(next(model.parameters()).dtype)
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("residual.") for k in unexpected)
    return base
