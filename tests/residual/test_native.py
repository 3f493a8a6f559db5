"""The native CPU kernels of the depth mixing (residual/native.py, native_kernels.c): each kernel
against its eager twin, whole models on the eager fallback against the float64 reference (the
suite runs the native path by default, see conftest.py), the build cache and the fallbacks."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_matches_reference, randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.residual import compiled, native, native_build
from resstream.residual.attnres import fused
from resstream.residual.hyper import native_streams, sinkhorn

pytestmark = pytest.mark.skipif(native.library()[0] is None, reason=f"native kernels unavailable: {native.library()[2]}")

B, T, D = 2, 9, 32


def _both(fn):
    """fn() on the native path, then on the eager path."""
    mode = compiled.get_mode()
    try:
        compiled.set_mode("on")
        a = fn()
        compiled.set_mode("off")
        return a, fn()
    finally:
        compiled.set_mode(mode)


def _close(a, b, tol=1e-5):
    if isinstance(a, (list, tuple)):
        return all(_close(x, y, tol) for x, y in zip(a, b))
    return a.shape == b.shape and rel_err(a, b) < tol


@pytest.mark.parametrize("n", [1, 3, 11])
def test_mixtures_and_dots_match_eager(n):
    vs = [torch.randn(B, T, D) for _ in range(n)]
    a, acc = torch.softmax(torch.randn(B, T, n), -1), torch.randn(B, T, D)
    assert _close(*_both(lambda: fused.mix(a, vs)))
    assert _close(*_both(lambda: fused.mix(a, vs, acc)))
    cols = [a[..., j : j + 1] for j in range(n)]  # strided column views, as the gradient sums hold them
    assert _close(*_both(lambda: fused.mix_columns(cols, vs, acc)))
    A = torch.softmax(torch.randn(B, T, 4, n), -1)
    assert _close(*_both(lambda: fused.mix_many(A, vs)))
    # weight tables from strides (native.mix_rows): rows and columns swapped, every other token,
    # and token dims that are not evenly strided (copied)
    for W in (torch.softmax(torch.randn(B, T, n, 4), -2).transpose(-1, -2),
              torch.softmax(torch.randn(B, 2 * T, 4, n), -1)[:, ::2],
              torch.softmax(torch.randn(B, T + 1, 4, n), -1)[:, :T]):
        assert _close(*_both(lambda: fused.mix_many(W, vs)))
    gs = [torch.randn(B, T, D) for _ in range(3)]
    assert _close(*_both(lambda: fused.dots(gs[0], vs)))
    assert _close(*_both(lambda: fused.dots_many(gs, vs)))


def test_normed_logits_match_float64():
    """The lean decoder's write (rs_normed_logits): (q_k . v_t) / RMS(v_t) into a strided table,
    nothing written outside it."""
    lib = native.library()[0]
    N, D, R, zrs = 13, 37, 5, 20
    v, q = torch.randn(N, D) * 3, torch.randn(R, D)
    z = torch.full((R, zrs), float("nan"))
    lib.rs_normed_logits(N, D, R, v.data_ptr(), q.data_ptr(), 1e-6, z.data_ptr(), zrs, 1)
    ref = (q.double() @ v.double().t()) * torch.rsqrt(v.double().pow(2).mean(-1) + 1e-6)
    assert rel_err(z[:, :N], ref) < 1e-6
    assert z[:, N:].isnan().all()


@pytest.mark.parametrize("n", [1, 2, 4, 5, 9])
def test_softmax_read_matches_float64(n):
    """Full's read (rs_softmax_mix: its own vectorised exp, sources four at a time) against the
    softmax and mixture in float64, with logits from -200 to 60 (underflow, one dominating)."""
    N, D = 70, 37  # not a whole number of tiles or vectors
    vs = [torch.randn(N, D) for _ in range(n)]
    z = [torch.randn(N) * 40 - 20 for _ in range(n)]
    z[0][:5] = torch.tensor([-200.0, 60.0, 0.0, -87.5, 88.0])
    x, alpha = native.softmax_mix(native.library()[0], z, vs)
    a64 = torch.softmax(torch.stack(z, -1).double(), -1)
    x64 = sum(a64[:, j : j + 1] * vs[j].double() for j in range(n))
    assert alpha.shape == (N, n) and (alpha.double() - a64).abs().max() < 1e-6
    assert rel_err(x.double(), x64) < 1e-6


@pytest.mark.parametrize("M", [1, 3, 4, 6])
def test_source_backward_matches_its_formula(M):
    """rs_source_backward (readers four at a time) against its formula in float64."""
    N, D = 50, 21
    lib = native.library()[0]
    v, r, Q, direct = torch.randn(N, D), torch.rand(N) + 0.5, torch.randn(M + 2, D), torch.randn(N, D)
    c = torch.randn(M + 1, N)  # v's logit columns (rows 1.. read here), as keyed_source lays them out
    z = [c[m + 1] for m in range(M)]
    alpha = torch.rand(3, N).movedim(0, -1)  # weights as softmax_mix returns them; column 1 is v's
    readers = [((alpha, 1), torch.randn(N, D), torch.randn(N), m + 1) for m in range(M)]
    for d in (direct, None):
        gv, dz = native.source_backward(lib, v, r, (c, list(range(1, M + 1))), readers, Q, d)
        f = lambda t: t.double()  # noqa: E731
        dz64 = torch.stack([f(a[..., k]) * ((f(g) * f(v)).sum(-1) - f(gx)) for (a, k), g, gx, _ in readers])
        gv64 = (f(d) if d is not None else 0) + sum(f(a[..., k])[:, None] * f(g) for (a, k), g, _, _ in readers)
        gv64 = gv64 + f(r)[:, None] * (dz64.t() @ f(Q[1 : M + 1]))
        gv64 = gv64 - (f(r) ** 2 * (dz64 * torch.stack([f(c) for c in z])).sum(0) / D)[:, None] * f(v)
        assert dz.shape == (M, N) and rel_err(dz.double(), dz64) < 1e-5 and rel_err(gv.double(), gv64) < 1e-5


def test_odd_layouts_are_read_right():
    """A stride-0 gradient (sum().backward()), a transposed tensor, weights with a token stride."""
    v = torch.randn(B, T, D)
    wide = torch.rand(B, T, 7)
    odd = [torch.ones(1).expand(B, T, D), torch.randn(D, T, B).permute(2, 1, 0), v]
    assert _close(*_both(lambda: fused.mix_columns([wide[..., 1:2], wide[..., 4:5], wide[..., 6:7]], odd)))
    assert _close(*_both(lambda: fused.dots(odd[1], odd)))


def test_merge_matches_eager():
    o, p, gx = torch.randn(B, T, D), torch.randn(B, T, D), torch.randn(B, T, D)
    q, lse = torch.randn(D), torch.randn(B, T, 4)[..., 1]  # lse: a strided slice, as phase 2 passes it
    c, e = _both(lambda: fused.merge_forward(o, p, q, lse, 1e-6))
    assert _close(c, e, 1e-6)
    x, r, s, gate = e
    assert _close(*_both(lambda: fused.merge_backward(gx, p, x, q, r, s, gate)))


def test_sinkhorn_matches_eager_forward_and_backward():
    z = torch.randn(B, T, 4, 4, requires_grad=True)
    g = torch.randn(B, T, 4, 4)

    def run():
        out = sinkhorn.sinkhorn(z, 20)
        return out.detach(), torch.autograd.grad(out, z, g)[0]

    (o1, g1), (o2, g2) = _both(run)
    assert _close(o1, o2, 1e-6) and _close(g1, g2, 1e-5)


CASES = [("attnres", {}), ("attnres", {"recompute": True}), ("block_attnres", {"block_size": 3}),
         ("depth_swa", {"window": 3}), ("mhc", {}), ("mhc", {"dynamic": False}), ("hc", {})]


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_model_matches_reference_on_both_paths(mode, kind, opts):
    """Every kind with a native path, on it and on the eager fallback: logits and every gradient."""
    model = LM(tiny_cfg(kind, n_layers=4, **opts))
    randomize_residual(model)
    previous = compiled.get_mode()
    compiled.set_mode(mode)
    try:
        assert_matches_reference(model, torch.randint(0, 61, (B, T)), 2e-5)
    finally:
        compiled.set_mode(previous)


def test_thread_count_changes_no_mixture():
    """Per-token kernels split tokens between threads: every mixture is bitwise the same (1,200
    tokens of 64: four whole tiles of 256 tokens and a part of one)."""
    vs = [torch.randn(4, 300, 64) for _ in range(5)]
    a = torch.softmax(torch.randn(4, 300, 5), -1)
    n = torch.get_num_threads()
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(native.mix(native.library()[0], [[a[..., j] for j in range(5)]], vs)[0])
    torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    x64 = sum(a[..., j : j + 1].double() * vs[j].double() for j in range(5))
    assert rel_err(outs[0].double(), x64) < 1e-6


def test_build_is_cached(tmp_path, monkeypatch):
    cc = native_build.compiler()
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path))
    first = native_build._build(cc)
    assert first.parent == tmp_path / "kernels" and first.exists()
    calls = []
    real = native_build.subprocess.run
    monkeypatch.setattr(native_build.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    assert native_build._build(cc) == first
    assert all("--version" in cmd for cmd in calls)  # asked the compiler's version, built nothing
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


def test_no_compiler_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(native_build, "_lib", {})
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    monkeypatch.setitem(compiled._state, "said", set())
    monkeypatch.setitem(compiled._state, "mode", "auto")
    v = torch.randn(B, T, D)
    assert compiled.native_kernels(v) is None and compiled.native_kernels(v) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs eager" in err[0] and "no C compiler" in err[0]
    model = LM(tiny_cfg("block_attnres", n_layers=2, block_size=2))
    _, loss = model(torch.randint(0, 61, (B, T)), torch.randint(0, 61, (B, T)))
    loss.backward()  # trains on the eager path
    monkeypatch.setitem(compiled._state, "mode", "on")
    with pytest.raises(RuntimeError, match="no C compiler"):
        compiled.native_kernels(v)


def test_damaged_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "_lib", {})
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path))
    path = native_build._build(native_build.compiler())
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    lib, _, why = native.library()
    assert lib is not None and why == ""
    assert native.library()[0] is lib


def test_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "_lib", {})
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    lib, _, why = native.library()
    assert lib is None and "failed" in why and "\n" not in why
    assert not [p for p in (tmp_path / "kernels").iterdir()]  # no half-written library left


def test_stream_kernels_match_eager_directly():
    lib = native.library()[0]
    H, y, G = torch.randn(B, T, 4, D), torch.randn(B, T, D), torch.randn(B, T, 4, D)
    res, post, c0 = torch.rand(B, T, 4, 4), torch.rand(B, T, 4), torch.rand(4)
    want = torch.einsum("btij,btjd->btid", res, H) + post[..., None] * y[..., None, :]
    assert rel_err(native_streams.streams_write(lib, res, post, H, y), want) < 1e-6
    assert rel_err(native_streams.streams_read(lib, c0, H), torch.einsum("j,btjd->btd", c0, H)) < 1e-6
    gres, gpost, gH, gy = native_streams.streams_write_backward(lib, res, post, H, y, G)
    assert rel_err(gres, torch.einsum("btid,btjd->btij", G, H)) < 1e-5
    assert rel_err(gpost, (G * y[..., None, :]).sum(-1)) < 1e-5
    assert rel_err(gH, torch.einsum("btij,btid->btjd", res, G)) < 1e-5
    assert rel_err(gy, (post[..., None] * G).sum(-2)) < 1e-5
