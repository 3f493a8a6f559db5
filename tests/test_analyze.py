"""Depth analysis (Csordás et al. 2025 probes through the residual contract): every kind,
exact zeros for a sublayer that outputs nothing, agreement with independent computations."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KIND_CASES, case_id, randomize_residual, tiny_cfg
from resstream import LM
from resstream.diagnostics import measure_depth
from resstream.diagnostics.analyze import analyze_depth
from resstream.diagnostics.analyze_report import depth_findings, write_analysis

TOKEN_BYTES = np.arange(61) % 4 + 1  # any positive byte lengths


def batches(n: int = 1, B: int = 2, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 61, (B, T), generator=g), torch.randint(0, 61, (B, T), generator=g)) for _ in range(n)]


def _model(kind: str, **opts) -> LM:
    torch.manual_seed(0)
    model = LM(tiny_cfg(kind, **opts))
    randomize_residual(model)
    return model.eval()


def _bpb(logits, targets) -> float:
    nats = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="sum").item()
    return nats / math.log(2) / TOKEN_BYTES[targets.numpy()].sum()


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_analyze_any_kind(case):
    kind, opts = case
    model = _model(kind, **opts)
    L = model.cfg.n_sublayers
    a = analyze_depth(model, batches(), TOKEN_BYTES)
    json.dumps(a, allow_nan=False)
    assert a["n_sublayers"] == L and a["n_tokens"] == 24 and a["kind"] == kind
    assert len(a["sublayer"]["rel_contribution"]) == L and len(a["layer"]["cos"]) == L // 2
    assert len(a["lens"]["bpb"]) == L // 2 + 1 and len(a["skip"]["kl"]) == L
    eff = a["skip"]["effect_mean"]
    assert all(eff[s][l] is None for s in range(L) for l in range(s + 1))
    assert all(eff[s][l] >= 0 for s in range(L) for l in range(s + 1, L))
    assert all(k >= -1e-6 for k in a["skip"]["kl"] + a["lens"]["kl"])
    idx, targets = batches()[0]
    with torch.no_grad():
        assert a["bpb"] == pytest.approx(_bpb(model(idx), targets), rel=1e-5)
    assert a["lens"]["bpb"][-1] == pytest.approx(a["bpb"], rel=1e-12)
    assert a["lens"]["kl"][-1] == pytest.approx(0, abs=1e-6) and a["lens"]["top1"][-1] == 1.0


def _zero_output(model: LM, s: int) -> None:
    with torch.no_grad():
        proj = model.sublayers[s].wo if s % 2 == 0 else model.sublayers[s].w_down
        proj.weight.zero_()


@pytest.mark.parametrize("kind, opts", [("prenorm", {}), ("attnres", {}), ("block_attnres", {"block_size": 2}),
                                        ("hc", {"n_streams": 2}), ("denseformer", {})])
@pytest.mark.parametrize("s", [0, 3])
def test_skipping_a_silent_sublayer_changes_nothing_exactly(kind, opts, s):
    model = _model(kind, **opts)
    _zero_output(model, s)
    a = analyze_depth(model, batches(), TOKEN_BYTES)
    L = model.cfg.n_sublayers
    assert all(a["skip"]["effect_mean"][s][l] == 0.0 and a["skip"]["effect_max"][s][l] == 0.0 for l in range(s + 1, L))
    assert a["skip"]["kl"][s] == 0.0 and a["skip"]["top1"][s] == 1.0 and a["skip"]["bpb"][s] == a["bpb"]
    assert a["sublayer"]["rel_contribution"][s] == 0.0
    other = 1 if s == 0 else 0  # a sublayer that does output something has an effect
    assert a["skip"]["kl"][other] > 0 and max(v for v in a["skip"]["effect_mean"][other] if v is not None) > 0


def test_prenorm_probes_match_independent_computations():
    """Skip = the model with that sublayer's output projection zeroed, run normally; relative
    contribution = measure_depth's (forward hooks); lens at 0 = head(norm(embedding)). In
    float64, so that the small KLs of a randomly initialised model are exact enough to compare."""
    model = _model("prenorm").double()
    bs = batches(2)
    a = analyze_depth(model, bs, TOKEN_BYTES)
    d = measure_depth(model, bs)
    np.testing.assert_allclose(a["sublayer"]["rel_contribution"], d["rel_contribution"], rtol=1e-5)
    np.testing.assert_allclose(a["sublayer"]["cos"], d["cos_in_out"], rtol=1e-4, atol=1e-6)
    for s in (0, 3, 5):
        skipped = copy.deepcopy(model)
        _zero_output(skipped, s)
        kl = top1 = n = 0
        with torch.no_grad():
            for idx, _ in bs:
                p, q = F.log_softmax(model(idx).double(), -1), F.log_softmax(skipped(idx).double(), -1)
                kl += (p.exp() * (p - q)).sum().item()
                top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
                n += idx.numel()
        assert a["skip"]["kl"][s] == pytest.approx(kl / n, rel=1e-9)
        assert a["skip"]["top1"][s] == top1 / n
    with torch.no_grad():
        lens0 = sum(_bpb(model.head(model.final_norm(model.embed(i))), t) * TOKEN_BYTES[t.numpy()].sum() for i, t in bs)
    assert a["lens"]["bpb"][0] == pytest.approx(lens0 / sum(TOKEN_BYTES[t.numpy()].sum() for _, t in bs), rel=1e-5)


def test_write_analysis(tmp_path):
    model = _model("block_attnres", block_size=2)
    a = analyze_depth(model, batches(), TOKEN_BYTES)
    meta = {"name": "tiny", "source": "test", "path": "-", "model": model.cfg.to_dict(), "params": model.num_params(),
            "corpus": "random", "batch_size": 2, "seq_len": 12}
    out = write_analysis(a, meta, tmp_path / "an")
    for name in ("depth.json", "report.md", "report.html", "contributions.png", "skip_effects.png",
                 "skip_output.png", "logit_lens.png"):
        assert (tmp_path / "an" / name).is_file(), name
    saved = json.loads((tmp_path / "an" / "depth.json").read_text())
    assert saved["findings"] == json.loads(json.dumps(depth_findings(a)))
    md = (tmp_path / "an" / "report.md").read_text()
    assert f"{out['findings']['rel_first']:.3f}" in md and "![logit_lens](logit_lens.png)" in md
