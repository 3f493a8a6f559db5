"""Fused CPU kernels of the depth mixing: a small C file (native_kernels.c) built once per
machine with the system C compiler and called through ctypes.

Why: on a CPU the depth mixing is memory-bound, and eager PyTorch makes one pass over a
[B, T, D] tensor per operator (a mixture of k sources: 3k - 1 passes; a dot product: a
product tensor, then its sum). These kernels walk the tokens once, each token's rows in L1:
a mixture of n sources for S queries reads every source once and writes every output once;
the n x S dot products of a backward read every tensor once; Block's phase-2 merge is one
pass forward and one backward. Building takes about a second (no PyTorch headers: plain C,
OpenMP over tokens when the compiler has it), and the library is cached by content, compiler
and CPU under ``$RESSTREAM_CACHE/kernels`` (default ~/.cache/resstream), so later processes
only load it (native_build.py).

Used for float32 CPU tensors (any layout: the wrappers make the rare non-contiguous one
contiguous) when residual.compiled's mode allows (the default
"auto" does on CPU); everything else (other dtypes, GPUs, tensor subclasses, no compiler)
takes the other paths of attnres/fused.py. A build that fails says so in one line on stderr
and the mixing runs eager. The build time is counted in ``compiled.compile_seconds()``.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from resstream.residual.native_build import library  # noqa: F401  (native.library(): the loaded kernels)

_P = ctypes.c_void_p
_L = ctypes.c_long
SMALL = 1 << 15  # below this many floats touched, one thread (starting the team costs more)


def eligible(*tensors: Tensor) -> bool:
    """Whether these tensors can go to the kernels: plain float32 CPU tensors (the wrappers make
    the rare non-contiguous one contiguous), outside an outer torch.compile (which traces the
    eager formula instead)."""
    for t in tensors:
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:  # no subclasses (DTensors)
            return False
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    return not torch.compiler.is_compiling()


def threads(work: int) -> int:
    return 1 if work < SMALL else torch.get_num_threads()


def contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def addresses(addrs: list) -> ctypes.Array:
    """A C array of addresses (ints; None: NULL) for a kernel's pointer arguments. The caller
    keeps the memory they point into alive (the lean decoders make theirs once and keep them)."""
    return (_P * len(addrs))(*addrs)


def longs(values: list[int]) -> ctypes.Array:
    """A C array of longs (token strides)."""
    return (_L * len(values))(*values)


def _ptrs(ts) -> tuple[ctypes.Array, list]:
    """A C array of the tensors' data pointers (None: NULL), and the contiguous tensors it points
    into (keep them alive for the call)."""
    ts = [None if t is None else contiguous(t) for t in ts]
    return addresses([None if t is None else t.data_ptr() for t in ts]), ts


def _shape(v: Tensor) -> tuple[int, int]:
    return v.numel() // v.shape[-1], v.shape[-1]


def _token_step(shape, strides) -> int | None:
    """The one stride, in elements, from a token to the next over these (token) dims, or None when
    they are not evenly strided (1 when there is a single token)."""
    step = expected = None
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if step is None:
            step = stride
        elif stride != expected:
            return None
        expected = stride * size
    return 1 if step is None else step


def _column(w: Tensor) -> tuple[int, int, Tensor]:
    """A per-token weight column w ([..., 1] or [...] over the tokens' dims) as (address, token
    stride in elements, the tensor that holds it): token t's weight sits at address + 4 t stride."""
    w = w[..., 0] if w.dim() > 1 and w.shape[-1] == 1 else w.reshape(-1) if w.dim() == 0 else w
    step = _token_step(w.shape, w.stride())
    if step is None:  # token dims not evenly strided: copy (it is small)
        w, step = w.contiguous(), 1
    return w.data_ptr(), step, w


def _columns(ws) -> tuple[ctypes.Array, ctypes.Array, list]:
    """Per-token weight columns (see _column) as C arrays of addresses and token strides, and the
    tensors that hold them (keep them alive for the call)."""
    cols = [_column(w) for w in ws]
    return addresses([c[0] for c in cols]), longs([c[1] for c in cols]), cols


def mix(lib, weights: list[list[Tensor]], values, accs=None) -> list[Tensor]:
    """out_s = acc_s + sum_j weights[s][j] values[j] for every s: ``weights`` S lists of n per-token
    columns (any float32 views, see _column), values n tensors [..., D]; ``accs``: None or S
    tensors/None. Returns S new tensors."""
    wp, ws, wk = _columns([w for row in weights for w in row])
    return _mix(lib, len(weights), wp, ws, values, accs)


def mix_rows(lib, A: Tensor, values, accs=None) -> list[Tensor]:
    """mix() with the weights as one float32 tensor A [..., S, n] (row s: output s's weights): the
    columns' addresses come from A's strides, no view per column."""
    S, n = A.shape[-2], A.shape[-1]
    step = _token_step(A.shape[:-2], A.stride()[:-2])
    if step is None:
        A = A.contiguous()
        step = S * n
    base, ss, sj = A.data_ptr(), A.stride(-2), A.stride(-1)
    wp = addresses([base + 4 * (s * ss + j * sj) for s in range(S) for j in range(n)])
    return _mix(lib, S, wp, longs([step] * (S * n)), values, accs)


def _mix(lib, S: int, wp, ws, values, accs) -> list[Tensor]:
    N, D = _shape(values[0])
    n = len(values)
    outs = [torch.empty(values[0].shape, dtype=torch.float32) for _ in range(S)]
    (vp, vk), (op, _) = _ptrs(values), _ptrs(outs)
    acc, ak = (None, None) if accs is None else _ptrs(accs)
    lib.rs_mix(N, D, n, S, vp, wp, ws, acc, op, threads(N * D * (n + S)))
    return outs


