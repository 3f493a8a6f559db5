"""The compiled depth mixing (residual/compiled.py, attnres/fused.py): each fused kernel against
its eager twin, whole models on the compiled path against the float64 reference (forward and
every gradient), recompute still bitwise, mixed dtypes under autocast, and the fallbacks.

Compiling costs seconds per kernel, so every test here shares one token shape and dtype
(float32, [2, 9, 32]): the graphs compiled by the first test serve the others."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_matches_reference, randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.residual import compiled
from resstream.residual.attnres import fused

B, T, D = 2, 9, 32


@pytest.fixture
def compiled_mixing():
    mode = compiled.get_mode()
    compiled.set_mode("inductor")
    yield
    compiled.set_mode(mode)


def _rand(*shape):
    return torch.randn(*shape)


def _both(fn):
    """fn() on the compiled path, then on the eager path."""
    compiled.set_mode("inductor")
    a = fn()
    compiled.set_mode("off")
    b = fn()
    compiled.set_mode("inductor")
    return a, b


@pytest.mark.parametrize("n", [1, 3, 11])  # one source, a short chunk, a full chunk and a short one
def test_fused_mix_and_dots_match_eager(compiled_mixing, n):
    vs = [_rand(B, T, D) for _ in range(n)]
    a, g, acc = torch.softmax(_rand(B, T, n), -1), _rand(B, T, D), _rand(B, T, D)
    for args in [(a, vs), (a, vs, acc)]:
        c, e = _both(lambda: fused.mix(*args))
        assert c.dtype == e.dtype == torch.float32 and rel_err(c, e) < 1e-6
    c, e = _both(lambda: fused.dots(g, vs))
    assert c.shape == (B, T, n) and rel_err(c, e) < 1e-6


def test_fused_merge_matches_eager(compiled_mixing):
    o, p, gx = _rand(B, T, D), _rand(B, T, D), _rand(B, T, D)
    q, lse = _rand(D), _rand(B, T)
    c, e = _both(lambda: fused.merge_forward(o, p, q, lse, 1e-6))
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(c, e))
    x, r, s, gate = e
    c, e = _both(lambda: fused.merge_backward(gx, p, x, q, r, s, gate))
    assert all(rel_err(u, v) < 1e-5 for u, v in zip(c, e))


CASES = [("attnres", {}), ("block_attnres", {"block_size": 3}), ("block_attnres", {"block_size": 3, "recompute": True}),
         ("depth_swa", {"window": 3})]


@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_compiled_model_matches_reference(compiled_mixing, kind, opts):
    model = LM(tiny_cfg(kind, n_layers=4, **opts))
    randomize_residual(model)
    before = compiled.compile_seconds()
    assert_matches_reference(model, torch.randint(0, 61, (B, T)), 2e-5)
    assert compiled.compile_seconds() >= before  # counted, never negative


def test_compiled_recompute_is_bitwise(compiled_mixing):
    base = LM(tiny_cfg("block_attnres", n_layers=4, block_size=3))
    randomize_residual(base)
    re = LM(tiny_cfg("block_attnres", n_layers=4, block_size=3, recompute=True))
    re.load_state_dict(base.state_dict())
    idx = torch.randint(0, 61, (B, T))
    out = []
    for m in (base, re):
        _, loss = m(idx, idx)
        out.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


@pytest.mark.parametrize("kind,opts", CASES[:2], ids=[f"{k}-{o}" for k, o in CASES[:2]])
def test_mixed_dtypes_under_autocast(compiled_mixing, kind, opts):
    """bf16 sublayer outputs next to the fp32 embedding: both paths run, agree to bf16
    precision, and every gradient is finite."""
    model = LM(tiny_cfg(kind, n_layers=3, **opts))
    randomize_residual(model, 0.1)
    idx = torch.randint(0, 61, (B, T))
    with torch.no_grad():
        ref = model(idx).float()
    outs = []
    for mode in ("inductor", "off"):
        compiled.set_mode(mode)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        outs.append(logits.float())
    assert rel_err(outs[0], ref) < 0.05 and rel_err(outs[1], ref) < 0.05


def test_failed_compile_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no toolchain\nsecond line")
        return run

    kernel = compiled.Kernel(lambda x: x * 2)
    monkeypatch.setattr(compiled.torch, "compile", broken)
    monkeypatch.setitem(compiled._state, "mode", "auto")
    monkeypatch.setitem(compiled._state, "said", set())
    monkeypatch.setattr(compiled, "_eligible", lambda args: torch.device("cuda"))  # auto compiles on CUDA only
    monkeypatch.setattr(compiled, "compiler_available", lambda device: (True, ""))
    x = torch.ones(3)
    assert torch.equal(kernel(x), x * 2) and torch.equal(kernel(x), x * 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "running eager" in err[0] and "no toolchain" in err[0]
    assert not kernel.active(torch.device("cuda"))  # eager from then on


def test_missing_compiler(monkeypatch, capsys):
    monkeypatch.setattr(compiled, "compiler_available", lambda device: (False, "no C++ compiler found"))
    monkeypatch.setitem(compiled._state, "said", set())
    kernel = compiled.Kernel(lambda x: x + 1)
    monkeypatch.setitem(compiled._state, "mode", "auto")
    assert not kernel.active(torch.device("cpu"))  # auto: no inductor on CPU (native kernels there), nothing to say
    assert not kernel.active(torch.device("cuda"))
    assert capsys.readouterr().err.count("no C++ compiler found") == 1
    monkeypatch.setitem(compiled._state, "mode", "inductor")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        kernel.active(torch.device("cpu"))
    with pytest.raises(ValueError, match="compile mode"):
        compiled.set_mode("sometimes")
