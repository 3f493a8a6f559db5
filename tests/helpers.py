"""Shared test helpers: tiny model configs and relative errors."""
from __future__ import annotations

import copy

import torch

from resstream import LM, ModelConfig, ResidualConfig


# (kind, residual options) pairs covered by the generic property tests (tests/test_core.py,
# generation tests, ...). Each new residual kind adds its rows here.
KIND_CASES: list[tuple[str, dict]] = [
    ("prenorm", {}),
    ("attnres", {}),
    *[("block_attnres", {"block_size": s}) for s in (1, 2, 4, 5, 6, 9)],
    ("hc", {"n_streams": 2, "dynamic": False}),
    ("hc", {"n_streams": 4}),
    ("hc", {"n_streams": 1}),
    ("mhc", {"n_streams": 4}),
    ("mhc", {"n_streams": 3, "dynamic": False}),
    ("denseformer", {}),
    ("ddl", {}),
    ("ddl", {"ddl_beta_init": 1.9}),  # near the reflection regime
    # window 1 is checked in float64 only (tests/test_kinds_extra.py): its float32 gradients
    # of the first sublayer are ill-conditioned under random queries (1.8e-5 at worst)
    ("depth_swa", {"window": 2, "key_norm_learnable": False}),
    ("depth_swa", {"window": 3}),
    ("rezero", {}),
    ("scaled", {}),
]


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
    """A float64 copy of the model, its logits through the kind's reference, and the weights."""
    from resstream.residual.reference import REFERENCES

    m = copy.deepcopy(model).double()
    params = dict(m.residual.named_parameters())
    h, weights = REFERENCES[m.cfg.residual.kind](m.embed(idx), list(m.sublayers), params, m.cfg.residual)
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
