"""Depth diagnostics: measure_depth on every residual kind, checked against a hand-written
forward/backward, the PreNorm dilution it should see, and diagnose_run on a real run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import KIND_CASES, case_id, randomize_residual, tiny_cfg
from resstream import LM
from resstream.diagnostics.plots import _column_order, plot_mixing_heatmap
from resstream.diagnostics import mean_depth, measure_depth, mixing_array

PER_SUBLAYER = ("output_rms", "input_rms", "rel_contribution", "cos_in_out", "grad_norm", "grad_norm_output")




def make_batches(n: int, vocab: int = 61, B: int = 2, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)) for _ in range(n)]


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_measure_depth_any_kind(case):
    kind, opts = case
    model = LM(tiny_cfg(kind, **opts))
    randomize_residual(model)
    model.train()
    L = model.cfg.n_sublayers
    d = measure_depth(model, make_batches(2))
    for k in PER_SUBLAYER:
        assert len(d[k]) == L and all(math.isfinite(v) for v in d[k]), k
    assert all(v > 0 for v in d["output_rms"] + d["input_rms"])
    assert all(v >= 0 for v in d["grad_norm"] + d["grad_norm_output"])
    assert sum(d["grad_norm"]) > 0 and sum(d["grad_norm_output"]) > 0
    assert math.isfinite(d["final_input_rms"]) and math.isfinite(d["loss"])
    assert d["n_batches"] == 2 and d["n_tokens"] == 48 and d["kind"] == kind
    # mode restored, no hook left, no .grad written
    assert model.training and no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    json.dumps(d, allow_nan=False)
    if not model.residual.mixes_depth:
        assert d["mixing"] is None and d["source_names"] is None
        return
    m = mixing_array(d)
    assert m.shape == (L + 1, max(len(n) for n in d["source_names"]))
    for l in range(L + 1):
        n = len(model.residual.source_names(l))
        assert d["source_names"][l] == model.residual.source_names(l)
        assert np.isfinite(m[l, :n]).all() and np.isnan(m[l, n:]).all()
        if d["mixing_sums_to_one"]:
            assert np.nansum(m[l]) == pytest.approx(1.0, abs=1e-5)
            assert (m[l, :n] >= 0).all()


@pytest.mark.parametrize("kind,opts", [("prenorm", {}), ("attnres", {}), ("block_attnres", {"block_size": 2})])
def test_measure_depth_matches_hand_computation(kind, opts):
    model = LM(tiny_cfg(kind, **opts))
    randomize_residual(model)
    model.eval()
    batches = make_batches(2, seed=3)
    d = measure_depth(model, batches)
    assert not model.training
    L = model.cfg.n_sublayers
    want = {k: np.zeros(L) for k in ("output_rms", "input_rms", "grad_norm", "grad_norm_output", "cos_in_out")}
    want_mix = None
    for idx, targets in batches:
        # the forward pass written out by hand, through the stream contract
        stream = model.residual
        state = stream.init(model.embed(idx))
        xs, ys, ws = [], [], []
        for l, sub in enumerate(model.sublayers):
            x, w = stream.read_weighted(state, l)
            y = sub(x)
            y.retain_grad()
            xs.append(x), ys.append(y), ws.append(w)
            state = stream.write(state, l, y)
        h, w = stream.finish_weighted(state)
        ws.append(w)
        logits = model.head(model.final_norm(h))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        model.zero_grad(set_to_none=True)
        loss.backward()
        for l in range(L):
            want["output_rms"][l] += ys[l].pow(2).mean(-1).sqrt().mean().item() / len(batches)
            want["input_rms"][l] += xs[l].pow(2).mean(-1).sqrt().mean().item() / len(batches)
            want["grad_norm_output"][l] += ys[l].grad.norm().item() / len(batches)
            g2 = sum(p.grad.pow(2).sum().item() for p in model.sublayers[l].parameters())
            want["grad_norm"][l] += math.sqrt(g2) / len(batches)
            want["cos_in_out"][l] += torch.cosine_similarity(ys[l], xs[l], dim=-1).mean().item() / len(batches)
        if ws[0] is not None:
            means = [w.mean(dim=(0, 1)).detach().numpy() / len(batches) for w in ws]
            want_mix = means if want_mix is None else [a + b for a, b in zip(want_mix, means)]
    model.zero_grad(set_to_none=True)
    for k, v in want.items():
        np.testing.assert_allclose(d[k], v, rtol=1e-5, atol=1e-8, err_msg=k)
    if want_mix is None:
        assert d["mixing"] is None
    else:
        m = mixing_array(d)
        for l, row in enumerate(want_mix):
            np.testing.assert_allclose(m[l, : len(row)], row, rtol=1e-5, atol=1e-7)


def test_existing_grads_are_left_alone():
    model = LM(tiny_cfg("attnres"))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    measure_depth(model, make_batches(1))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert no_hooks(model)


def test_hooks_removed_even_when_measuring_fails():
    model = LM(tiny_cfg("prenorm"))
    bad = [(torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 5)))]  # targets of the wrong shape
    model.train()
    with pytest.raises(Exception):
        measure_depth(model, bad)
    assert no_hooks(model) and model.training
    with pytest.raises(ValueError, match="at least one"):
        measure_depth(model, [])


def test_prenorm_dilution_at_init():
    """What is robust on a random model: PreNorm's stream grows with depth, so each sublayer's
    relative contribution shrinks; AttnRes (zero queries: uniform mixing) reads the mean of its
    sources, whose RMS can never exceed the mean of the sources' RMS (triangle inequality)."""
    torch.manual_seed(0)
    ref = {k: v for k, v in LM(tiny_cfg("prenorm", n_layers=4)).state_dict().items()}
    models = {}
    for kind, opts in [("prenorm", {}), ("attnres", {}), ("block_attnres", {"block_size": 2})]:
        model = LM(tiny_cfg(kind, n_layers=4, **opts))  # residual parameters at their init
        # the same sublayer weights for every kind, and an embedding small against the
        # outputs, so the residual sum is dominated by what the sublayers write
        model.load_state_dict({**model.state_dict(), **ref})
        with torch.no_grad():
            model.embed.weight.mul_(0.05)
        models[kind] = model
    batches = make_batches(2, B=4, T=16, seed=1)
    d = {kind: measure_depth(model, batches) for kind, model in models.items()}
    pre, full, block = d["prenorm"], d["attnres"], d["block_attnres"]
    assert pre["input_rms"][-1] > 3 * pre["input_rms"][0]
    assert pre["final_input_rms"] > pre["input_rms"][-1]
    mlp = pre["rel_contribution"][1::2]
    assert mlp[-1] < 0.6 * mlp[0]
    for l in range(1, len(full["input_rms"])):
        bound = np.mean([full["input_rms"][0]] + full["output_rms"][:l])
        assert full["input_rms"][l] <= bound * (1 + 1e-5)
    assert full["final_input_rms"] < 0.5 * pre["final_input_rms"]
    assert block["final_input_rms"] < 0.5 * pre["final_input_rms"]


