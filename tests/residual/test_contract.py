"""The contract over every residual kind (tests/helpers.py: KIND_CASES, built from the registry):
each against its float64 reference (forward, mixing weights, every gradient), identity at init
where the kind claims it, causality, every residual parameter matters, the same non-residual
parameters for every kind, and what each stream declares about itself."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from helpers import (EXTRA_CASES, KIND_CASES, PARAMETER_FREE_KINDS, assert_matches_reference, case_id,
                     randomize_residual, rel_err, tiny_cfg)
from resstream import LM
from resstream.residual import available_kinds, get_kind

IDS = [case_id(c) for c in KIND_CASES]


def identity_cases():
    cases = [c for c in KIND_CASES if c[0] != "prenorm" and get_kind(c[0]).stream.identity_at_init]
    return cases, [case_id(c) for c in cases]


# float32: whole-model gradients carry float32 rounding of every matmul, which depends on the
# BLAS kernels the CPU gets (up to 1.2e-5 measured on an AVX2 machine, under 1e-5 with AVX-512);
# float64 is the tight check of the formulas.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 3e-5)])
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


def test_non_residual_parameters_identical_across_kinds():
    shapes = {}
    for kind, opts in KIND_CASES:
        sd = LM(tiny_cfg(kind, **opts)).state_dict()
        shapes[kind] = {k: v.shape for k, v in sd.items() if not k.startswith("residual.")}
    first = next(iter(shapes.values()))
    assert all(s == first for s in shapes.values())


# ----------------------------------------------------------------------------- the registry


def test_every_kind_is_covered_and_extra_rows_differ_from_the_defaults():
    assert {k for k, _ in KIND_CASES} == set(available_kinds())
    for kind, opts in EXTRA_CASES:
        defaults = get_kind(kind).option_defaults()
        assert opts and set(opts) <= set(defaults), (kind, opts)
        assert any(defaults[k] != v for k, v in opts.items()), (kind, opts)  # else it repeats the default row
    assert PARAMETER_FREE_KINDS <= set(available_kinds())


@pytest.mark.parametrize("kind", available_kinds())
def test_each_kind_describes_itself(kind):
    k = get_kind(kind)
    s = k.stream
    assert s.kind == kind and k.summary and callable(k.reference)
    d = k.describe()
    assert set(d) == {"identity_at_init", "mixes_depth", "weights_sum_to_one", "supports_recompute",
                      "mixes_positions", "source_legend"}
    assert d["supports_recompute"] == ("recompute" in {f.name for f in dataclasses.fields(k.options)})
    assert d["mixes_positions"] is False  # no current kind reads other positions (tests/test_generate.py)
    model = LM(tiny_cfg(kind))
    if s.mixes_depth:  # the legend explains every source name the stream uses
        names = {n for l in range(model.cfg.n_sublayers + 1) for n in model.residual.source_names(l)}
        patterns = [p.replace("{i}", r"\d+").replace("{j}", r"\d+") for p in s.source_legend]
        assert all(any(re.fullmatch(p, n) for p in patterns) for n in names), (names, s.source_legend)
    else:
        assert all(model.residual.source_names(l) == [] for l in range(model.cfg.n_sublayers + 1))
