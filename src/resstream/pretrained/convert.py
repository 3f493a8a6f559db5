"""Upcycling: the same sublayers, embedding, norms and head, joined by another residual kind.

A kind that starts as PreNorm (``identity_at_init``: zero-query AttnRes, Block AttnRes,
hyper-connections at their init, ...) computes the PreNorm model's function right after the
swap, up to the sublayer norms' epsilon: uniform AttnRes weights hand sublayer l the mean
h_l / n_l of its n_l sources instead of the sum h_l, and RMSNorm(h / n) with epsilon eps
equals RMSNorm(h) with epsilon eps * n^2. That difference is the whole conversion error
(measured by ``resstream convert``); it vanishes as eps -> 0.
"""
from __future__ import annotations

import copy

import torch

from resstream.config import ConfigError
from resstream.residual.config import ResidualConfig
from resstream.model import LM


def upcycle(model: LM, residual: ResidualConfig, require_identity: bool = True) -> LM:
    """A new LM (eval mode, ``model``'s dtype and device) with ``model``'s non-residual weights
    and a freshly initialised stream of ``residual``'s kind.

    ``require_identity``: refuse kinds whose init does not reproduce PreNorm (the result
    would not compute the pretrained function). The source must be a standard-residual
    model, or already of exactly this residual config (then its residual weights are kept).
    """
    same = model.cfg.residual == residual
    if not same and not model.residual.standard_residual:
        raise ConfigError(f"the model already has a '{model.cfg.residual.kind}' residual; upcycle from the PreNorm original instead")
    cfg = model.cfg.replace(residual=residual)
    p = next(model.parameters())
    new = LM(cfg)
    if require_identity and not new.residual.identity_at_init:
        raise ConfigError(f"residual kind '{residual.kind}' does not start as PreNorm, so the converted model would compute "
                          "something else; choose a kind whose stream starts as the identity (see `resstream kinds`)")
    state = model.state_dict() if same else {k: v for k, v in model.state_dict().items() if not k.startswith("residual.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("residual.") and not (k == "head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:  # pragma: no cover - names are the same for every kind by design
        raise RuntimeError(f"upcycle: parameters do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return new.to(device=p.device, dtype=p.dtype).eval()


def eps_equivalent(base: LM, upcycled: LM) -> LM:
    """The PreNorm model that ``upcycled`` (fresh from ``upcycle(base, ...)``, zero queries)
    computes exactly: a copy of ``base`` whose sublayer l norm uses eps * n_l^2 and whose
    final norm eps * n_L^2, n the number of sources each uniform mixture averages. Comparing
    against it isolates the norm epsilon as the whole conversion error."""
    adj = copy.deepcopy(base)
    eps, L = base.cfg.norm_eps, base.cfg.n_sublayers
    for l, sub in enumerate(adj.sublayers):
        sub.norm.eps = eps * len(upcycled.residual.source_names(l)) ** 2
    adj.final_norm.eps = eps * len(upcycled.residual.source_names(L)) ** 2
    return adj


@torch.no_grad()
def copy_weights_into(target: LM, source: LM) -> list[str]:
    """Load ``source``'s non-residual weights (and its residual ones when both have the same
    residual config) into ``target`` in place; returns the names of the residual parameters
    left at ``target``'s own init. The shapes must agree (max_seq_len may differ: it only
    sizes the rotary tables)."""
    if target.cfg.replace(residual=source.cfg.residual, max_seq_len=source.cfg.max_seq_len) != source.cfg:
        raise ConfigError("--init-from: the model's shape differs from the run's; the shape comes from the model")
    same = target.cfg.residual == source.cfg.residual
    if not same and not source.residual.standard_residual:
        raise ConfigError(f"--init-from: the model has a '{source.cfg.residual.kind}' residual, the run asks for "
                          f"'{target.cfg.residual.kind}'; start from the PreNorm original or keep its residual")
    state = {k: v for k, v in source.state_dict().items() if same or not k.startswith("residual.")}
    target.load_state_dict(state, strict=False)
    return [] if same else [k for k, _ in target.residual.named_parameters()]