def test_mean_depth_averages_entrywise():
    model = LM(tiny_cfg("block_attnres", block_size=2))
    randomize_residual(model)
    a, b = measure_depth(model, make_batches(1, seed=1)), measure_depth(model, make_batches(1, seed=2))
    both = measure_depth(model, make_batches(1, seed=1) + make_batches(1, seed=2))
    m = mean_depth([a, b])
    for k in PER_SUBLAYER:
        np.testing.assert_allclose(m[k], both[k], rtol=1e-6)
    np.testing.assert_allclose(mixing_array(m), mixing_array(both), rtol=1e-6)
    assert m["n_batches"] == 2 and m["source_names"] == a["source_names"]


def test_heatmap_columns_and_signed_weights(tmp_path):
    block = [["emb"], ["emb", "partial"], ["emb", "B1"], ["emb", "B1", "partial"], ["emb", "B1", "B2"]]
    assert _column_order(block) == ["emb", "B1", "B2", "partial"]
    full = [["emb"] + [f"f{i}" for i in range(l)] for l in range(4)]
    assert _column_order(full) == ["emb", "f0", "f1", "f2"]
    # DenseFormer-style free coefficients, negative ones included, draw on a diverging scale
    p = plot_mixing_heatmap([[1.0, None], [0.7, -0.4], [1.2, 0.3]], [["emb"], ["emb", "f0"], ["emb", "f0"]],
                            tmp_path / "m.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_diagnose_run_on_a_trained_run(tmp_path, monkeypatch):
    from resstream.runs.config import RunConfig
    from resstream.diagnostics import diagnose_run, format_depth
    from resstream.train import train

    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig.from_dict({
        "name": "diag", "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
                                  "residual": {"kind": "block_attnres", "block_size": 2}},
        "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 60_000},
        "train": {"steps": 3, "batch_size": 4, "seq_len": 16, "eval_every": 3, "eval_batches": 1,
                  "save_every": 3, "log_every": 1},
    })
    res = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert res.status == "finished"
    out = diagnose_run(tmp_path / "run", batches=2)
    diag = tmp_path / "run" / "diagnostics"
    assert out["out_dir"] == str(diag)
    assert sorted(p.name for p in diag.iterdir()) == ["depth.json", "depth_rms.png", "grad_norm.png", "mixing.png"]
    rec = json.loads((diag / "depth.json").read_text())
    assert rec["depth"]["output_rms"] == out["depth"]["output_rms"] and len(rec["depth"]["output_rms"]) == 4
    assert rec["batches"] == 2 and rec["batch_size"] == 4 and rec["seq_len"] == 16
    assert rec["depth"]["source_names"][-1] == ["emb", "B1", "B2"]
    text = format_depth(out["depth"])
    assert len(text.splitlines()) == 2 + 4 + 1 and "3 mlp 1" in text
    # a chosen output folder
    out2 = diagnose_run(tmp_path / "run", out_dir=tmp_path / "elsewhere", batches=1)
    assert (tmp_path / "elsewhere" / "depth.json").is_file() and out2["depth"]["n_batches"] == 1


def test_heatmap_columns_follow_every_row_order():
    # depth_swa, window 2: sliding windows; the final row (f6, f7) must not jump ahead
    swa = [["emb"], ["emb", "f0"], ["emb", "f0", "f1"], ["emb", "f1", "f2"], ["emb", "f2", "f3"],
           ["emb", "f3", "f4"], ["emb", "f4", "f5"], ["emb", "f5", "f6"], ["emb", "f6", "f7"]]
    assert _column_order(swa) == ["emb"] + [f"f{i}" for i in range(8)]
    # DenseFormer: layer outputs interleaved with the attention output an MLP also reads
    dense = [["emb"], ["emb", "f0"], ["emb", "X1"], ["emb", "X1", "f2"], ["emb", "X1", "X2"]]
    assert _column_order(dense) == ["emb", "f0", "X1", "f2", "X2"]
    # Block AttnRes whose last block sum only the final row sees: partial still goes last
    block = [["emb"], ["emb", "partial"], ["emb", "B1"], ["emb", "B1", "partial"], ["emb", "B1", "B2"],
             ["emb", "B1", "B2", "partial"], ["emb", "B1", "B2", "B3"]]
    assert _column_order(block) == ["emb", "B1", "B2", "B3", "partial"]
