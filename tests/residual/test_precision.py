"""Mixed precision for every residual kind: CPU bfloat16 autocast, as ``train.dtype=bf16``
(and CUDA's default ``auto``) runs it.

Under autocast the embedding is float32 while sublayer outputs are bfloat16, so every stream
sees sources of mixed dtypes. The contract (residual/base.py, ``outside_autocast``): depth
mixing runs outside autocast, keeps its statistics in float32 and its state in the dtype
PreNorm's running sum h + y has, float32; so every sublayer input and the final norm's input
are float32, whatever the kind.

Tolerances against the same model in float32 (one forward and backward, 3 layers, d_model 32,
random residual parameters): bfloat16 keeps 8 significant bits (relative rounding 2^-8 = 3.9e-3)
and the sublayers' own matmuls round at that level, which gives PreNorm 2.8e-3 on the logits
and 3.6e-3 on the gradient. Across 4 seeds the worst kinds measured 2.2e-2 on the logits (ddl,
whose k = y / |y| keeps only the direction of a bfloat16 output) and 6.7e-2 on the gradient of
the residual parameters (ddl; Full AttnRes 3.4e-2): the bounds below are about twice those.
Accumulating a stream in bfloat16 (hc before this contract: 1.0e-1 on the logits, 6.2 on the
gradient) fails them, and the dtype check catches it exactly.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import KIND_CASES, case_id, randomize_residual, rel_err, tiny_cfg
from resstream import LM

LOGITS_TOL = 5e-2
GRAD_TOL = 1.5e-1
# Full AttnRes with the input-dependent query (a Table 4 ablation, residual/attnres/variants.py)
# multiplies a bfloat16 sublayer output into every later query: measured up to 0.25 on the
# gradient over 8 seeds (the logits within 2.4e-2), with all of its mixing in float32.
GRAD_TOL_CASE = {"attnres-query=input": 5e-1}
CASES = KIND_CASES + [("attnres", {"recompute": True}), ("block_attnres", {"recompute": True})]


def _run(model: LM, idx: torch.Tensor, autocast: bool):
    """Logits, every parameter's gradient, the dtypes of the sublayer and final-norm inputs."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
             for m in [*model.sublayers, model.final_norm]]
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, idx)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, seen


def _cat(grads: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in names])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_autocast_matches_float32(case):
    kind, opts = case
    model = LM(tiny_cfg(kind, **opts))
    randomize_residual(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    ref_logits, ref_grads, _ = _run(model, idx, autocast=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. RMSNorm's "Mismatch dtype between input and weight"
        logits, grads, dtypes = _run(model, idx, autocast=True)
    assert dtypes == {torch.float32}, f"{kind}: a sublayer or the final norm read {dtypes}"
    assert torch.isfinite(logits).all() and grads.keys() == ref_grads.keys()
    assert rel_err(logits, ref_logits) < LOGITS_TOL
    names = sorted(ref_grads)
    tol = GRAD_TOL_CASE.get(case_id(case), GRAD_TOL)
    assert rel_err(_cat(grads, names), _cat(ref_grads, names)) < tol
    residual = [n for n in names if n.startswith("residual.")]
    if residual:
        assert rel_err(_cat(grads, residual), _cat(ref_grads, residual)) < tol


@pytest.mark.parametrize("kind", sorted({k for k, _ in KIND_CASES}))
def test_every_kind_trains_under_bf16_autocast(kind):
    """A few AdamW steps on one batch under autocast: finite and the loss goes down."""
    torch.manual_seed(0)
    model = LM(tiny_cfg(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, model.cfg.vocab_size, (4, 16))
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