def softmax_mix(lib, z: list[Tensor], values) -> tuple[Tensor, Tensor]:
    """(x, alpha): alpha = softmax over the logit columns z (n per-token columns), x = sum_j
    alpha[..., j] values[j], in one pass (x bitwise as mix() would make it from alpha). alpha is
    a view [..., n] of n contiguous columns (each reader's column of a source is contiguous)."""
    N, D = _shape(values[0])
    n = len(values)
    alpha = torch.empty(n, *values[0].shape[:-1], dtype=torch.float32)
    x = torch.empty(values[0].shape, dtype=torch.float32)
    (vp, vk), (zp, zk) = _ptrs(values), _ptrs(z)
    lib.rs_softmax_mix(N, D, n, vp, zp, alpha.data_ptr(), x.data_ptr(), threads(N * D * (n + 1)))
    return x, alpha.movedim(0, -1)


def phase1_backward(lib, A: Tensor, grads, blocks, accs):
    """Block's phase-1 backward in one pass: gA [..., S, n] (<g_s, b_j>) and every block's
    gradient acc_j + sum_s A[..., s, j] g_s (written into acc_j where given)."""
    N, D = _shape(blocks[0])
    A = contiguous(A.to(torch.float32))
    gA = torch.empty_like(A)
    gbs = [a if a is not None else torch.empty(blocks[0].shape, dtype=torch.float32) for a in accs]
    (bp, bk), (gp, gk), (ap, ak), (op, _) = _ptrs(blocks), _ptrs(grads), _ptrs(accs), _ptrs(gbs)
    lib.rs_phase1_backward(N, D, len(blocks), len(grads), bp, gp, A.data_ptr(), gA.data_ptr(), ap, op,
                           threads(N * D * (2 * len(blocks) + len(grads))))
    return gA, gbs


def dots(lib, grads, values) -> Tensor:
    """<grads[s], values[j]> per token: [..., S, n] float32."""
    N, D = _shape(values[0])
    out = torch.empty(*values[0].shape[:-1], len(grads), len(values), dtype=torch.float32)
    (vp, vk), (gp, gk) = _ptrs(values), _ptrs(grads)
    lib.rs_dots(N, D, len(values), len(grads), vp, gp, out.data_ptr(), threads(N * D * (len(values) + len(grads))))
    return out


def merge_forward(lib, o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float):
    N, D = _shape(p)
    o, p, q, lse = contiguous(o), contiguous(p), contiguous(q), contiguous(lse)
    x = torch.empty_like(o)
    r, s, gate = torch.empty(3, *p.shape[:-1], dtype=torch.float32)  # one allocation
    lib.rs_merge_forward(N, D, o.data_ptr(), p.data_ptr(), q.data_ptr(), lse.data_ptr(), eps, x.data_ptr(),
                         r.data_ptr(), s.data_ptr(), gate.data_ptr(), threads(3 * N * D))
    return x, r, s, gate


def merge_backward(lib, gx: Tensor, p: Tensor, x: Tensor, q: Tensor, r: Tensor, s: Tensor, gate: Tensor):
    """(go, gp, dz, gq) of Block's phase-2 merge (see rs_merge_backward)."""
    N, D = _shape(p)
    gx, p, x, q, r, s, gate = (contiguous(t) for t in (gx, p, x, q, r, s, gate))
    go, gp = torch.empty_like(gx), torch.empty_like(p)
    dz = torch.empty(p.shape[:-1], dtype=torch.float32)
    nt = threads(5 * N * D)
    parts = torch.zeros(nt, D, dtype=torch.float32)
    lib.rs_merge_backward(N, D, gx.data_ptr(), p.data_ptr(), x.data_ptr(), q.data_ptr(), r.data_ptr(), s.data_ptr(),
                          gate.data_ptr(), go.data_ptr(), gp.data_ptr(), dz.data_ptr(), parts.data_ptr(), nt)
    return go, gp, dz, parts.sum(0)


def source_backward(lib, v: Tensor, r: Tensor, z: tuple[Tensor, list[int]], readers: list[tuple], q: Tensor,
                    direct: Tensor | None) -> tuple[Tensor, Tensor]:
    """Full AttnRes: source v's whole gradient from its readers (see rs_source_backward):
    ``readers`` ((weights [..., n], column), g, <g, x>, query row) each, the weights as
    softmax_mix returns them; z (c, rows): v's logits c [rows, ...] and the row of c each reader
    read; q the effective queries [rows, D]. Returns (gv, dz [M, ...])."""
    N, D = _shape(v)
    M = len(readers)
    v, r, q = contiguous(v), contiguous(r), contiguous(q)
    direct = None if direct is None else contiguous(direct)
    c, rows = z
    assert c.is_contiguous() and all(a[0].stride(-1) == N for a, *_ in readers), "column layouts of softmax_mix"
    zp = addresses([c.data_ptr() + 4 * k * N for k in rows])
    ap = addresses([a.data_ptr() + 4 * k * N for (a, k), *_ in readers])
    gp, gk = _ptrs([g for _, g, _, _ in readers])
    xp, xk = _ptrs([gx for _, _, gx, _ in readers])
    qp = addresses([q.data_ptr() + 4 * row * q.stride(0) for _, _, _, row in readers])
    gv = torch.empty(v.shape, dtype=torch.float32)
    dz = torch.empty(M, *v.shape[:-1], dtype=torch.float32)
    lib.rs_source_backward(N, D, M, v.data_ptr(), r.data_ptr(), zp, gp, ap, xp, qp,
                           None if direct is None else direct.data_ptr(), gv.data_ptr(), dz.data_ptr(),
                           threads(N * D * (M + 2)))
    return gv, dz
